"""Run a function on several gloo processes and collect what each returns (for tests),
and check a two-view loss on a batch split across those processes against one process.

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
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models import dist as ssl_dist


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


# --- a two-view loss on a split batch -----------------------------------------------------
#
# Each rank takes its rows of a global batch of embeddings (z_a, z_b) and of the inputs x of a
# linear layer (view-a rows, then view-b rows); the tests compare with one process.


def two_view_batch(n: int, dim: int, in_dim: int) -> tuple[Tensor, Tensor, Tensor, nn.Linear]:
    """Seeded embeddings ``z_a``, ``z_b`` (n, dim), the inputs ``x`` (2n, in_dim) of a linear
    layer (view-a rows, then view-b rows), and that layer, ``nn.Linear(in_dim, dim)``."""
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    x = torch.randn(2 * n, in_dim, generator=g)
    torch.manual_seed(0)
    return z_a, z_b, x, nn.Linear(in_dim, dim)


def loss_and_grads(
    loss_fn: Callable[[Tensor, Tensor], Tensor], z_a: Tensor, z_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``loss_fn(z_a, z_b)``, detached, and its gradients with respect to ``z_a`` and ``z_b``."""
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss = loss_fn(z_a, z_b)
    loss.backward()
    return loss.detach(), z_a.grad, z_b.grad


def single_process_grads(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    z_a: Tensor,
    z_b: Tensor,
    x: Tensor,
    linear: nn.Linear,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`loss_and_grads` on the whole batch, after backpropagating ``loss_fn`` through
    ``linear`` (both views in one forward pass), whose gradients are then in ``linear``."""
    loss_fn(*linear(x).chunk(2)).backward()
    return loss_and_grads(loss_fn, z_a, z_b)


def split_batch_grads(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    z_a: Tensor,
    z_b: Tensor,
    x: Tensor,
    linear: nn.Linear,
) -> dict[str, Any]:
    """On this rank and its rows of the global batch: the loss and gradients of
    :func:`loss_and_grads`, and the gradients of ``linear`` wrapped in DDP after
    backpropagating ``loss_fn`` on its outputs (both views in one forward pass)."""
    world, rank = ssl_dist.world_size(), ssl_dist.rank()
    n = len(z_a) // world
    rows = slice(rank * n, (rank + 1) * n)
    loss, grad_a, grad_b = loss_and_grads(loss_fn, z_a[rows], z_b[rows])
    x_a, x_b = x.chunk(2)
    ddp = DistributedDataParallel(linear)  # kept alive: its hooks all-reduce in backward
    p_a, p_b = ddp(torch.cat([x_a[rows], x_b[rows]])).chunk(2)
    loss_fn(p_a, p_b).backward()
    return {
        "world_size": world,
        "rank": rank,
        "loss": loss,
        "grad_a": grad_a,
        "grad_b": grad_b,
        "weight_grad": linear.weight.grad,
        "bias_grad": linear.bias.grad,
    }


def assert_gradients_match(
    results: list[dict[str, Any]],
    grad_a: Tensor,
    grad_b: Tensor,
    linear: nn.Linear,
    atol: float,
) -> None:
    """Each rank received WORLD x the single-process gradient for its own rows (see
    ``ssl_models.dist``), and DDP's averaging gives the single-process gradients of
    ``linear`` (on which the single-process loss has been backpropagated)."""
    for key, expected in (("grad_a", grad_a), ("grad_b", grad_b)):
        gathered = torch.cat([res[key] for res in results]) / len(results)
        assert torch.allclose(gathered, expected, atol=atol)
    for res in results:
        assert torch.allclose(res["weight_grad"], linear.weight.grad, atol=atol)
        assert torch.allclose(res["bias_grad"], linear.bias.grad, atol=atol)
