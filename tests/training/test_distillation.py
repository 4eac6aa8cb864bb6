"""Distillation: the loss is the stated a*CE + b*T^2*KL + c*MSE, the loop trains, and under
DistributedDataParallel (2 gloo processes) equal shards train exactly as one process on the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fxreduce.errors import InputError
from fxreduce.testing.distributed import run_distributed
from fxreduce.training.distillation import DistillationLoss, distill, distillation_loss


@given(st.integers(0, 2**31 - 1), st.floats(0.5, 8.0), st.floats(0, 2), st.floats(0, 2), st.floats(0, 2))
def test_loss_is_the_stated_weighted_sum(seed, temperature, a, b, c):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    labels = torch.randint(0, 5, (2, 3), generator=generator)
    # Written out from the definitions, row by row.
    p_teacher = F.softmax(teacher.view(6, 5) / temperature, -1)
    log_student = F.log_softmax(student.view(6, 5) / temperature, -1)
    kl = (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean()
    ce = -F.log_softmax(student.view(6, 5), -1).gather(1, labels.view(6, 1)).mean()
    mse = ((student - teacher) ** 2).mean()
    expected = a * ce + b * temperature**2 * kl + c * mse
    actual = distillation_loss(student, teacher, labels, ce_weight=a, kd_weight=b, mse_weight=c, temperature=temperature)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def test_only_the_student_gets_gradients_and_a_perfect_student_has_zero_soft_loss():
    teacher = torch.randn(4, 7, requires_grad=True)
    student = teacher.detach().clone().requires_grad_()
    loss = DistillationLoss(0.0, 1.0, 1.0)(student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_bad_arguments_are_clear_errors():
    with pytest.raises(InputError, match="needs labels"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(InputError, match="differ in shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match="not all zero"):
        DistillationLoss(0.0, 0.0, 0.0)


def _problem(seed: int = 0):
    """A teacher, a narrower student and fixed (inputs, labels) batches of 8."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4))
    student = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 4))
    generator = torch.Generator().manual_seed(seed + 1)
    data = []
    for _ in range(6):
        x = torch.randn(8, 6, generator=generator)
        data.append((x, teacher(x).argmax(-1).detach()))
    return teacher, student, data


def test_the_loop_brings_the_student_towards_the_teacher():
    teacher, student, data = _problem()
    optimizer = torch.optim.Adam(student.parameters(), lr=0.03)
    teacher.train()
    losses = distill(student, teacher, data, optimizer, loss=DistillationLoss(0.5, 0.5, 0.1), epochs=10,
                     progress=False)
    assert losses[-1] < 0.6 * losses[0]
    assert teacher.training and student.training  # the teacher ran in eval mode and got its mode back


def _ddp_distill(rank, world_size, steps):
    teacher, student, data = _problem()
    model = DistributedDataParallel(student)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = [(x[rank::world_size], y[rank::world_size]) for x, y in data]
    distill(model, teacher, shard, optimizer, loss=DistillationLoss(0.3, 0.6, 0.1, 3.0), epochs=steps, progress=False)
    return [p.detach() for p in student.parameters()]


@pytest.mark.slow
def test_under_ddp_equal_shards_train_like_one_process_on_the_whole_batch():
    per_rank = run_distributed(_ddp_distill, 2, 2)
    teacher, student, data = _problem()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    distill(student, teacher, data, optimizer, loss=DistillationLoss(0.3, 0.6, 0.1, 3.0), epochs=2, progress=False)
    for a, b, single in zip(per_rank[0], per_rank[1], student.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, single.detach(), rtol=1e-5, atol=1e-6)
    # and training changed something: the comparison is not between two untouched copies
    _, fresh, _ = _problem()
    assert not math.isclose(float((per_rank[0][0] - fresh[0].weight.detach()).abs().max()), 0.0, abs_tol=1e-6)
