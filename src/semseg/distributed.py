"""Several processes (torchrun, single or multi node, or SLURM tasks): who is who, the process
group, and the few collectives training and evaluation need.

The process group is created once the device is known (:func:`init_distributed`), with the backend
for that device (gloo for CPU tensors, NCCL for CUDA ones); what the ranks must agree on before
(the run folder's name) goes through torchrun's own key-value store (:func:`agree_on`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from semseg.errors import ConfigError, error_line
from semseg.runtime import resolve_device

log = logging.getLogger(__name__)

TIMEOUT = timedelta(minutes=30)
_STORE: dist.TCPStore | None = None  # see _launcher_store


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _export_slurm_env() -> None:
    """Inside a multi-task SLURM job (e.g. hydra-submitit-launcher) derive RANK/WORLD_SIZE/... from SLURM."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_world_size() -> int:
    """The number of processes the launcher started (1 without one)."""
    _export_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def elastic_restart_count() -> int:
    """How often torchrun (``--max-restarts``) has restarted this run's workers (0: first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def job_identity() -> str | None:
    """The launcher's job this process belongs to, the same for all of its restarts: torchrun's
    run id, else the SLURM job id; None without a launcher."""
    if run_id := os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{run_id}"
    if job := os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{job}"
    return None


def is_restart() -> bool:
    """Whether the launcher started this process again after a failure: a torchrun restart
    (``--max-restarts``) or a requeued SLURM job."""
    return elastic_restart_count() > 0 or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0


def process_group_backend(device_type: str) -> str:
    """The backend for tensors on ``device_type``: NCCL for CUDA (gloo still serves the CPU
    tensors of object collectives), gloo for everything else."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def check_local_rank(local_rank: int, gpu_count: int) -> None:
    """One clear line when a node runs more processes than it has visible GPUs."""
    if local_rank >= gpu_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ConfigError(
            f"process LOCAL_RANK={local_rank} has no GPU: this node shows {gpu_count}{seen}; "
            f"start at most {gpu_count} process(es) per node (torchrun --nproc_per_node) or use "
            "device=cpu"
        )


def collective_timeout(minutes: float | None) -> timedelta:
    """``trainer.dist_timeout``: how long a collective may wait for a rank that neither answers
    nor fails (a hang, a lost node) before the process group gives up; null: 30 minutes."""
    if minutes is None:
        return TIMEOUT
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0:
        raise ConfigError(
            f"trainer.dist_timeout={minutes!r} must be a number of minutes > 0 (null: 30); it "
            "bounds how long every rank waits for one that hangs"
        )
    return timedelta(minutes=minutes)


def init_distributed(device: str = "auto", timeout: timedelta = TIMEOUT) -> DistEnv:
    """Resolve ``device`` for this process, join the process group the launcher describes (none
    for a single process) with that device's backend and collective ``timeout``, and describe
    the process."""
    world_size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        check_local_rank(dev.index or 0, torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=process_group_backend(dev.type),
            store=_attempt_store(_launcher_store()),
            rank=int(os.environ["RANK"]),
            world_size=world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(get_rank(), local_rank, get_world_size(), dev)


def _attempt_store(store: dist.Store) -> dist.Store:
    """The keys of this attempt only: torchrun's store keeps those of a crashed first attempt,
    whose addresses (and failures) a restarted rank must not read."""
    return dist.PrefixStore(f"semseg/attempt{elastic_restart_count()}/", store)


def _launcher_store() -> dist.Store:
    """The key-value store at ``MASTER_ADDR:MASTER_PORT`` (one client per process).

    torchrun's agent serves it, and it outlives the workers; other launchers (SLURM tasks) leave
    it to rank 0, which then serves it for as long as its process lives.
    """
    global _STORE
    if _STORE is None:
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        _STORE = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            env_world_size(),
            is_master=int(os.environ["RANK"]) == 0 and not agent_store,
            timeout=TIMEOUT,
        )
    return _STORE


def agree_on(key: str, value: str) -> str:
    """Rank 0's ``value`` for ``key`` on every rank, before any process group exists.

    Through the launcher's store: under torchrun it outlives the workers, so processes restarted
    after a failure (``--max-restarts``) get the value of the first start (the same run folder).
    Without a launcher the value itself.
    """
    if env_world_size() <= 1:
        return value
    store = dist.PrefixStore("semseg/agreed/", _launcher_store())
    if int(os.environ["RANK"]) == 0:
        store.compare_set(key, "", value)  # the first start's value stays
    else:
        store.wait([key])
    return store.get(key).decode()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks (one host sync)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running stats drift apart per rank between
    DDP's own broadcasts; evaluation and checkpoints must see the ones rank 0 saves)."""
    if not dist.is_initialized():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)


def destroy() -> None:
    """Leave the process group (every way out of a run: the other ranks are not left waiting)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else itself."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (a new tensor; ``tensor`` itself without a process
    group). Called by every rank in the same order, as any collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor / dist.get_world_size()
    dist.all_reduce(tensor)
    return tensor


# --------------------------------------------------------------------------------------------
# When one rank fails, the others leave: the failing rank publishes its one line in the
# launcher's store, and every rank's :class:`PeerFailureWatch` reads it. Leaving the process
# group releases peers blocked in a gloo collective at once, but NCCL collectives wait for the
# group's timeout (30 minutes): the watch ends such a process instead.

_FAILED, _FAILED_SEEN, _JOB_FAILED = "failed", "failed_seen", "semseg/job/failed"
FAILURE_POLL_S = 1.0  # how often each rank looks for a peer's failure
PEER_EXIT_GRACE_S = 10.0  # the time a rank gets to leave by itself after a peer failed
_SEEN_WAIT_S = 10.0  # how long a rank that serves the store waits for its peers to read it
_seen_failure: str | None = None  # a peer's line, once this process's watch has read it


def _store_client() -> dist.TCPStore:
    """A client of its own to the launcher's store (for the watch's thread)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=30),
        wait_for_workers=False,
    )


def _serves_store() -> bool:
    """Whether this process serves the store (rank 0 without torchrun: its exit ends the store)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and os.environ["RANK"] == "0"


def publish_failure(message: str, final: bool = False) -> None:
    """Tell the other ranks that this one stops with ``message`` (the first rank's stays).

    ``final``: a failure no restart can fix (:class:`~semseg.errors.UserError`); under torchrun
    it is also kept for the job's restarts (:func:`job_failure`), whose store outlives the
    workers, even where the disk is too full to record it in the run folder. A rank that serves
    the store waits up to 10 s for the others to read it before its exit takes the store away.
    Never raises: the store may be gone already.
    """
    if env_world_size() <= 1:
        return
    try:
        store = _launcher_store()
        attempt = _attempt_store(store)
        attempt.compare_set(_FAILED, "", message)
        if final and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store.compare_set(_JOB_FAILED, "", message)
        if not _serves_store():  # a rank that fails too needs no telling
            attempt.add(_FAILED_SEEN, 1)
            return
        deadline = time.monotonic() + _SEEN_WAIT_S
        while attempt.add(_FAILED_SEEN, 0) < env_world_size() - 1:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except (RuntimeError, OSError) as e:  # the store is gone: nobody is left to tell
        log.debug("could not publish the failure to the other ranks: %s", e)


def job_failure() -> str | None:
    """The line of a failure no restart can fix that an earlier attempt of this torchrun job
    published (None elsewhere: only torchrun's store outlives the workers)."""
    if env_world_size() <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        store = _launcher_store()
        return store.get(_JOB_FAILED).decode() if store.check([_JOB_FAILED]) else None
    except (RuntimeError, OSError):
        return None


def peer_failure(store: dist.Store | None = None) -> str | None:
    """The line another rank of this attempt stopped with, if one did (None without peers); once
    the watch has read it, also after the store is gone (its rank 0 ended)."""
    if _seen_failure is not None:
        return _seen_failure
    if env_world_size() <= 1:
        return None
    try:
        attempt = _attempt_store(store or _launcher_store())
        return attempt.get(_FAILED).decode() if attempt.check([_FAILED]) else None
    except (RuntimeError, OSError):
        return None


class PeerFailureWatch:
    """While training, a thread looks for a peer's failure every second. When one is published,
    this process gets 10 s to leave by itself (gloo releases it at once when the peer leaves
    the group); a process still there after that (blocked in an NCCL collective, which waits
    for the group's timeout) prints the peer's line and ends with exit code 2, as the peer did."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeerFailureWatch:
        if env_world_size() > 1:
            self._thread = threading.Thread(target=self._watch, name="peer-failure", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * FAILURE_POLL_S)

    def _watch(self) -> None:
        try:
            store = _store_client()
        except (RuntimeError, OSError):
            return
        while not self._stop.wait(FAILURE_POLL_S):
            try:
                message = peer_failure(store)
            except (RuntimeError, OSError):  # the store is gone (its process ended): stop
                return
            if message is None:
                continue
            global _seen_failure
            _seen_failure = message
            with contextlib.suppress(RuntimeError, OSError):
                _attempt_store(store).add(_FAILED_SEEN, 1)
            if self._stop.wait(PEER_EXIT_GRACE_S):
                return  # this process left by itself
            log.error("another rank failed and this one is still blocked: leaving (%s)", message)
            for handler in logging.getLogger().handlers:
                handler.flush()
            print(error_line(message), file=sys.stderr, flush=True)
            os._exit(2)
