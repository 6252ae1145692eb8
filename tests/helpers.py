"""Helpers the test modules share: running the entry points and scripts, training in this
process, several processes, real write faults, a Hub cache laid out offline. Fixtures live in
conftest.py; test modules import these (``from helpers import ...``), never each other."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The suite runs in a bare shell: no network (the Hub's cache only, W&B off unless a test asks for
# offline runs), no display. Set before anything imports huggingface_hub, wandb or matplotlib.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
for _key, _value in {**OFFLINE_ENV, "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(_key, _value)
# For subprocesses that import the test helpers (faulty_loss, ...).
TESTS_ON_PATH = {
    "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
}


def child_env(*extras: dict | None) -> dict[str, str]:
    """A test subprocess's environment: this process's, offline whatever the shell says (no Hub,
    no W&B), then ``extras`` in order."""
    env = {**os.environ, **OFFLINE_ENV}
    for extra in extras:
        env.update(extra or {})
    return env


def run_entry(
    script: str,
    *overrides: str,
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
    limit_bytes: int | None = None,
) -> subprocess.CompletedProcess:
    """Run ``src/<script>`` with Hydra overrides in a subprocess (optionally under a file-size
    limit, see :func:`file_size_limit_preexec`); fail the test with its output."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / script), *overrides],
        cwd=REPO,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=None if limit_bytes is None else file_size_limit_preexec(limit_bytes),
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


# Tests that train run on the CPU whatever the machine has: their numbers are compared bit for bit,
# and a machine with GPUs runs the suite as one without (CUDA tests say so: @needs_cuda).
CPU_PINNED = ("device=cpu",)


def needs_cuda(test):
    """Mark a test of what only a GPU host shows (``-m cuda``; skipped without a GPU)."""
    import torch

    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return skip(pytest.mark.cuda(test))


def smoke_overrides(toy_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A seconds-long CPU training run on the tiny dataset, writing into ``run_dir``."""
    return [
        "experiment=smoke",
        *CPU_PINNED,
        f"dataset.root={toy_root}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def compose_train(*overrides: str):
    """The ``src/train.py`` config with ``overrides``, composed here."""
    from semseg.cli import compose

    return compose("train", overrides)


def resolved(cfg) -> dict:
    """The whole config resolved (the run folder comes from Hydra at run time: a stand-in)."""
    from omegaconf import OmegaConf

    cfg.paths.output_dir = "/run/folder"
    return OmegaConf.to_container(cfg, resolve=True)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (``metrics.jsonl``)."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _global_state() -> dict:
    """What a training run could leave behind in this process, for :func:`train_in_process`."""
    import logging
    import signal

    import torch

    root = logging.getLogger()
    return {
        "signal handlers": [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)],
        "root log level": root.level,
        "root log handlers": list(root.handlers),
        "torch threads": torch.get_num_threads(),
        "anomaly detection": torch.is_anomaly_enabled(),
        "grad mode": torch.is_grad_enabled(),
        "environment": dict(os.environ),
    }


def compose_smoke(toy_root: Path, run_dir: Path, *overrides: str):
    """The smoke training config (as :func:`smoke_overrides`) composed here, writing into ``run_dir``."""
    from semseg.cli import compose

    cfg = compose(
        "train", ["experiment=smoke", *CPU_PINNED, f"dataset.root={toy_root}", *overrides]
    )
    cfg.paths.output_dir = str(run_dir)  # what Hydra's run folder gives a launched run
    return cfg


# One compute thread for the tiny training runs: on a busy machine (a 2-core box shared with other
# work) torch's threads spin-wait for each other and a 64x64 step gets several times slower.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


def train_in_process(toy_root: Path, run_dir: Path, *overrides: str) -> dict:
    """Train the smoke config in this process (no start-up, no Hydra files: no .hydra/, no
    train.log; read log lines with caplog), with one compute thread; returns the summary.

    The run's seeding does not leak into later tests (the RNG states are put back), and a run that
    leaves signal handlers, logging, thread, autograd or environment settings changed fails.
    """
    import random

    import numpy as np
    import torch

    from semseg.engine.trainer import train

    cfg = compose_smoke(toy_root, run_dir, *overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = _global_state()
    rng = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            return train(cfg)
    finally:
        after = _global_state()
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        leaked = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
        assert not leaked, f"the training run changed the process's global state: {leaked}"


SMOKE_ITERS = 2  # the fewest iterations that still write last.pt, best.pt and an evaluation


def entry_config(name: str, *overrides: str):
    """An entry point's config (``conf/<name>.yaml``) composed in this process, with ``overrides``."""
    from semseg.cli import compose

    return compose(name, list(overrides))


def tiny_checkpoint(path: Path, num_classes: int | None = None) -> Path:
    """A checkpoint of a small Semantic FPN (resnet18, no pretrained weights, narrow FPN/head)."""
    import torch

    from semseg.checkpoints.file import save_checkpoint
    from semseg.cli import compose_groups
    from semseg.data import dataset_meta
    from semseg.models import build_model

    groups = {"model": "semantic_fpn", "backbone": "resnet18", "dataset": "toy_bdd100k"}
    overrides = [
        "backbone.pretrained=false",
        "model.neck.out_channels=32",
        "model.decode_head.channels=16",
    ]
    if num_classes is not None:
        overrides.append(f"model.num_classes={num_classes}")
    config = compose_groups(groups, overrides)
    torch.manual_seed(0)
    model = build_model(config)
    meta = dataset_meta(config["dataset"]) | {"num_classes": config["model"]["num_classes"]}
    state = {"model": model.state_dict(), "iteration": 0, "metrics": {}}
    return save_checkpoint(state | {"config": config, "meta": meta}, path)


def data_overrides(toy_root: Path, split: str = "val") -> list[str]:
    """evaluate.py / predict.py overrides reading ``split`` of the toy data on the CPU."""
    return ["dataset=toy_bdd100k", f"dataset.root={toy_root}", f"dataset.split={split}",
            "dataset.num_workers=0", "device=cpu"]  # fmt: skip


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module, to call its ``main`` in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_resume_is_exact(toy_root: Path, tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    """Train the smoke config with ``overrides`` for 4 iterations straight, and for 2, stopped,
    then resumed from iteration 2's checkpoint to 4: both last.pt hold the same weights and EMA
    weights (``trainer/ema=timm``), which moved since iteration 2. Returns both last.pt
    (straight, resumed), for the optimizer's state."""
    import torch

    from semseg.checkpoints.file import load_checkpoint

    common = [*overrides, "schedule.max_iters=4", "trainer.checkpoint_interval=2",
              "trainer.eval_at_end=false", "trainer/ema=timm", "trainer.ema.decay=0.5"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_in_process(toy_root, straight, *common)
    half = straight / "checkpoints/iter_000002.pt"
    train_in_process(toy_root, resumed, *common, f"trainer.resume={half}")
    a = load_checkpoint(straight / "checkpoints/last.pt")
    b = load_checkpoint(resumed / "checkpoints/last.pt")
    assert a["ema"].keys() == a["model"].keys()
    for entry in ("model", "ema"):
        for key, tensor in a[entry].items():
            assert torch.equal(tensor, b[entry][key]), (entry, key)
    assert not all(torch.equal(t, a["model"][k]) for k, t in load_checkpoint(half)["model"].items())
    return a, b


def assert_onnx_export_matches(checkpoint: Path, onnx_path: Path) -> None:
    """``scripts/export_onnx.py`` on ``checkpoint`` (traced at 64x96), then onnxruntime's logits
    against the model's at the traced size and at another batch and image size."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from semseg.models import model_from_checkpoint

    export = load_script("export_onnx").main
    assert export([str(checkpoint), str(onnx_path), "--height", "64", "--width", "96"]) == 0
    model, _, _ = model_from_checkpoint(checkpoint)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 96), (2, 3, 75, 110)]:
        image = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 255
        with torch.no_grad():
            expected = model(image).numpy()
        (got,) = session.run(["logits"], {"image": image.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def assert_model_zoo_row(run_dir: Path, toy_root: Path, output_dir: Path) -> Path:
    """The model-zoo folder of ``run_dir``'s last.pt (evaluated on the toy data): its weights are
    the checkpoint's model, its scores hold the mIoU. Returns the folder."""
    import json

    import torch

    from semseg.apps.zoo import build_model_zoo_row
    from semseg.checkpoints.file import load_checkpoint
    from semseg.cli import compose
    from semseg.models import model_from_checkpoint

    overrides = [f"run_dir={run_dir}", f"dataset.root={toy_root}", "device=cpu", "progress=false",
                 "visuals.count=1", f"output_dir={output_dir}", "checkpoint=last.pt"]  # fmt: skip
    out = build_model_zoo_row(compose("model_zoo", overrides))
    model, _, _ = model_from_checkpoint(out / "weights.pt")
    last = load_checkpoint(run_dir / "checkpoints/last.pt")["model"]
    assert all(torch.equal(v, last[k]) for k, v in model.state_dict().items())
    assert "mIoU" in json.loads((out / "scores-val.json").read_text())["metrics"]
    return out


# --------------------------------------------------------------------------------------------
# Real write faults: the kernel's own errors, not a patched library function


def file_size_limit_preexec(limit_bytes: int):
    """A ``preexec_fn`` for subprocesses: files larger than ``limit_bytes`` cannot be written
    (RLIMIT_FSIZE; SIGXFSZ ignored, so ``write()`` fails with EFBIG, "File too large")."""

    def limit() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


def run_python(
    code: str, *, limit_bytes: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -c code`` in a subprocess (optionally under a file-size limit), output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=None if limit_bytes is None else file_size_limit_preexec(limit_bytes),
    )


def fill_up(folder: Path, leave_bytes: int) -> None:
    """Write a filler file into ``folder`` until only about ``leave_bytes`` stay free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


# --------------------------------------------------------------------------------------------
# Several processes


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(
    script: str,
    *overrides: str,
    world_size: int = 2,
    env: dict | None = None,
    timeout: float = 240,
) -> list[subprocess.CompletedProcess]:
    """``src/<script>`` as ``world_size`` ranks started side by side the way SLURM's srun starts
    tasks (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, no torchrun agent),
    with tests/ on the path (for ``faulty_loss``); waits for all of them, killing what is left
    after ``timeout`` seconds (then the test fails)."""
    base = child_env(
        SINGLE_THREAD_ENV,
        TESTS_ON_PATH,
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world_size),
        },
        env,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "src" / script), *overrides],
            cwd=REPO,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    results, deadline, hung = [], time.monotonic() + timeout, []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            hung.append(rank)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    if hung:
        pytest.fail(f"ranks {hung} still ran after {timeout} s:\n{results[hung[0]].stderr[-3000:]}")
    return results


def run_process_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on a timeout every process it started is
    killed (torchrun's workers too), not only the first, and the test fails."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} still ran after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(
    script: str,
    *overrides: str,
    nproc: int = 2,
    torchrun_args: tuple[str, ...] = (),
    env: dict | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc [torchrun_args] src/<script> overrides``,
    one compute thread per rank, tests/ on the path (for ``faulty_loss``)."""
    proc = run_process_group(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *torchrun_args,
            str(REPO / "src" / script),
            *overrides,
        ],
        cwd=REPO,
        env=child_env(SINGLE_THREAD_ENV, TESTS_ON_PATH, env),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {script} exited {proc.returncode}\n{proc.stderr[-5000:]}")
    return proc


def train_on_two_ranks(toy_root: Path, run_dir: Path, *overrides: str) -> dict:
    """One iteration of the smoke experiment with ``overrides`` on two gloo processes (torchrun);
    the run's last checkpoint, after checking that it holds both ranks' RNG states."""
    import json

    from semseg.checkpoints.file import load_checkpoint

    torchrun("train.py", "experiment=smoke", f"dataset.root={toy_root}", *overrides,
             "schedule.max_iters=1", "trainer.eval_at_end=false", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1
    checkpoint = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert len(checkpoint["rng_per_rank"]) == 2
    return checkpoint


def benchmark_train_step(monkeypatch: pytest.MonkeyPatch, out: Path, *overrides: str) -> dict:
    """``scripts/benchmark.py``'s training section for ``overrides`` on the CPU: fp32, NCHW, one
    step at batch 2 of 32x64 crops, the matmul peak timed briefly on a 64-side matrix; its JSON
    (written to ``out``), after checking that the step's loss is finite."""
    import json
    from functools import partial

    import numpy as np

    from semseg_bench import runner
    from semseg_bench.timing import matmul_peak_flops

    monkeypatch.setattr(runner, "matmul_peak_flops", partial(matmul_peak_flops, min_time=0.01))
    argv = ["--only", "train", "--precision", "fp32", "--channels-last", "off", "--batch-size",
            "2", "--crop", "32", "64", "--steps", "1", "--warmup", "0", "--matmul-size", "64",
            "--device", "cpu", "--output", str(out), *overrides,
            f"paths.data_dir={out.parent / 'data'}"]  # fmt: skip
    assert load_script("benchmark").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["model"]["forward_gflops_per_image"] > 0
    assert np.isfinite(result["train"][0]["final_loss"])
    return result


# --------------------------------------------------------------------------------------------
# Sweeps

SWEEP_LRS = (0.01, 0.02)


def sweep_args(toy_root: Path, *overrides: str) -> list[str]:
    """The command-line arguments of a smoke sweep after `src/train.py` (fp32, on the CPU)."""
    return [
        "-m",
        "experiment=smoke",
        *CPU_PINNED,
        f"dataset.root={toy_root}",
        "trainer.precision=fp32",
        *overrides,
    ]


def smoke_sweep(
    toy_root: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python src/train.py -m experiment=smoke dataset.root=<toy> <overrides>`."""
    return run_entry(
        "train.py", *sweep_args(toy_root, *overrides), env={**SINGLE_THREAD_ENV, **(env or {})}
    )


# --------------------------------------------------------------------------------------------
# A Hugging Face Hub cache, laid out as huggingface_hub's downloads lay it out (no network)


def hub_cache_repo(
    cache: Path, repo_id: str, folder: Path, files: list[str], tags: tuple[str, ...] = ()
) -> str:
    """Put ``files`` of ``folder`` into the Hub cache ``cache`` as revision ``main`` (and
    ``tags``) of model repo ``repo_id``, exactly as ``hf_hub_download`` stores a download: blobs
    named by the file's Hub ETag (sha256 for LFS files such as weights, the git blob hash for
    the others), ``snapshots/<commit>/<file>`` relative links to them, ``refs/<revision>``
    holding the commit. Returns the commit hash."""
    import hashlib

    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils.sha import git_hash

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    contents = {name: (folder / name).read_bytes() for name in files}
    commit = hashlib.sha1(repr(sorted(contents.items())).encode()).hexdigest()
    for name, data in contents.items():
        lfs = name.endswith((".safetensors", ".pt"))
        etag = hashlib.sha256(data).hexdigest() if lfs else git_hash(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for ref in ("main", *tags):
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


# --------------------------------------------------------------------------------------------
# mmseg state dicts written from mmseg's module structure (no mmseg needed)


def _conv(out_ch: int, in_ch: int, k: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(out_ch, in_ch, k, k)}


def _bn(ch: int) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.rand(ch) + 0.5,
        "bias": torch.randn(ch),
        "running_mean": torch.randn(ch),
        "running_var": torch.rand(ch) + 0.5,
        "num_batches_tracked": torch.tensor(40000),
    }


def _add(sd: dict, prefix: str, params: dict[str, torch.Tensor]) -> None:
    sd.update({f"{prefix}.{k}": v for k, v in params.items()})


def mmseg_fpn_r50_v1c(num_classes: int = 19) -> dict[str, torch.Tensor]:
    """A state dict laid out like mmseg's fpn_r50 (ResNetV1c backbone, FPN neck, FPNHead),
    written from mmseg's module structure, with random values."""
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    # Deep stem: conv(3->32, s2) bn relu conv(32->32) bn relu conv(32->64) bn relu.
    for idx, (out_ch, in_ch) in zip((0, 3, 6), ((32, 3), (32, 32), (64, 32))):
        _add(sd, f"backbone.stem.{idx}", _conv(out_ch, in_ch, 3))
        _add(sd, f"backbone.stem.{idx + 1}", _bn(out_ch))
    in_ch = 64
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            _add(sd, f"{p}.conv1", _conv(planes, in_ch, 1))
            _add(sd, f"{p}.bn1", _bn(planes))
            _add(sd, f"{p}.conv2", _conv(planes, planes, 3))
            _add(sd, f"{p}.bn2", _bn(planes))
            _add(sd, f"{p}.conv3", _conv(planes * 4, planes, 1))
            _add(sd, f"{p}.bn3", _bn(planes * 4))
            if b == 0:
                _add(sd, f"{p}.downsample.0", _conv(planes * 4, in_ch, 1))
                _add(sd, f"{p}.downsample.1", _bn(planes * 4))
            in_ch = planes * 4
    for i, ch in enumerate((256, 512, 1024, 2048)):
        _add(sd, f"neck.lateral_convs.{i}.conv", _conv(256, ch, 1) | {"bias": torch.randn(256)})
        _add(sd, f"neck.fpn_convs.{i}.conv", _conv(256, 256, 3) | {"bias": torch.randn(256)})
    # FPNHead: scale_heads[i] = [ConvModule, Upsample] * n (no Upsample at level 0).
    for i, n in enumerate((1, 1, 2, 3)):
        for k in range(n):
            j = 2 * k if i > 0 else k
            _add(sd, f"decode_head.scale_heads.{i}.{j}.conv", _conv(128, 256 if k == 0 else 128, 3))
            _add(sd, f"decode_head.scale_heads.{i}.{j}.bn", _bn(128))
    _add(
        sd, "decode_head.conv_seg", _conv(num_classes, 128, 1) | {"bias": torch.randn(num_classes)}
    )
    return sd


# --------------------------------------------------------------------------------------------
# A one-layer model for the training step's tests


class OneConvModel(torch.nn.Module):
    """``conv`` on the images (0..255) times ``scale``, with what the training step asks of a
    model: ``loss(outputs, target, pixel_loss)`` (one head: the pixel loss on its logits)."""

    def __init__(self, conv: torch.nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.conv, self.scale = conv, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() * self.scale)

    def loss(self, outputs: torch.Tensor, target: torch.Tensor, pixel_loss) -> torch.Tensor:
        return pixel_loss(outputs, target)
