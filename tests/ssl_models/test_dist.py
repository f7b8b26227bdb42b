"""Two gloo processes on halves of a batch must reproduce single-process NT-Xent exactly."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models.dist import gather_with_grad, rank, world_size
from ssl_models.losses import nt_xent_loss

WORLD = 2
N, IN_DIM, DIM, T = 8, 6, 5, 0.5


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Linear]:
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(N, DIM, generator=g), torch.randn(N, DIM, generator=g)
    x = torch.randn(2 * N, IN_DIM, generator=g)  # view-a rows then view-b rows
    torch.manual_seed(0)
    return z_a, z_b, x, nn.Linear(IN_DIM, DIM)


def _embedding_loss_and_grads(z_a, z_b):
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss = nt_xent_loss(z_a, z_b, T)
    loss.backward()
    return loss.detach(), z_a.grad, z_b.grad


def _worker(r: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    try:
        z_a, z_b, x, linear = _data()
        n = N // WORLD
        rows = slice(r * n, (r + 1) * n)
        loss, grad_a, grad_b = _embedding_loss_and_grads(z_a[rows], z_b[rows])

        # Same loss through a DDP-wrapped layer; both views in one forward pass.
        ddp = DistributedDataParallel(linear)
        p_a, p_b = ddp(torch.cat([x[:N][rows], x[N:][rows]])).chunk(2)
        nt_xent_loss(p_a, p_b, T).backward()

        result = {
            "world_size": world_size(),
            "rank": rank(),
            "loss": loss,
            "grad_a": grad_a,
            "grad_b": grad_b,
            "weight_grad": linear.weight.grad,
            "bias_grad": linear.bias.grad,
        }
        torch.save(result, f"{out_dir}/rank{r}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [(res["rank"], res["world_size"]) for res in results] == [(0, WORLD), (1, WORLD)]

    z_a, z_b, x, linear = _data()
    loss, grad_a, grad_b = _embedding_loss_and_grads(z_a, z_b)
    p_a, p_b = linear(x).chunk(2)
    nt_xent_loss(p_a, p_b, T).backward()

    # The single-process loss is the mean of the per-rank losses.
    mean_loss = torch.stack([res["loss"] for res in results]).mean()
    assert torch.allclose(mean_loss, loss, atol=1e-6)
    # Each rank receives the sum over ranks of its rows' gradient, i.e. WORLD x the
    # single-process gradient (see ssl_models.dist); DDP's averaging undoes the factor.
    for key, expected in (("grad_a", grad_a), ("grad_b", grad_b)):
        gathered = torch.cat([res[key] for res in results]) / WORLD
        assert torch.allclose(gathered, expected, atol=1e-6)
    for res in results:
        assert torch.allclose(res["weight_grad"], linear.weight.grad, atol=1e-6)
        assert torch.allclose(res["bias_grad"], linear.bias.grad, atol=1e-6)


def test_gather_is_identity_outside_distributed():
    assert (world_size(), rank()) == (1, 0)
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_grad(x)
    assert torch.equal(y, x)
    weights = torch.randn(3, 4)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)
