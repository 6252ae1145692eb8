"""The device / precision / memory-layout policy, and a start-up that loads only what it needs."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env, run_entry, train_in_process

from semseg import runtime
from semseg.errors import ConfigError, UserError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


def _machine(
    monkeypatch, cuda=False, mps=False, capability="AVX512", cpu_flags=("avx512_bf16",)
) -> None:
    """A faked machine: its devices, torch's CPU kernel level and cpuinfo's flags (``cpu_flags``
    true, every other false). oneDNN's own bf16 answer is faked True whatever the flags: it says
    so on every AVX-512 CPU, emulated bf16 included, and the policy must not trust it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(runtime, "mps_available", lambda: mps)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    flags = {"avx512_bf16": False, "amx_bf16": False, "amx_tile": False, "avx512_bw": True}
    flags.update(dict.fromkeys(cpu_flags, True))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(False, False, "cpu"), (True, False, "cuda"), (False, True, "mps")],
)
def test_auto_device_prefers_an_accelerator(monkeypatch, cuda, mps, expected):
    _machine(monkeypatch, cuda=cuda, mps=mps)
    assert runtime.resolve_device("auto").type == expected
    assert runtime.available_devices()[-1] == "cpu"


def test_mps_gets_fp32_nchw_and_the_cpu_fallback(monkeypatch):
    _machine(monkeypatch, mps=True)
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    device = runtime.resolve_device("auto")
    assert device.type == "mps"
    assert runtime.resolve_precision("auto", device) == "fp32"
    assert runtime.resolve_channels_last("auto", device, "fp32") is False
    import os

    assert os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"


@pytest.mark.parametrize(
    ("capability", "cpu_flags", "precision", "channels_last"),
    [
        ("AVX512", ("avx512_bf16",), "bf16", True),  # Zen 4+, Cooper Lake: AVX512-BF16
        ("AVX512", ("amx_tile", "amx_bf16"), "bf16", True),  # AMX-BF16 (Sapphire Rapids+)
        ("AVX512", (), "fp32", True),  # Skylake-SP / Cascade Lake: bf16 only emulated
        ("AVX512", ("amx_tile",), "fp32", True),  # AMX tiles without its BF16 unit
        ("AVX2", (), "fp32", False),  # AVX2-only: NCHW (16.9 vs 13.6 s step)
    ],
)
def test_cpu_policy_by_instruction_set(
    monkeypatch, capability, cpu_flags, precision, channels_last
):
    _machine(monkeypatch, capability=capability, cpu_flags=cpu_flags)
    assert runtime.cpu_has_native_bf16() is (precision == "bf16")
    assert runtime.resolve_precision("auto", CPU) == precision
    assert runtime.resolve_channels_last("auto", CPU, precision) is channels_last


@pytest.mark.parametrize(
    ("capability", "precision"),
    [
        ((6, 0), "fp16"),  # P100
        ((7, 0), "fp16"),  # V100: torch.cuda.is_bf16_supported() says True (emulation)
        ((7, 5), "fp16"),  # T4
        ((8, 0), "bf16"),  # A100
        ((8, 6), "bf16"),  # RTX 30xx, A10
        ((9, 0), "bf16"),  # H100
    ],
)
def test_cuda_precision_follows_compute_capability(capability, precision):
    assert runtime.cuda_precision(capability) == precision


def test_cuda_policy(monkeypatch):
    _machine(monkeypatch, cuda=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert runtime.resolve_precision("auto", CUDA) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert runtime.resolve_precision("auto", CUDA) == "bf16"
    assert runtime.resolve_channels_last("auto", CUDA, "fp16") is True


@pytest.mark.parametrize("device", [CPU, MPS])
def test_tf32_is_refused_off_cuda_in_one_line(monkeypatch, device):
    _machine(monkeypatch, mps=True)
    with pytest.raises(ConfigError) as info:
        runtime.resolve_precision("tf32", device)
    assert str(info.value).startswith(f"precision=tf32 is a CUDA setting (TF32 tensor cores) and "
                                      f"this run is on {device.type}")  # fmt: skip
    assert "\n" not in str(info.value)


@pytest.fixture
def fp32_math_restored():
    """torch's fp32 math settings put back after the test (they are process-wide)."""
    ops = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    before = [op.fp32_precision for op in ops]
    yield ops
    for op, value in zip(ops, before, strict=True):
        op.fp32_precision = value


@pytest.mark.parametrize(
    ("precision", "math"), [("tf32", "tf32"), ("fp32", "ieee"), ("bf16", "ieee"), ("fp16", "ieee")]
)
def test_cuda_fp32_math_follows_the_precision(monkeypatch, fp32_math_restored, precision, math):
    """tf32: TF32 matmuls and convolutions; fp32 (and what autocast keeps in fp32) full IEEE,
    through the fp32_precision settings (a faked CUDA run: the settings are host-side)."""
    _machine(monkeypatch, cuda=True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert runtime.resolve_precision(precision, CUDA) == precision
    for op in fp32_math_restored:
        op.fp32_precision = "tf32" if math == "ieee" else "ieee"  # the opposite first
    runtime.configure_backends(CUDA, precision)
    assert [op.fp32_precision for op in fp32_math_restored] == [math] * 3
    assert torch.backends.cudnn.benchmark is True


def test_the_cpu_leaves_cuda_fp32_math_alone(fp32_math_restored):
    before = [op.fp32_precision for op in fp32_math_restored]
    runtime.use_fp32_math(CPU, "tf32")
    assert [op.fp32_precision for op in fp32_math_restored] == before


def test_no_legacy_tf32_flag_is_set_anywhere():
    """TF32 only through fp32_precision: torch refuses to mix it with the allow_tf32 flags."""
    import re

    setter = re.compile(r"allow_tf32\s*=(?!=)|allowTF32|set_float32_matmul_precision")
    sources = [*(REPO / "src").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]
    assert sources and not [p for p in sources if setter.search(p.read_text())]


def test_explicit_settings_win(monkeypatch):
    _machine(monkeypatch, capability="AVX2", cpu_flags=())
    assert runtime.resolve_channels_last(True, CPU, "fp32") is True
    assert runtime.resolve_channels_last("false", CPU, "bf16") is False
    assert runtime.resolve_precision("bf16", CPU) == "bf16"


def test_bad_values_name_the_allowed_ones(monkeypatch):
    _machine(monkeypatch)
    with pytest.raises(
        ConfigError, match=r"trainer\.channels_last must be one of auto, true, false"
    ):
        runtime.resolve_channels_last("sometimes", CPU, "fp32")
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, tf32, bf16, fp16"):
        runtime.resolve_precision("fp8", CPU)
    with pytest.raises(ConfigError, match="available: cpu"):
        runtime.resolve_device("cuda")
    with pytest.raises(ConfigError, match="available: cpu"):
        runtime.resolve_device("mps")
    with pytest.raises(ConfigError, match="one of auto, cpu, cuda, mps"):
        runtime.resolve_device("tpu")


BAD_TRAINER_SETTINGS = [
    ("trainer.channels_last=maybe", "trainer.channels_last must be one of auto, true, false"),
    ("trainer.precision=fp8", "precision must be one of auto, fp32, tf32, bf16, fp16"),
    ("trainer.precision=tf32", "precision=tf32 is a CUDA setting (TF32 tensor cores)"),
    ("device=cuda", "torch sees no CUDA device"),
    ("trainer.progress_bar=maybe", "trainer.progress_bar must be auto, true or false"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_TRAINER_SETTINGS)
def test_bad_trainer_settings_are_one_line_user_errors(toy_root, tmp_path, override, expected):
    if override.endswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError) as info:
        train_in_process(toy_root, tmp_path, override)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_bad_trainer_setting_through_train_py_is_one_line_exit_2(tmp_path):
    """What train.py makes of such a UserError (each of the settings above takes this path)."""
    override, expected = BAD_TRAINER_SETTINGS[1]
    proc = run_entry(
        "train.py", "experiment=smoke", f"hydra.run.dir={tmp_path}", override, check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "shown"), [("auto", False), ("true", True)])
def test_progress_bar_is_left_out_of_log_files_by_default(tmp_path, setting, shown):
    # stderr is a pipe here, as in a SLURM or nohup log: auto leaves the bar out, true forces it.
    proc = run_entry(
        "train.py",
        "experiment=smoke",
        f"hydra.run.dir={tmp_path}",
        f"trainer.progress_bar={setting}",
    )
    assert ("train: 100%" in proc.stderr) is shown
    assert "iter 4: val mIoU" in proc.stdout  # the log lines stay


# Modules the training entry point must not load at start-up (each costs 0.3-2.5 s); they load
# where they are used: W&B / TensorBoard loggers, the analysis helpers, ONNX export, the metric.
HEAVY = ("wandb", "pandas", "matplotlib", "onnx", "onnxruntime", "torchmetrics", "tensorboard")


@pytest.mark.slow
def test_training_entry_point_imports_no_heavy_modules():
    code = (
        "import runpy, sys; "
        f"runpy.run_path({str(REPO / 'src/train.py')!r}, run_name='not_main'); "
        "import semseg.engine.trainer; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# In a fresh process: the CPU policy's allocator settings, read back from glibc's own accounting.
# A 24 MiB block is over glibc's default mmap threshold (128 KiB, at most 32 MiB when it adapts).
_MALLOC_PROBE = """
import ctypes, torch
from semseg import runtime
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
runtime.configure_backends(torch.device("cpu"))
before = libc.mallinfo2()
block = libc.malloc(24 * 2**20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, during.arena - after.arena)
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallopt, mallinfo2)")
@pytest.mark.parametrize(
    ("env", "kept"),
    [
        ({}, True),  # the default for training and the benchmark on the CPU
        ({"SEMSEG_KEEP_CPU_MEMORY": "0"}, False),  # the opt-out
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, False),  # glibc's own setting wins
    ],
)
def test_cpu_allocator_keeps_memory_by_default(env, kept):
    clean = {
        k: v for k, v in child_env(env).items() if k not in runtime.GLIBC_MALLOC_ENV or k in env
    }
    proc = subprocess.run(
        [sys.executable, "-c", _MALLOC_PROBE],
        cwd=REPO, env=clean, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mmapped, trimmed = (int(v) for v in proc.stdout.split())
    if kept:  # from the heap, and the heap keeps it after the free
        assert (mmapped, trimmed) == (0, 0)
    else:  # glibc's default: a fresh mmap for the block, unmapped on free
        assert mmapped >= 24 * 2**20
