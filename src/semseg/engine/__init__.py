"""Training: the trainer, its optimiser and schedule, distributed set-up and the run folder's checkpoints."""
