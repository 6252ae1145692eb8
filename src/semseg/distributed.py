"""Process-group setup for torchrun (single or multi node) and SLURM, CPU (gloo) or CUDA (NCCL)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from semseg.runtime import resolve_device


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


def init_process_group(device: str = "auto") -> None:
    """Join the process group described by the environment (no-op for a single process)."""
    _export_slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=30)
    )


def init_distributed(device: str = "auto") -> DistEnv:
    """Initialise (if needed) and describe this process: rank, world size and its device."""
    init_process_group(device)
    return DistEnv(
        rank=get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=get_world_size(),
        device=resolve_device(device),
    )


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
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else itself."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
