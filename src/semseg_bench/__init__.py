"""Benchmark of the semseg training step, data pipeline and inference (``scripts/benchmark.py``).

``python scripts/benchmark.py [options] [hydra overrides]`` composes ``conf/train.yaml`` (so the
model/backbone/dataset groups and overrides are the training ones) and measures:

- ``train``: the project's real ``semseg.engine.trainer.train_step`` (forward, loss, backward,
  SGD update, poly LR step) on a fixed synthetic batch, for each precision x channels_last x
  torch.compile (off, on, CUDA graphs) setting: seconds/step and images/s over N steps between
  two syncs after warm-up, compile time, peak memory of warm-up and steady state apart (cuDNN's
  autotuning workspaces come and go in the warm-up), achieved FLOP/s;
  and which setting ``auto`` picks (``semseg.runtime``'s policy) next to the fastest measured;
- ``data``: the full train recipe (``build_dataset(..., train=True)``) on 1280x720 BDD100K-layout
  files, one worker's images/s next to direct albumentations pipelines on the same files (the same
  transforms without the dataset class, and the stock transforms closest to the recipe), and the
  train loader with N worker processes;
- ``infer``: whole-image inference (``predict_logits``) at 720x1280, batch 1 and larger.

FLOPs per image come from ``torch.utils.flop_counter`` (a multiply-add counts 2); the achieved
FLOP/s are compared with a large matrix multiply timed on the same device in the same run.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set
size (``VmHWM``, reset before each phase) on the CPU.

Modules, one per concern: ``options`` (command line), ``runner`` (one run), ``timing``,
``memory``, ``train``, ``data``, ``inference``, ``report``, ``cli`` (``main``). This package sits
above ``semseg`` and imports from it; ``semseg`` never imports it.
"""
