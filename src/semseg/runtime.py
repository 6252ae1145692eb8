"""Device and numeric precision: one policy for training, evaluation, prediction and the benchmark."""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

from semseg.errors import ConfigError

# The autocast dtype of each precision (None: no autocast). ``fp32`` is full IEEE fp32 everywhere;
# ``tf32`` is fp32 tensors whose CUDA matmuls and convolutions run on TF32 tensor cores
# (:func:`use_fp32_math`), a CUDA-only setting.
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
CUDA_ONLY_PRECISIONS = ("tf32",)


DEVICES = ("auto", "cpu", "cuda", "mps")
CHANNELS_LAST = ("auto", "true", "false")


def mps_available() -> bool:
    """Apple-silicon GPU (Metal) present and usable by this torch build."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device kinds this machine offers torch, best first (``auto`` takes the first)."""
    accelerators = [
        d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", mps_available())) if ok
    ]
    return [*accelerators, "cpu"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA, else Apple's MPS, else CPU; ``cuda`` -> this process's GPU (``LOCAL_RANK``).

    Asking for a device kind this machine lacks is a ConfigError that lists the available ones.
    """
    if isinstance(device, torch.device):
        return device
    device = str(device)
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    available = available_devices()
    if kind == "auto":
        device = kind = available[0]
    elif kind not in available:
        raise ConfigError(
            f"device={device}, but torch sees no {kind.upper()} device on this machine; "
            f"available: {', '.join(available)} (or device=auto)"
        )
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if kind == "mps":
        # Ops that Metal lacks run on the CPU instead of failing (must be set before first use).
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The run's precision. ``auto``: bf16 where the hardware runs it natively (Ampere+ GPUs,
    AVX512-BF16/AMX CPUs: :func:`cpu_has_native_bf16`), fp16 on older GPUs, fp32 on other CPUs
    and on MPS (autocast support there varies across macOS/torch versions; fp32 always works).
    ``tf32`` needs a CUDA device. docs/performance.md has the figures behind each choice."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}"
            )
        if precision in CUDA_ONLY_PRECISIONS and device.type != "cuda":
            raise ConfigError(
                f"precision={precision} is a CUDA setting (TF32 tensor cores) and this run is on "
                f"{device.type}: use fp32, or bf16 where the CPU has native BF16"
            )
        return precision
    if device.type == "cuda":
        return cuda_precision(torch.cuda.get_device_capability(device))
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX512-BF16 (Cooper Lake, Sapphire Rapids and
    later, AMD Zen 4 and later) or AMX-BF16 (Sapphire Rapids and later). Other AVX-512 CPUs
    (Skylake-SP, Cascade Lake, Ice Lake) emulate it: oneDNN says bf16 is supported there
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) but it runs slower than fp32."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16", False) or caps.get("amx_bf16", False))


def cuda_precision(capability: tuple[int, int]) -> str:
    """bf16 on GPUs that run it natively (compute capability 8.0+: A100, H100, RTX 30xx and
    later), fp16 with a GradScaler before (V100 7.0, T4 7.5, P100 6.0), where torch would only
    emulate bf16 (``torch.cuda.is_bf16_supported()`` counts emulation as support)."""
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def resolve_channels_last(setting: str | bool, device: torch.device, precision: str) -> bool:
    """Whether to keep activations in channels_last (NHWC). ``auto`` picks the faster layout,
    measured with scripts/benchmark.py (Semantic FPN R-50, 512x1024, s/step, docs/performance.md):

    - CUDA: NHWC (tensor-core convolutions are NHWC-native);
    - CPUs with AVX-512: NHWC (oneDNN's blocked kernels: bf16 1.64 vs 2.26 s, fp32 3.42 vs 4.03 s);
    - AVX2-only CPUs: NCHW (fp32 16.9 s NHWC vs 13.6 s NCHW on a 2-core AMD EPYC);
    - MPS: NCHW (untested; the layout Metal's convolutions were written for).
    ``precision`` is the resolved precision (reserved for rules that depend on it).
    """
    value = str(setting).lower()
    if value not in CHANNELS_LAST:
        raise ConfigError(
            f"trainer.channels_last must be one of {', '.join(CHANNELS_LAST)}; got {setting!r}"
        )
    if value != "auto":
        return value == "true"
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` on ``device`` (fp32: a no-op)."""
    dtype = PRECISIONS[resolve_precision(precision, device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device, precision: str = "fp32") -> None:
    """cuDNN autotuning on CUDA (fixed input sizes: the autotuner pays off) and the fp32 math of
    ``precision`` (:func:`use_fp32_math`); on the CPU, an allocator that keeps freed activation
    memory (:func:`keep_cpu_memory`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        use_fp32_math(device, precision)
    elif device.type == "cpu":
        keep_cpu_memory()


def use_fp32_math(device: torch.device, precision: str) -> None:
    """How CUDA matmuls and convolutions compute on fp32 tensors: TF32 tensor cores for
    ``precision=tf32``, full IEEE fp32 for every other precision (fp32 means fp32; under bf16 /
    fp16 autocast the ops it keeps in fp32 stay exact). Through torch's ``fp32_precision``
    settings; the legacy ``allow_tf32`` flags are never touched (mixing the two APIs is an
    error in torch). A no-op off CUDA."""
    if device.type != "cuda":
        return
    math = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = math
    torch.backends.cudnn.conv.fp32_precision = math
    torch.backends.cudnn.rnn.fp32_precision = math  # cuDNN's ops agree (torch checks they do)


# glibc <malloc.h> mallopt parameters and the values that keep a training step's memory.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
CPU_MALLOC_SETTINGS = {
    _M_MMAP_THRESHOLD: 32 * 2**20,  # the largest value glibc accepts: big blocks from the heap
    _M_TRIM_THRESHOLD: 2**31 - 1,  # never give the heap's top back after a step
    _M_TOP_PAD: 512 * 2**20,  # grow the heap in large steps
}
# Opt-out, and glibc's own variables: when the user sets any of them, theirs apply, not ours.
KEEP_CPU_MEMORY_ENV = "SEMSEG_KEEP_CPU_MEMORY"
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_cpu_memory() -> bool:
    """Tune glibc malloc (``mallopt``) so that a training step's large tensors reuse heap memory.

    By default glibc serves every large activation with a fresh ``mmap`` and returns it after
    the step, so each step page-faults and zero-fills its memory again: about 20% of a Semantic
    FPN R-50 step on a 2-core CPU (docs/performance.md, "CPU memory allocator"). The process
    keeps up to its peak (plus 512 MB) instead. Skipped (False) without glibc, when
    ``SEMSEG_KEEP_CPU_MEMORY=0``, or when the user set glibc's own (``MALLOC_*_``,
    ``GLIBC_TUNABLES=glibc.malloc...``).
    """
    if os.environ.get(KEEP_CPU_MEMORY_ENV, "1") == "0":
        return False
    if any(key in os.environ for key in GLIBC_MALLOC_ENV) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    return all(mallopt(param, value) == 1 for param, value in CPU_MALLOC_SETTINGS.items())
