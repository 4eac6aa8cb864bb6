"""ADMM-NN: projections are projections, the ADMM steps follow the formulas, constraints survive training,
the state stays identical across DDP ranks, and bad constraints fail with the layer named."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fxreduce as fr
from fxreduce.errors import InputError, OptionError, UnsupportedError
from fxreduce.testing.distributed import run_distributed
from fxreduce.training.admm import (ADMM, Schedule, exact_scale, project_joint, project_quantized, project_sparse,
                                    quantization_scale, train)


def _tensor(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _on_grid(x: torch.Tensor, scale: float, levels: int) -> bool:
    k = x / scale
    nonzero = k[x != 0]
    return bool(((nonzero == nonzero.round()) & (nonzero.abs() >= 1) & (nonzero.abs() <= levels)).all())


small_tensors = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 7))


@given(small_tensors, st.data())
def test_sparse_projection_is_the_nearest_point_with_k_nonzeros(seed_size, data):
    seed, size = seed_size
    x = _tensor(seed, (size,))
    keep = data.draw(st.integers(0, size))
    projected = project_sparse(x, keep)
    assert int((projected != 0).sum()) <= keep
    assert torch.equal(project_sparse(projected, keep), projected)
    best = min(float(((x - x * torch.tensor([i in s for i in range(size)])) ** 2).sum())
               for s in itertools.combinations(range(size), keep))
    assert float(((x - projected) ** 2).sum()) == pytest.approx(best, rel=1e-6, abs=1e-9)


@given(small_tensors, st.integers(1, 9), st.floats(0.05, 2.0))
def test_quantization_projection_is_the_nearest_on_grid_point(seed_size, levels, raw_scale):
    seed, size = seed_size
    x = _tensor(seed, (size,))
    x[0] = 0.0  # zeros stay zero
    scale = exact_scale(raw_scale)
    projected = project_quantized(x, scale, levels)
    assert projected[0] == 0 and _on_grid(projected, scale, levels)
    assert torch.equal(project_quantized(projected, scale, levels), projected)
    grid = torch.tensor([k * scale for k in range(-levels, levels + 1) if k])
    nearest = grid[(x[1:, None] - grid[None, :]).abs().argmin(1)]
    assert torch.allclose((x[1:] - projected[1:]).abs(), (x[1:] - nearest).abs())


@given(small_tensors, st.data(), st.integers(1, 4), st.floats(0.1, 1.5))
def test_joint_projection_is_the_nearest_sparse_on_grid_point(seed_size, data, levels, raw_scale):
    seed, size = seed_size
    x = _tensor(seed, (size,))
    keep = data.draw(st.integers(0, size))
    scale = exact_scale(raw_scale)
    projected = project_joint(x, keep, scale, levels)
    assert int((projected != 0).sum()) <= keep and _on_grid(projected, scale, levels)
    assert torch.equal(project_joint(projected, keep, scale, levels), projected)
    choices = [0.0] + [k * scale for k in range(-levels, levels + 1) if k]
    best = min(sum((float(x[i]) - v) ** 2 for i, v in enumerate(point))
               for point in itertools.product(choices, repeat=size) if sum(v != 0 for v in point) <= keep)
    assert float(((x - projected) ** 2).sum()) == pytest.approx(best, rel=1e-5, abs=1e-7)


@given(st.floats(1e-6, 1e3))
def test_exact_scale_makes_every_level_exact_in_float32(raw):
    q = exact_scale(raw)
    assert abs(q - raw) <= raw * 2**-16
    k = torch.arange(-127, 128, dtype=torch.float64)
    assert torch.equal((k.float() * q).double(), k * q)


def test_quantization_scale_scans_for_the_least_squared_error():
    x = _tensor(0, (400,))
    q = quantization_scale(x, 7)
    peak = float(x.abs().max())
    assert 0.9 * peak / 7 * (1 - 2**-16) <= q <= 1.1 * peak / 7
    error = float(((x - project_quantized(x, q, 7)) ** 2).sum())
    for factor in (0.9, 1.0, 1.1):
        other = exact_scale(factor * peak / 7)
        assert error <= float(((x - project_quantized(x, other, 7)) ** 2).sum())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(36, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(self.conv(x)), 1))))


def _batches(seed: int, count: int = 4):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(count)]


def test_selection_finds_layers_on_the_traced_graph_with_ratios_by_name_and_glob():
    torch.manual_seed(0)
    admm = ADMM(Net(), prune={"conv": 0.5, "fc*": 0.75}, levels={"fc2": 3})
    assert [(w.name, w.keep, w.levels) for w in admm.weights] == [
        ("conv.weight", 18, None), ("fc1.weight", 288, None), ("fc2.weight", 24, 3)]


def test_penalty_is_the_squared_norm_and_update_projects_w_plus_u():
    torch.manual_seed(0)
    model = Net()
    admm = ADMM(model, prune=0.5, rho=0.3)
    weight = admm.weights[1]
    weight.u = torch.randn_like(weight.u)
    with torch.no_grad():
        model.fc1.weight.add_(torch.randn_like(model.fc1.weight))
    expected = sum(0.15 * float(((w.parameter.detach() - w.z + w.u) ** 2).sum()) for w in admm.weights)
    assert float(admm.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    w, u = model.fc1.weight.detach().clone(), weight.u.clone()
    admm.update()
    assert torch.equal(weight.z, project_sparse(w + u, weight.keep))
    assert torch.allclose(weight.u, u + w - weight.z)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=0.05),
])
def test_pruned_weights_stay_zero_and_fixed_weights_stay_fixed(make_optimizer):
    torch.manual_seed(0)
    model = Net()
    admm = ADMM(model, prune=0.6, levels=4)
    optimizer = make_optimizer(model.parameters())

    def steps(count: int):
        for x, y in _batches(1, count):
            optimizer.zero_grad()
            (F.cross_entropy(model(x), y) + admm.penalty()).backward()
            optimizer.step()
            admm.after_step()

    steps(3)  # momentum builds up on weights that will be pruned
    admm.hard_prune()
    masks = [w.mask.clone() for w in admm.weights]
    steps(4)
    for w, mask in zip(admm.weights, masks):
        assert torch.equal(w.parameter.detach()[~mask], torch.zeros(int((~mask).sum())))
    admm.start_quantization()
    steps(2)
    admm.fix_closest(0.5)
    fixed = [(w.fixed.clone(), w.parameter.detach().clone()) for w in admm.weights]
    steps(4)
    for w, (mask, values) in zip(admm.weights, fixed):
        assert int(mask.sum()) >= 0.5 * int(w.mask.sum())
        assert torch.equal(w.parameter.detach()[mask], values[mask])
        assert _on_grid(values[mask], w.scale, w.levels)


def test_ready_loop_meets_the_constraints_and_lowers_to_int8_exactly():
    torch.manual_seed(0)
    model = Net()
    admm = ADMM(model, prune={"conv": 0.5, "fc1": 0.9, "fc2": 0.5}, levels=5, rho=1e-2, rho_growth=1.3)
    history = train(model, admm, _batches(2), F.cross_entropy, torch.optim.Adam(model.parameters(), lr=1e-2),
                    Schedule(2, 1, 1, (0.5,), 1, 2), progress=False)
    assert [r.phase for r in history.epochs][:3] == ["admm-prune", "admm-prune", "retrain"]
    for w in admm.weights:
        assert w.nonzeros <= w.keep and _on_grid(w.parameter.detach(), w.scale, w.levels)
    admm.remove_hooks()
    gm = fr.trace(model, (torch.randn(2, 1, 8, 8),))
    lowered = fr.apply(gm, "lower_int8").graph_module
    for w in admm.weights:
        assert torch.equal(lowered.get_submodule(w.layer).dequantized_weight(), w.parameter.detach())


def test_lstm_projections_are_selected():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(6, 8, num_layers=2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    admm = ADMM(Tagger(), prune=0.5)
    assert [w.name for w in admm.weights] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
                                              "lstm.weight_hh_l1", "head.weight"]


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_prune_ratio_outside_the_unit_interval_names_the_layer(ratio):
    with pytest.raises(OptionError, match=r"prune ratio .* of layer fc1 is outside \[0, 1\)"):
        ADMM(Net(), prune={"fc1": ratio})


@pytest.mark.parametrize("levels", [0, 128, 2.5])
def test_levels_outside_1_to_127_name_the_layer(levels):
    with pytest.raises(OptionError, match=r"levels n=.* of layer fc2 must be an integer in 1\.\.127"):
        ADMM(Net(), levels={"fc2": levels})


def test_a_layer_without_weight_is_named():
    with pytest.raises(UnsupportedError, match=r"layer 'pool' \(MaxPool2d\) has no weight to prune"):
        ADMM(Net(), prune={"pool": 0.5})
    with pytest.raises(InputError, match=r"no selected .* matches 'fc9'.*conv, fc1, fc2"):
        ADMM(Net(), prune={"fc9": 0.5})

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    with pytest.raises(UnsupportedError, match=r"layer 'linear' computes its weight in the graph"):
        ADMM(Computed(), prune={"linear": 0.5})


def test_targets_that_prune_a_whole_layer_away_are_refused():
    with pytest.raises(InputError, match=r"keeps none of the 96 weights of layer fc2"):
        ADMM(Net(), prune={"fc2": 0.999})
    model = Net()
    with torch.no_grad():
        model.fc2.weight.mul_(1e-6)
    with pytest.raises(InputError, match=r"global target 10x keeps none of the 96 weights of layer fc2"):
        ADMM(model, reduction=10)


def _admm_under_ddp(rank, world_size):
    torch.manual_seed(0)
    net = Net()
    model = DistributedDataParallel(net)
    admm = ADMM(net, prune=0.7, rho=1e-2, rho_growth=1.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step, (x, y) in enumerate(_batches(100 + rank, 6)):  # each rank sees its own data
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + admm.penalty()).backward()
        optimizer.step()
        if step % 2 == 1:
            admm.update()
    local = torch.tensor([float(F.cross_entropy(model(x), y)) for x, y in _batches(100 + rank, 1)])
    # Without DDP the ranks' weights drift apart; Z and U must still agree (rank 0's W + U is projected).
    torch.manual_seed(rank)
    alone = Net()
    solo = ADMM(alone, prune=0.7)
    with torch.no_grad():
        alone.fc1.weight.add_(rank)
    solo.update()
    return ([w.z for w in admm.weights], [w.u for w in admm.weights], [p.detach() for p in net.parameters()], local,
            [w.z for w in solo.weights] + [w.u for w in solo.weights])


@pytest.mark.slow
def test_z_and_u_stay_identical_across_ddp_ranks():
    (z0, u0, p0, loss0, solo0), (z1, u1, p1, loss1, solo1) = run_distributed(_admm_under_ddp, 2)
    assert all(torch.equal(a, b) for a, b in zip(z0 + u0 + p0, z1 + u1 + p1, strict=True))
    assert any(bool(u.abs().sum() > 0) for u in u0)
    assert not torch.equal(loss0, loss1)  # the ranks really saw different data
    assert all(torch.equal(a, b) for a, b in zip(solo0, solo1, strict=True))


def test_example_smoke_run():
    path = Path(__file__).resolve().parents[2] / "examples" / "admm_lenet5.py"
    spec = importlib.util.spec_from_file_location("admm_lenet5", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    figures = example.main(["--quick"])
    assert figures["exact"] and figures["reduction"] >= 20 and figures["storage"] > figures["reduction"]
