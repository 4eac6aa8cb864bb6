"""The latency model: profiles that round-trip and are refused when foreign or damaged, predictions that are
deterministic, monotone in work within an op class, and priced by the kernels a graph really calls."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxreduce as fr
from fxreduce import native
from fxreduce.cli import main
from fxreduce.cost_models.latency import (ACTIVATIONS, CONV_CLASSES, GATHER_CLASSES, GEMM_CLASSES, LSTM_CLASSES, Grid,
                                          Machine, Profile, load_profile, module_class_name, module_seconds,
                                          monotone_grid)
from fxreduce.errors import CostError, InputError, OptionError, ProfileError
from fxreduce.modules.dynamic_resolution import dynamic_resolution_parts

RATE = 1e10  # MACs per second of the synthetic profile
OVERHEAD = 1e-6
POOLING_RATES = {"max_pool": 1e8, "avg_pool": 4e8}  # window elements read per second


def _grid(ms=(1, 16, 256), ns=(16, 256, 4096), ks=(16, 256, 4096), rate=RATE, overhead=OVERHEAD) -> Grid:
    return Grid(ms, ns, ks, tuple(tuple(tuple(overhead + m * n * k / rate for k in ks) for n in ns) for m in ms))


def synthetic_profile(**changes) -> Profile:
    """A profile of a made-up machine whose kernels all run at RATE (int8 at 4 x RATE), for exact checks."""
    grids = {name: _grid() for name in GEMM_CLASSES + CONV_CLASSES}
    grids["int8_gemm"] = _grid(rate=4 * RATE)
    profile = Profile(Machine.current(), call_overhead=2e-6, op_overhead=OVERHEAD, module_overhead=1e-6,
                      bandwidth=((1 << 10, OVERHEAD + (1 << 10) / 1e10), (1 << 30, OVERHEAD + (1 << 30) / 1e10)),
                      grids=grids, created="test",
                      pooling={kind: ((1 << 10, OVERHEAD + (1 << 10) / rate), (1 << 30, OVERHEAD + (1 << 30) / rate))
                               for kind, rate in POOLING_RATES.items()})
    return dataclasses.replace(profile, **changes)


class MLP(nn.Module):
    def __init__(self, width: int = 64, hidden: int = 256):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_graph(hidden: int = 256):
    return fr.trace(MLP(hidden=hidden), (torch.randn(4, 64),), {"N": (0, 0)})


def test_a_profile_round_trips(tmp_path):
    profile = synthetic_profile()
    path = tmp_path / "profile.json"
    profile.save(path)
    assert load_profile(path) == profile


def test_a_missing_profile_says_to_calibrate(tmp_path):
    with pytest.raises(ProfileError, match="no profile.*fxreduce calibrate"):
        load_profile(tmp_path / "none.json")


def test_a_profile_from_another_machine_or_torch_is_refused_naming_both(tmp_path):
    path = tmp_path / "foreign.json"
    here = Machine.current()
    other_kernels = "avx2" if here.kernels == "none" else "none"
    synthetic_profile(machine=dataclasses.replace(here, cpu="Other CPU 9000", torch="1.0.0",
                                                  kernels=other_kernels)).save(path)
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    message = str(error.value)
    assert "'Other CPU 9000' vs " + repr(here.cpu) in message and f"'1.0.0' vs {here.torch!r}" in message
    assert f"kernels: {other_kernels!r} vs {here.kernels!r}" in message  # fxreduce's kernels' ISA, or none


@pytest.mark.skipif(not native.available(), reason="the digest is the native build's")
def test_a_profile_measured_on_other_kernel_sources_is_refused(tmp_path):
    here = Machine.current()
    isa, digest = here.kernels.split()
    assert isa == native.active_isa() and digest == native.sources_digest() and len(digest) == 12
    path = tmp_path / "old-kernels.json"
    synthetic_profile(machine=dataclasses.replace(here, kernels=f"{isa} 000000000000")).save(path)
    with pytest.raises(ProfileError, match=f"kernels: '{isa} 000000000000' vs '{isa} {digest}'"):
        load_profile(path)


def test_calibrate_warns_when_other_processes_keep_the_machine_busy(tmp_path, monkeypatch):
    from fxreduce import profiling

    monkeypatch.setattr(profiling, "busy_cores", lambda: 1.6)
    with pytest.warns(UserWarning, match=r"other processes kept 1\.6 of \d+ cores busy.*Calibrate again when"):
        fr.calibrate(tmp_path / "busy.json", quick=True, progress=False)
    monkeypatch.setattr(profiling, "busy_cores", lambda: 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr.calibrate(tmp_path / "idle.json", quick=True, progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/stat")
def test_busy_cores_reads_the_machines_load():
    from fxreduce import profiling

    busy = profiling.busy_cores(0.05)
    assert busy is not None and 0.0 <= busy <= os.cpu_count()


def test_a_profile_of_an_older_format_is_refused_naming_the_versions(tmp_path):
    path = tmp_path / "old.json"
    synthetic_profile().save(path)
    path.write_text(path.read_text().replace('"version": 4', '"version": 3'))
    with pytest.raises(ProfileError, match="format version 3, this fxreduce reads 4.*calibrate"):
        load_profile(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "field", "falling"])
def test_a_damaged_profile_is_refused(tmp_path, damage):
    path = tmp_path / "profile.json"
    synthetic_profile().save(path)
    text = path.read_text()
    data = json.loads(text)
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "field":
        del data["grids"]["gemm"]
        path.write_text(json.dumps(data))
    else:
        data["grids"]["gemm"]["seconds"][-1][-1][-1] = 1e-9
        path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="unreadable"):
        load_profile(path)


def test_a_failed_write_leaves_the_old_profile_whole(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    synthetic_profile().save(path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        synthetic_profile(created="new").save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["profile.json"]


@given(st.lists(st.lists(st.lists(st.floats(1e-7, 1.0), min_size=3, max_size=3), min_size=3, max_size=3),
                min_size=3, max_size=3),
       st.tuples(*[st.floats(1, 8192)] * 3), st.tuples(*[st.floats(1.0, 4.0)] * 3))
def test_predicted_time_never_falls_as_a_product_grows(seconds, shape, growth):
    grid = Grid((1, 16, 256), (16, 256, 4096), (16, 256, 4096), monotone_grid(seconds))
    grid.validate("test")
    small = grid.seconds_for(*shape, overhead=1e-8)
    large = grid.seconds_for(*(size * factor for size, factor in zip(shape, growth)), overhead=1e-8)
    assert large >= small * (1 - 1e-9)


@given(st.integers(1, 1 << 28), st.integers(1, 1 << 28))
def test_memory_time_never_falls_as_bytes_grow(smaller, larger):
    profile = synthetic_profile()
    smaller, larger = sorted((smaller, larger))
    assert profile.bytes_seconds(larger) >= profile.bytes_seconds(smaller) * (1 - 1e-9)


def test_a_linear_is_priced_as_its_gemm_and_wider_layers_cost_more():
    narrow, wide = (fr.cost(_mlp_graph(hidden)).latency(synthetic_profile(), N=64) for hidden in (256, 1024))
    for latency in (narrow, wide):
        kinds = {node.name: node.kind for node in latency.nodes}
        assert kinds["fc1"] == kinds["fc2"] == "gemm" and kinds["relu"] == "memory"
    fc1 = [next(node for node in latency.nodes if node.name == "fc1") for latency in (narrow, wide)]
    # At a constant rate a GEMM costs MACs / RATE, plus the overheads of its ops and its module call.
    overheads = fc1[0].ops * OVERHEAD + 2e-6 + 1e-6
    assert fc1[0].seconds == pytest.approx(64 * 64 * 256 / RATE + overheads, rel=0.05)
    assert fc1[1].seconds > 3 * fc1[0].seconds and wide.seconds > narrow.seconds


def test_predictions_are_deterministic_for_a_profile():
    gm, profile = _mlp_graph(), synthetic_profile()
    assert fr.cost(gm).latency(profile, N=8) == fr.cost(gm).latency(profile, N=8)


def test_int8_layers_are_priced_on_the_int8_grid():
    gm = _mlp_graph(1024)
    result = fr.apply(gm, "lower_int8")
    latency = fr.cost(result.graph_module).latency(synthetic_profile(), N=64)
    assert {node.kind for node in latency.nodes if node.name.startswith("fc")} == {"int8_gemm"}
    dense = fr.cost(gm).latency(synthetic_profile(), N=64)
    assert latency.seconds < dense.seconds


def test_convolutions_and_attention_are_priced_as_products():
    conv = fr.trace(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, 2, 1)),
                    (torch.randn(1, 3, 16, 16),), {"N": (0, 0)})
    modules = {node.name for node in conv.graph.nodes if node.op == "call_module"}
    kinds = [node.kind for node in fr.cost(conv).latency(synthetic_profile(), N=1).nodes if node.name in modules]
    assert kinds == ["conv", "conv", "conv"]

    class SelfAttention(nn.Module):
        def forward(self, x):
            return nn.functional.scaled_dot_product_attention(x, x, x)

    gm = fr.trace(SelfAttention(), (torch.randn(1, 2, 8, 64),), {"T": (0, 2)})
    short, long = (fr.cost(gm).latency(synthetic_profile(), T=t) for t in (64, 256))
    assert any(node.kind == "attention" for node in long.nodes)
    assert long.seconds > 8 * short.seconds * 0.9  # quadratic in T: 16x the products, plus linear overheads


def test_symbolic_dims_left_without_a_number_are_named():
    gm = fr.trace(nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    with pytest.raises(CostError, match="dims H, W are still symbolic.*H=8, W=8"):
        fr.cost(gm).latency(synthetic_profile(), N=1)
    with pytest.raises(CostError, match="unknown dim name"):
        fr.cost(gm).latency(synthetic_profile(), N=1, H=8, W=8, T=3)
    assert fr.cost(gm).at(N=1).latency(synthetic_profile(), H=8, W=8).dims == {"N": 1, "H": 8, "W": 8}


def test_a_graph_the_fake_run_cannot_follow_is_priced_from_its_symbolic_costs():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x[x[:, 0] > 0])

    gm = fr.trace(DataDependent(), (torch.randn(8, 32),))
    latency = fr.cost(gm).latency(synthetic_profile())
    assert latency.method == "symbolic costs" and "fake run stopped" in latency.note and latency.seconds > 0


def test_calibrate_writes_a_profile_the_model_reads(tmp_path):
    path = tmp_path / "profile.json"
    profile = fr.calibrate(path, quick=True, progress=False)
    assert load_profile(path) == profile and profile.machine == Machine.current()
    seconds = fr.cost(_mlp_graph()).latency(path, N=4).seconds
    assert math.isfinite(seconds) and seconds > 0


def test_the_cli_predicts_latency_and_names_a_missing_profile(tmp_path, capsys):
    path = tmp_path / "profile.json"
    synthetic_profile().save(path)
    assert main(["cost", "default", "--input-shape", "N,3,H=32,W=32", "--latency", "--profile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "predicted latency at N=1, H=32, W=32" in out and "conv" in out
    assert main(["cost", "default", "--latency", "--profile", str(tmp_path / "none.json")]) == 2
    assert "no profile" in capsys.readouterr().err


def test_multihead_attentions_fused_kernel_is_priced_as_its_products():
    attention = nn.MultiheadAttention(64, 4, batch_first=True).eval()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    gm = fr.trace(Block(), (torch.randn(1, 16, 64),), {"T": (0, 1)})
    short, long = (fr.cost(gm).latency(synthetic_profile(), T=t) for t in (64, 512))
    node = next(node for node in long.nodes if node.name == "attention")
    assert node.kind == "attention" and long.seconds > 4 * short.seconds


def test_the_report_shows_predicted_speedups_beside_the_flop_cut():
    result = fr.apply(_mlp_graph(1024), "lower_int8")
    assert "pipeline: predicted latency: no profile" in str(result.report)
    result.report.profile = synthetic_profile()
    lines = result.report.lines()
    rewrite = next(line for line in lines if line.startswith("  fc1 (Linear) + relu (relu) -> "))
    assert "FLOPs" in rewrite and "predicted" in rewrite and float(rewrite.rsplit("predicted ", 1)[1][:-1]) > 1
    assert any(line.startswith("pipeline: predicted latency at N=4: ") for line in lines)


def test_apply_prints_predicted_beside_measured(tmp_path, capsys):
    path = tmp_path / "profile.json"
    synthetic_profile().save(path)
    assert main(["apply", "default", "--pipeline", "lower_int8", "--input-shape", "N,3,H=32,W=32",
                 "--profile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pipeline: predicted latency at N=1, H=32, W=32" in out and "latency:" in out.split("measured on")[1]


def test_pooling_is_priced_by_the_window_elements_it_reads():
    gm = fr.trace(nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2)), (torch.randn(1, 8, 32, 32),),
                  {"N": (0, 0)})
    nodes = {node.name: node for node in fr.cost(gm).latency(synthetic_profile(), N=4).nodes}
    assert nodes["_0"].kind == nodes["_1"].kind == "pooling"
    max_reads, avg_reads = 4 * 8 * 16 * 16 * 9, 4 * 8 * 8 * 8 * 4
    overheads = OVERHEAD + 2e-6 + 1e-6  # dispatch, Python call, module call
    assert nodes["_0"].seconds == pytest.approx(max_reads / POOLING_RATES["max_pool"] + overheads, rel=1e-3)
    assert nodes["_1"].seconds == pytest.approx(avg_reads / POOLING_RATES["avg_pool"] + overheads, rel=1e-3)


def test_a_batched_product_runs_each_matrix_at_that_matrixs_own_throughput():
    rate = {1: RATE / 16, 16: RATE / 4, 256: RATE}  # small products run far below the peak
    seconds = tuple(tuple(tuple(OVERHEAD + m * n * k / rate[m] for k in (16, 256, 4096)) for n in (16, 256, 4096))
                    for m in (1, 16, 256))
    profile = synthetic_profile(grids={**synthetic_profile().grids, "gemm": Grid((1, 16, 256), (16, 256, 4096),
                                                                                 (16, 256, 4096), seconds)})

    class Batched(nn.Module):
        def forward(self, a, b):
            return torch.bmm(a, b)

    gm = fr.trace(Batched(), (torch.randn(16, 16, 256), torch.randn(16, 256, 256)))
    node = next(node for node in fr.cost(gm).latency(profile).nodes if node.name == "bmm")
    assert node.seconds == pytest.approx(16 * 16 * 256 * 256 / rate[16] + OVERHEAD + 2e-6, rel=1e-6)


def test_a_kernel_classs_fixed_cost_is_paid_once_per_call():
    fixed = 5e-5
    grids = {**synthetic_profile().grids}
    slower = tuple(tuple(tuple(value + fixed for value in cell) for cell in row) for row in _grid().seconds)
    grids["gemm"] = dataclasses.replace(_grid(), seconds=slower, fixed=fixed)
    profile = synthetic_profile(grids=grids)
    assert grids["gemm"].seconds_for(64, 256, 256, OVERHEAD) == pytest.approx(fixed + 64 * 256 * 256 / RATE)
    four = grids["gemm"].seconds_for(64, 256, 256, OVERHEAD, count=4)
    assert four == pytest.approx(fixed + 4 * 64 * 256 * 256 / RATE)
    with pytest.raises(ValueError, match="fixed cost"):
        dataclasses.replace(_grid(), fixed=1.0).validate("gemm")
    fc1 = next(node for node in fr.cost(_mlp_graph()).latency(profile, N=64).nodes if node.name == "fc1")
    assert fc1.seconds == pytest.approx(fixed + 64 * 64 * 256 / RATE + fc1.ops * OVERHEAD + 2e-6 + 1e-6, rel=0.05)


def test_a_weight_larger_than_the_grids_is_never_priced_faster_than_it_streams():
    stream = ((1 << 20, 1e-4), (1 << 27, 1.0))  # a weight past the cache streams slowly
    plain, floored = (fr.cost(_mlp_graph(4096)).latency(synthetic_profile(weight_stream=table), N=1)
                      for table in ((), stream))
    fc1 = [next(node for node in latency.nodes if node.name == "fc1") for latency in (plain, floored)]
    weight_bytes = 4 * 64 * 4096
    assert fc1[1].seconds > fc1[0].seconds
    assert fc1[1].seconds >= synthetic_profile(weight_stream=stream).weight_seconds(weight_bytes)


def test_a_small_weight_streams_at_the_rate_of_the_whole_models_weights():
    stream = ((1 << 20, 1e-5), (1 << 24, 1.6e-4), (1 << 26, 1e-2))  # cached up to 16 MB, memory beyond
    profile = synthetic_profile(weight_stream=stream)
    alone = fr.trace(nn.Linear(512, 512), (torch.randn(1, 512),), {"N": (0, 0)})  # 1 MB
    beside_a_large_one = fr.trace(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 1 << 15)),  # and 64 MB
                                  (torch.randn(1, 512),), {"N": (0, 0)})
    small = [next(node for node in fr.cost(gm).latency(profile, N=1).nodes if node.kind == "gemm")
             for gm in (alone, beside_a_large_one)]
    assert small[1].seconds > 4 * small[0].seconds


def test_a_module_is_priced_alone_like_inside_a_graph():
    profile = synthetic_profile()
    fc1 = next(node for node in fr.cost(_mlp_graph()).latency(profile, N=32).nodes if node.name == "fc1")
    assert module_seconds(profile, nn.Linear(64, 256), (32, 64)) == pytest.approx(fc1.seconds)


def test_lower_int8_keeps_float_where_the_profile_predicts_int8_slower(tmp_path):
    gm = _mlp_graph(1024)
    faster, slower = tmp_path / "int8_faster.json", tmp_path / "int8_slower.json"
    synthetic_profile().save(faster)
    profile = synthetic_profile()
    synthetic_profile(grids={**profile.grids, "int8_gemm": _grid(rate=RATE / 10)}).save(slower)
    lowered = fr.apply(gm, f"lower_int8(objective='latency', profile={str(faster)!r})").report.steps[0]
    assert len(lowered.rewrites) == 2 and not lowered.skipped
    kept = fr.apply(gm, f"lower_int8(objective='latency', profile={str(slower)!r})").report.steps[0]
    assert not kept.rewrites and [s.node for s in kept.skipped] == ["fc1", "fc2"]
    assert all("int8 predicted no faster" in s.reason and "on input 4x" in s.reason for s in kept.skipped)
    assert len(fr.apply(gm, "lower_int8").report.steps[0].rewrites) == 2  # the FLOP objective stays the default


def test_an_lstm_layer_is_priced_as_its_gemms():
    class LM(nn.Module):
        def __init__(self, hidden: int):
            super().__init__()
            self.lstm = nn.LSTM(64, hidden, 2)

        def forward(self, x):
            return self.lstm(x)[0]

    latencies = []
    for hidden in (64, 256):
        gm = fr.trace(LM(hidden), (torch.randn(35, 4, 64),), {"T": (0, 0), "N": (0, 1)})
        latency = fr.cost(gm).latency(synthetic_profile(), T=35, N=4)
        assert next(node for node in latency.nodes if node.name == "lstm").kind == "recurrent"
        latencies.append(latency.seconds)
    assert latencies[1] > 4 * latencies[0]


class WordLM(nn.Module):
    def __init__(self, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        self.embedding, self.lstm = nn.Embedding(100, 32), nn.LSTM(32, hidden, 2, dropout=dropout)
        self.drop, self.decoder = nn.Dropout(dropout), nn.Linear(hidden, 100)

    def forward(self, tokens):
        return self.decoder(self.drop(self.lstm(self.drop(self.embedding(tokens)))[0]))


@pytest.mark.skipif(not native.available(), reason="prices the native time loop, which needs fxreduce._C")
def test_fxreduces_lstms_are_priced_as_the_kernels_they_run_eagerly():
    gm = fr.trace(WordLM(), (torch.randint(0, 100, (35, 4)),), {"T": (0, 0)})
    dense = fr.apply(gm, "decompose_lstm").graph_module
    factorised = fr.apply(gm, "decompose_lstm,sparse_lowrank(flop_reduction=2)").graph_module
    priced = [fr.cost(g).latency(synthetic_profile(), T=35) for g in (dense, factorised)]
    assert [latency.method for latency in priced] == ["fake run", "fake run"]  # no fallback to symbolic costs
    assert next(node for node in priced[0].nodes if node.name.startswith("lstm")).kind == "recurrent"
    with torch._subclasses.fake_tensor.FakeTensorMode():  # outside a prediction, fake runs record the torch path
        assert not native.serves_eagerly(torch.empty(2, 2))


def test_a_module_class_is_charged_its_measured_call_cost(tmp_path):
    gm = _mlp_graph(1024)
    factorised = fr.apply(gm, "sparse_lowrank(flop_reduction=4)").graph_module
    node = next(node for node in factorised.graph.nodes if node.op == "call_module")
    name = module_class_name(factorised.get_submodule(node.target))
    plain, charged = (fr.cost(factorised).latency(synthetic_profile(module_calls=calls), N=4)
                      for calls in ({}, {name: 1e-3}))
    assert charged.seconds == pytest.approx(plain.seconds + 2 * (1e-3 - 1e-6))
    profile = fr.calibrate(tmp_path / "profile.json", quick=True, progress=False)
    measured = set(profile.module_calls)
    assert {"torch.nn.modules.linear.Linear", "torch.nn.modules.batchnorm.BatchNorm2d", name} <= measured
    assert set(profile.pooling) == {"max_pool", "avg_pool"} and profile.weight_stream


def test_sparse_lowrank_picks_the_form_predicted_fastest_and_skips_where_none_is(tmp_path):
    gm = _mlp_graph(1024)
    fast, overhead_bound = tmp_path / "fast.json", tmp_path / "overhead.json"
    synthetic_profile().save(fast)
    synthetic_profile(op_overhead=1e-3).save(overhead_bound)
    chosen = fr.apply(gm, f"sparse_lowrank(objective='latency', flop_reduction=4, profile={str(fast)!r})")
    step = chosen.report.steps[0]
    assert [r.rewrite.replaced for r in step.rewrites] == [["fc1"], ["fc2"]] and not step.skipped
    assert all("fastest of" in r.rewrite.what and "predicted" in r.rewrite.what for r in step.rewrites)
    assert chosen.report.certificate.proven
    kept = fr.apply(gm, f"sparse_lowrank(objective='latency', profile={str(overhead_bound)!r})").report.steps[0]
    assert not kept.rewrites and [s.node for s in kept.skipped] == ["fc1", "fc2"]
    assert all("no factorisation at 4x is predicted faster on this machine" in s.reason for s in kept.skipped)
    assert "fastest of" not in str(fr.apply(gm, "sparse_lowrank").report)  # the FLOP objective stays the default


def test_sparse_lowrank_keeps_the_form_option_unless_another_is_predicted_clearly_faster(tmp_path):
    gm = _mlp_graph(1024)

    def forms(low_rank_call: float) -> list[str]:
        path = tmp_path / f"{low_rank_call}.json"
        synthetic_profile(module_calls={"fxreduce.modules.factorized.LowRankLinear": low_rank_call}).save(path)
        result = fr.apply(gm, f"sparse_lowrank(objective='latency', flop_reduction=4, profile={str(path)!r})")
        return [r.rewrite.what for r in result.report.steps[0].rewrites]

    slightly_slower = forms(3.4e-6)  # lr 5-15% slower than the fastest grouped forms: within the model's error
    assert all(what.startswith("lr r=") and "kept form 'lr' within 1.2x of the fastest predicted" in what
               for what in slightly_slower)
    assert not any(what.startswith("lr r=") for what in forms(3e-5))  # lr clearly slower: the faster form wins


def test_sparse_lowrank_latency_objective_refuses_a_fixed_rank():
    with pytest.raises(OptionError, match="objective='latency' chooses the rank for a MAC reduction, but rank"):
        fr.Pipeline("sparse_lowrank(objective='latency', rank=4)")


def test_a_training_step_is_priced_as_forward_backward_and_update():
    gm = _mlp_graph(1024).eval()
    profile = synthetic_profile()
    forward = fr.cost(gm).latency(profile, N=64)
    step = fr.cost(gm, training=True).latency(profile, N=64)
    by_name = {node.name: node for node in step.nodes}
    assert step.method == "fake run (training step)" and {"backward", "update"} <= set(by_name)
    gemms = 64 * (64 * 1024 + 1024 * 64) / RATE
    assert forward.seconds == pytest.approx(gemms, rel=0.2)
    assert by_name["backward"].seconds == pytest.approx(2 * gemms, rel=0.35)
    assert step.seconds > 2.5 * forward.seconds
    assert not gm.training and all(p.grad is None for p in gm.parameters())


def test_training_step_prediction_sees_error_map_prunings_smaller_backward():
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    gm = fr.trace(model.train(), (torch.randn(4, 16, 32, 32),), {"N": (0, 0)})
    pruned = fr.apply(gm, "error_map_pruning(keep=0.25)").graph_module
    profile = synthetic_profile()
    dense, sparse = (fr.cost(g, training=True).latency(profile, N=16) for g in (gm, pruned))
    backward = [next(n.seconds for n in latency.nodes if n.name == "backward") for latency in (dense, sparse)]
    assert backward[1] < 0.6 * backward[0]
    forward = [sum(n.seconds for n in latency.nodes if n.name not in ("backward", "update"))
               for latency in (dense, sparse)]
    assert forward[1] == pytest.approx(forward[0], rel=0.25)


def test_onednns_lstm_backward_is_priced_as_its_gemms():
    """A training step of nn.LSTM prices mkldnn_rnn_layer_backward as its products (the recurrent one per step,
    the input's and both weights' gradients), about twice the layer's forward, not as the bytes it touches."""
    gm = fr.trace(WordLM(hidden=256).train(), (torch.randint(0, 100, (35, 16)),), {"T": (0, 0)})
    profile = synthetic_profile()
    step = fr.cost(gm, training=True).latency(profile, T=35)
    by_name = {node.name: node for node in step.nodes}
    forward = by_name["lstm"].seconds
    assert by_name["lstm"].kind == "recurrent"
    assert by_name["backward"].seconds == pytest.approx(2 * forward + by_name["decoder"].seconds * 2, rel=0.3)


def _drnet(resolutions=(32, 24, 16)):
    from torchvision.models import resnet18

    gm = fr.trace(resnet18().eval(), (torch.randn(2, 3, resolutions[0], resolutions[0]),), {"N": (0, 0)})
    return fr.apply(gm, f"dynamic_resolution(resolutions={resolutions})").graph_module


def test_drnets_dispatch_is_priced_at_the_resolution_shares_given():
    """The shares of images per resolution, named like the cost formula's symbols (p_<resolution>), group a fake
    run's batch as an eager run with those shares would; without them every image runs at the base size."""
    drnet, profile = _drnet(), synthetic_profile()
    cost = fr.cost(drnet)
    base = cost.latency(profile, N=20)
    assert "p_16, p_24 not given" in base.note
    at_base = cost.latency(profile, N=20, p_24=0.0, p_16=0.0)
    smallest = cost.latency(profile, N=20, p_24=0.0, p_16=1.0)
    mixed = cost.latency(profile, N=20, p_24=0.3, p_16=0.2)
    assert at_base.seconds == pytest.approx(base.seconds, rel=1e-3) and at_base.note == ""
    assert smallest.seconds < mixed.seconds < at_base.seconds
    dispatch = [next(n.seconds for n in latency.nodes if n.name == "resolution_dispatch")
                for latency in (at_base, mixed, smallest)]
    backbone = dynamic_resolution_parts(drnet).dispatch.backbone_macs  # MACs per image at 32, 24, 16 px
    mixed_macs = (10 * backbone[0] + 6 * backbone[1] + 4 * backbone[2]) / (20 * backbone[0])
    # The dispatch's time follows its backbone MACs (the synthetic machine runs every product at one rate).
    assert dispatch[1] / dispatch[0] == pytest.approx(float(mixed_macs), rel=0.15)


def test_drnet_shares_that_are_not_fractions_or_not_its_own_are_refused():
    drnet, profile = _drnet(), synthetic_profile()
    with pytest.raises(CostError, match=r"unknown dim name\(s\) p_20.*N, p_16, p_24"):
        fr.cost(drnet).latency(profile, N=8, p_20=0.5)
    with pytest.raises(InputError, match="not fractions of the batch"):
        fr.cost(drnet).latency(profile, N=8, p_24=0.7, p_16=0.6)


def test_device_queries_cost_nothing():
    """prim.device (asked by autograd and the optimizer many times a step) reads metadata, not the tensor."""
    from fxreduce.cost_models.latency import _Pricer

    tensor = torch.empty(1 << 20)
    assert _Pricer(synthetic_profile()).price(torch.ops.prim.device.default, (tensor,), {}, tensor.device) == (
        "view", 0.0)


def test_weight_stream_rates_never_rise_with_the_weights_size():
    from fxreduce.profiling import _falling_rate

    @given(st.lists(st.floats(1e-5, 1e-2), min_size=2, max_size=6))
    def check(times):
        pairs = [(1 << (20 + i), seconds) for i, seconds in enumerate(times)]
        lowered = _falling_rate(pairs)
        rates = [size / seconds for size, seconds in lowered]
        assert all(a >= b for a, b in zip(rates, rates[1:]))
        assert all(new <= old for (_, new), (_, old) in zip(lowered, pairs))  # only lowered, never raised
        assert lowered[-1] == pairs[-1] and [t for _, t in lowered] == sorted(t for _, t in lowered)

    check()


def test_activations_are_priced_at_their_own_measured_rate():
    rate = 1e8  # elements per second: far below what the bytes would take
    profile = synthetic_profile(activations={"sigmoid": ((1 << 10, OVERHEAD + (1 << 10) / rate),
                                                         (1 << 30, OVERHEAD + (1 << 30) / rate))})
    gm = fr.trace(nn.Sequential(nn.Sigmoid(), nn.ReLU()), (torch.randn(4, 4096),), {"N": (0, 0)})
    nodes = {node.name: node for node in fr.cost(gm).latency(profile, N=64).nodes}
    assert nodes["_0"].kind == "activation" and nodes["_1"].kind == "memory"
    assert nodes["_0"].seconds == pytest.approx(64 * 4096 / rate + OVERHEAD + 2e-6 + 1e-6, rel=1e-3)
    assert nodes["_0"].seconds > 10 * nodes["_1"].seconds
    without = {node.name: node for node in fr.cost(gm).latency(synthetic_profile(), N=64).nodes}
    assert without["_0"].kind == "memory"  # a profile without the op's rate prices its bytes
    with pytest.raises(ValueError, match="unknown activations relu"):
        synthetic_profile(activations={"relu": ((1, 1.0),)}).validate()


def _native_profile(rate: float = RATE, setup: float = 1e-9) -> Profile:
    """The synthetic machine with fxreduce's kernels' grids: each at ``rate`` (the LSTM loops per step)."""
    grids = {**synthetic_profile().grids, **{name: _grid(rate=rate) for name in ("lowrank", *GATHER_CLASSES)},
             **{name: _grid(rate=rate, overhead=0.0) for name in LSTM_CLASSES}}  # per step: no call overhead
    return synthetic_profile(grids=grids, lstm_setup={name: setup for name in LSTM_CLASSES})


@pytest.mark.skipif(not native.available(), reason="prices fxreduce's kernels, which need fxreduce._C")
def test_fxreduces_own_kernels_are_priced_from_their_own_grids():
    gm = fr.trace(nn.Sequential(nn.Linear(256, 1024)), (torch.randn(128, 256),), {"N": (0, 0)})
    factorised = fr.apply(gm, "sparse_lowrank(form='lr', rank=32)").graph_module
    node = [next(n for n in fr.cost(factorised).latency(_native_profile(rate), N=128).nodes if n.name.startswith("_0"))
            for rate in (RATE, RATE / 4)]
    assert node[0].kind == "native"  # the fused low-rank product, from 64 rows
    fused = 128 * 32 * (256 + 1024) / RATE
    assert node[1].seconds - node[0].seconds == pytest.approx(3 * fused, rel=1e-3)
    shuffled = fr.apply(gm, "sparse_lowrank(form='grouped_shuffle', rank=32, groups=4)").graph_module
    priced = [fr.cost(shuffled).latency(_native_profile(rate), N=128) for rate in (RATE, RATE / 4)]
    blocks = 128 * 32 * (256 + 1024) / 4 / RATE  # four blocks of rank 8 on the same grid: a quarter of the MACs
    assert priced[1].seconds - priced[0].seconds == pytest.approx(3 * blocks, rel=1e-3)

    lstm = fr.apply(fr.trace(WordLM(), (torch.randint(0, 100, (35, 4)),), {"T": (0, 0)}), "decompose_lstm").graph_module
    setup = 1e-6
    loops = [next(n for n in fr.cost(lstm).latency(profile, T=35).nodes if n.name.startswith("lstm"))
             for profile in (_native_profile(RATE, setup), _native_profile(RATE / 2, setup))]
    steps = 2 * 35 * 4 * 256 * 64 / RATE  # two layers' per-step products on the loop's grid
    assert loops[0].kind == "recurrent" and loops[1].seconds - loops[0].seconds == pytest.approx(steps, rel=1e-3)
    assert loops[0].seconds > 2 * setup * 4 * 256 * 64 + steps


@pytest.mark.skipif(not native.available(), reason="prices fxreduce's kernels, which need fxreduce._C")
def test_a_per_step_training_step_is_priced_on_the_indirect_k_kernels_it_runs():
    gm = fr.trace(WordLM(dropout=0.5).train(), (torch.randint(0, 100, (35, 4)),), {"T": (0, 0)})
    dropped = fr.apply(gm, "structured_dropout(p=0.5, mode='per_step', recurrent=True)").graph_module
    grids = _native_profile().grids
    slower = {**grids, **{name: _grid(rate=RATE / 4) for name in GATHER_CLASSES}}
    steps = [fr.cost(dropped, training=True).latency(profile, T=35) for profile in
             (_native_profile(), synthetic_profile(grids=slower, lstm_setup=_native_profile().lstm_setup))]
    assert steps[1].seconds > steps[0].seconds  # the stand-in keep sets are per step: gather_matmul runs
    assert {"native", "recurrent"} <= {node.kind for node in steps[0].nodes}
    assert all(p.grad is None for p in dropped.parameters())


@pytest.mark.skipif(not native.available(), reason="measures fxreduce's kernels, which need fxreduce._C")
def test_calibrate_measures_fxreduces_kernels_and_the_activations(tmp_path):
    profile = fr.calibrate(tmp_path / "profile.json", quick=True, progress=False)
    assert {"lowrank", *LSTM_CLASSES, *GATHER_CLASSES} <= set(profile.grids)
    assert set(profile.lstm_setup) == set(LSTM_CLASSES) and set(profile.activations) == set(ACTIVATIONS)
    assert profile.machine.kernels == f"{native.active_isa()} {native.sources_digest()}"
