"""fxreduce.measurement: the output error and latency `fxreduce apply` reports, and the benchmarks' timer."""

from __future__ import annotations

import torch
from torch import nn

from fxreduce.measurement import measure, shuffled_rounds, time_side_by_side


class Shifted(nn.Module):
    """The wrapped model's output plus a constant: a rewrite whose error is known exactly."""

    def __init__(self, model: nn.Module, shift: float):
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x):
        return self.model(x) + self.shift


def test_measure_reports_the_largest_output_difference_in_eval_mode_and_restores_modes():
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    after = Shifted(before, 0.25)
    x = torch.randn(5, 4)
    result = measure(before, after, (x,), repeats=3)
    # Dropout would make the two runs differ at random in training mode; in eval they differ by the shift.
    assert abs(result.max_error - 0.25) < 1e-6
    assert result.max_output == before.eval()(x).abs().max().item()
    assert result.before_seconds > 0 and result.after_seconds > 0 and result.speedup > 0
    assert result.input_shapes == ((5, 4),) and result.repeats == 3
    text = "\n".join(result.lines())
    assert "5x4" in text and "0.25" in text and "interleaved runs" in text


def test_measure_restores_each_modules_mode():
    before = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    before[1].eval()
    after = nn.Sequential(nn.Linear(2, 2)).train()
    measure(before, after, (torch.randn(1, 2),), repeats=1)
    assert before.training and before[0].training and not before[1].training and after.training


def test_every_candidate_follows_others_in_a_shuffled_order():
    rounds = shuffled_rounds(["a", "b", "c", "d"], 40)
    assert all(sorted(order) == ["a", "b", "c", "d"] for order in rounds)
    predecessors = {(order[i - 1], order[i]) for order in rounds for i in range(1, 4)}
    assert {before for before, after in predecessors if after == "b"} == {"a", "c", "d"}
    assert rounds == shuffled_rounds(["a", "b", "c", "d"], 40)  # seeded: the same schedule every run


def test_time_side_by_side_gives_a_median_per_candidate():
    calls = []
    times = time_side_by_side({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=5, warmup=1)
    assert set(times) == {"x", "y"} and calls.count("x") == 6 and calls.count("y") == 6


def _minor_faults_while(fill) -> int:
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_keep_freed_memory_reuses_freed_pages_instead_of_faulting_in_new_ones():
    import sys

    import pytest
    from fxreduce.measurement import keep_freed_memory
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()
    mib = 1 << 20
    # Three 20 MiB outputs, touched and freed together: glibc's default trims that much free memory at the
    # top of the heap back to the OS (measured: the next 20 MiB tensor then took 5088 page faults in 4 of 5
    # fresh processes); kept, the next one reuses the pages.
    outputs = [torch.empty(20 * mib // 4).fill_(1.0) for _ in range(3)]
    del outputs
    faults = _minor_faults_while(lambda: torch.empty(20 * mib // 4).fill_(2.0))
    assert faults < 512, f"{faults} page faults refilling 20 MiB after freeing 60: the memory went back to the OS"


def test_measure_says_when_the_original_outputs_are_all_zero():
    zero = nn.Linear(4, 3)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    text = "\n".join(measure(zero, zero, (torch.randn(2, 4),), repeats=1).lines())
    assert "compares nothing" in text
