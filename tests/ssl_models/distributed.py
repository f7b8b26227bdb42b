"""Run a function on several gloo processes and collect what each returns (for tests).

    results = run_on_ranks(my_fn, world_size=2, tmp_path=tmp_path)   # my_fn(rank) -> dict

``my_fn`` must be a module-level function (it is pickled into the spawned processes); it
runs with the default process group initialised and returns a dict of tensors/numbers.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[[int], dict[str, Any]], world: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/init", rank=rank, world_size=world
    )
    try:
        torch.save(fn(rank), f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[[int], dict[str, Any]], world_size: int, tmp_path: Path
) -> list[dict[str, Any]]:
    """Spawn ``world_size`` gloo processes running ``fn(rank)``; return their results."""
    mp.spawn(_entry, args=(fn, world_size, str(tmp_path)), nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
