"""run_distributed must give each rank a working process group, return results, and fail loudly and boundedly."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fxreduce.errors import InputError
from fxreduce.testing.distributed import RankError, RankTimeoutError, run_distributed

# Rank functions live at module level: the spawned ranks import them by name.


def _whoami_and_sum_of_ranks(rank, world_size, tag):
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return rank, world_size, tag, dist.get_rank(), dist.get_world_size(), total.item()


def _train_ddp(rank, world_size, steps):
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(steps):
        x, target = torch.randn(8, 4, generator=data), torch.randn(8, 1, generator=data)
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return initial, [p.detach() for p in model.parameters()], losses


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 waits for a peer that never comes, so it must be killed


def _hang_on_rank_one(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


@pytest.mark.slow
def test_returns_each_ranks_result_in_rank_order_and_all_reduce_works():
    # One run checks both: each start of torch in fresh processes costs seconds.
    assert run_distributed(_whoami_and_sum_of_ranks, 2, "tag") == [
        (0, 2, "tag", 0, 2, 3.0),
        (1, 2, "tag", 1, 2, 3.0),
    ]


@pytest.mark.slow
def test_ddp_keeps_parameters_identical_across_ranks():
    (initial0, final0, losses0), (initial1, final1, losses1) = run_distributed(_train_ddp, 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(initial0, initial1, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(final0, final1, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(initial0, final0, strict=True))
    assert losses0 != losses1  # the ranks really saw different data


@pytest.mark.slow
def test_exception_on_a_rank_names_the_rank_and_carries_its_traceback():
    with pytest.raises(RankError, match="rank 1 of 2") as caught:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    assert caught.value.rank == 1
    assert "deliberate failure on rank one" in str(caught.value)
    assert "_fail_on_rank_one" in caught.value.remote_traceback


@pytest.mark.slow
def test_hung_rank_is_killed_after_the_timeout():
    start = time.monotonic()
    # Rank 0 may also still be starting on a loaded machine; rank 1 must be reported either way.
    with pytest.raises(RankTimeoutError, match=r"within 6 s \(ranks still running: \[(0, )?1\]\)"):
        run_distributed(_hang_on_rank_one, 2, timeout=6)
    assert time.monotonic() - start < 12


def test_lambda_and_local_functions_are_refused():
    def local(rank, world_size):
        return rank

    with pytest.raises(InputError, match="lambda"):
        run_distributed(lambda rank, world_size: rank)
    with pytest.raises(InputError, match="inside another function"):
        run_distributed(local)
