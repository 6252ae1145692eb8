"""Checkpoints, one concern per module:

- :mod:`~semseg.checkpoints.file`: the checkpoint file (its entries, format version, safe loads);
- :mod:`~semseg.checkpoints.run_folder`: a run folder's ``checkpoints/`` (latest, best, last,
  the damaged-file fallback, pruning);
- :mod:`~semseg.checkpoints.rng`: the random streams a checkpoint carries;
- :mod:`~semseg.checkpoints.resume`: what a resume restores, and the config changes it reports;
- :mod:`~semseg.checkpoints.model_folder`: model folders (safetensors + YAML) and the one loader
  for any model reference (file, folder, ``hf://``);
- :mod:`~semseg.checkpoints.hub`: ``hf://`` references through huggingface_hub's cache.

Nothing is imported here, so that naming a file or folder does not load torch.
"""
