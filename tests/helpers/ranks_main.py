"""Run under torchrun by :func:`helpers.distributed.train_rows_on_two_ranks`: train several
smoke configs one after the other in each rank, each in a process group of its own (over the
launcher's store, under a prefix of its own), so that one start-up serves every row. Each rank
writes ``rank<N>.json``: run id -> None, or the one line its training failed with."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helpers.configs import compose_smoke


def main(spec_path: str) -> None:
    from semseg.engine.trainer import train

    spec = json.loads(Path(spec_path).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False)  # fmt: skip  # torchrun's agent serves it
    torch.set_num_threads(1)
    results: dict[str, str | None] = {}
    for i, (run_id, run) in enumerate(spec["runs"].items()):
        try:
            cfg = compose_smoke(Path(spec["toy_root"]), Path(run["run_dir"]), *run["overrides"])
            group_store = dist.PrefixStore(f"row{i}/", store)
            dist.init_process_group("gloo", store=group_store, rank=rank, world_size=world_size)
            train(cfg)  # leaves the process group on every way out
            results[run_id] = None
        except Exception as e:
            results[run_id] = f"{type(e).__name__}: {e}".splitlines()[0]
            if dist.is_initialized():
                dist.destroy_process_group()
    (Path(spec_path).parent / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
