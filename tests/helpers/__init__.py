"""Helpers the test modules share, one module per concern (fixtures live in conftest.py):

- :mod:`helpers.processes`: entry points, scripts and Python code in subprocesses, offline;
- :mod:`helpers.configs`: the smoke config and any entry point's config, composed here;
- :mod:`helpers.training`: training in this process, exact resume, the benchmark's step, a
  one-layer model for the training step;
- :mod:`helpers.checkpoints`: a tiny checkpoint, ONNX export against PyTorch, the model-zoo row;
- :mod:`helpers.faults`: real write faults (file-size limit, a full disk);
- :mod:`helpers.distributed`: several ranks, torchrun, 2-rank trainings
  (:mod:`helpers.ranks_main` runs in each rank);
- :mod:`helpers.sweeps`: Hydra multirun sweeps;
- :mod:`helpers.hub`: a Hugging Face Hub cache laid out offline;
- :mod:`helpers.mmseg_fixtures`: mmseg state dicts without mmseg;
- :mod:`helpers.model_rows`: the model-contract table (tests/test_model_contract.py).

Test modules import them from here (``from helpers import ...``), never each other.
"""

from __future__ import annotations

from .checkpoints import (
    assert_model_zoo_row,
    assert_onnx_equals_model,
    assert_onnx_export_matches,
    tiny_checkpoint,
)
from .configs import (
    CPU_PINNED,
    SMOKE_ITERS,
    compose_smoke,
    compose_train,
    data_overrides,
    entry_config,
    needs_cuda,
    resolved,
    smoke_overrides,
)
from .distributed import (
    free_port,
    launch_ranks,
    torchrun,
    train_on_two_ranks,
    train_rows_on_two_ranks,
)
from .faults import file_size_limit_preexec, fill_up
from .hub import hub_cache_repo
from .mmseg_fixtures import mmseg_fpn_r50_v1c
from .model_rows import MODEL_ROWS, ROW_ITERS, ModelRow, build_row, has_aux_head, row_overrides
from .processes import (
    OFFLINE_ENV,
    REPO,
    SINGLE_THREAD_ENV,
    TESTS_ON_PATH,
    child_env,
    load_script,
    run_entry,
    run_process_group,
    run_python,
)
from .sweeps import SWEEP_LRS, smoke_sweep, sweep_args
from .training import (
    OneConvModel,
    assert_resume_is_exact,
    benchmark_train_step,
    read_jsonl,
    train_in_process,
)

__all__ = [
    "CPU_PINNED",
    "MODEL_ROWS",
    "OFFLINE_ENV",
    "REPO",
    "ROW_ITERS",
    "SINGLE_THREAD_ENV",
    "SMOKE_ITERS",
    "SWEEP_LRS",
    "TESTS_ON_PATH",
    "ModelRow",
    "OneConvModel",
    "assert_model_zoo_row",
    "assert_onnx_equals_model",
    "assert_onnx_export_matches",
    "assert_resume_is_exact",
    "benchmark_train_step",
    "build_row",
    "child_env",
    "compose_smoke",
    "compose_train",
    "data_overrides",
    "entry_config",
    "file_size_limit_preexec",
    "fill_up",
    "free_port",
    "has_aux_head",
    "hub_cache_repo",
    "launch_ranks",
    "load_script",
    "mmseg_fpn_r50_v1c",
    "needs_cuda",
    "read_jsonl",
    "resolved",
    "row_overrides",
    "run_entry",
    "run_process_group",
    "run_python",
    "smoke_overrides",
    "smoke_sweep",
    "sweep_args",
    "tiny_checkpoint",
    "torchrun",
    "train_in_process",
    "train_on_two_ranks",
    "train_rows_on_two_ranks",
]
