"""Measuring this machine for the latency model: ``fxreduce calibrate`` / ``fr.calibrate()``.

Micro-benchmarks of the kernels graphs call, each timed in blocks long enough to swamp the clock and
summarised by the median block: float32 GEMM (F.linear) over an (M, N, K) grid; convolutions of four
classes (pointwise, spatial, strided, depthwise) over a grid of their implicit-GEMM sizes; fxreduce's
int8 Linear and Conv2d (fbgemm); memory bandwidth of an elementwise op at sizes from L1 to DRAM;
activations that compute more than they move, by output elements; max and average pooling by window
reads; fxreduce's own kernels (the fused low-rank product, the LSTM time loop forward and backward, the
indirect-K GEMM and its gradients); one-row products streaming weights of 1-128 MB; the overheads of a
Python call, an aten dispatch and an nn.Module call; each kernel class's fixed cost per call; and, for
torch.nn's common layers and AntMan's factorised modules, the Python work of one call beyond the kernels
it runs. The grids are swept twice, each cell keeping its faster sweep. The result is a
:class:`~fxreduce.cost_models.latency.Profile`, written atomically as versioned JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import native
from .cost_models.latency import (GATHER_CLASSES, LSTM_CLASSES, Grid, Machine, Profile, default_profile_path,
                                  module_class_name, module_seconds, monotone_grid)
from .measurement import keep_freed_memory
from .modules.factorized import factorize
from .modules.int8 import Int8Conv2d, Int8Linear


@dataclass(frozen=True)
class Plan:
    """What to measure: grid axes and the time each measurement aims for."""

    gemm_ms: tuple[int, ...]
    gemm_ns: tuple[int, ...]
    gemm_ks: tuple[int, ...]
    int8_ms: tuple[int, ...]
    int8_ns: tuple[int, ...]
    conv_batches: tuple[int, ...]
    conv_channels: tuple[int, ...]
    conv_sizes: tuple[int, ...]
    bandwidth_elements: tuple[int, ...]
    activation_elements: tuple[int, ...]
    pooling_shapes: tuple[tuple[int, int, int, int], ...]
    stream_widths: tuple[int, ...]
    lowrank_rows: tuple[int, ...]
    lowrank_ranks: tuple[int, ...]
    lowrank_widths: tuple[int, ...]
    lstm_rows: tuple[int, ...]
    lstm_hidden: tuple[int, ...]
    lstm_keeps: tuple[float, ...]
    lstm_steps: tuple[int, int]  # a short and a long sequence: their difference is the per-step time
    gather_groups: tuple[int, ...]  # steps of the indirect-K GEMMs, each of gather_rows rows
    gather_rows: int
    gather_outs: tuple[int, ...]
    gather_kept: tuple[int, ...]
    block_seconds: float
    blocks: int
    passes: int


FULL = Plan(gemm_ms=(1, 4, 8, 16, 64, 256, 1024), gemm_ns=(16, 64, 256, 512, 1024, 2048, 4096),
            gemm_ks=(16, 64, 256, 512, 1024, 2048, 4096), int8_ms=(1, 8, 64, 512), int8_ns=(64, 256, 1024, 4096),
            conv_batches=(1, 8), conv_channels=(16, 64, 256), conv_sizes=(7, 14, 28, 56),
            bandwidth_elements=(1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22, 1 << 24),
            activation_elements=(1 << 10, 1 << 14, 1 << 18, 1 << 22),
            pooling_shapes=((1, 16, 8, 8), (1, 32, 28, 28), (1, 64, 56, 56), (8, 64, 56, 56), (8, 64, 112, 112)),
            stream_widths=(512, 1024, 2048, 2896, 4096, 5792), lowrank_rows=(64, 256, 1024),
            lowrank_ranks=(16, 64, 256), lowrank_widths=(640, 2560, 7680), lstm_rows=(1, 16, 64),
            lstm_hidden=(128, 384, 768), lstm_keeps=(0.5, 1.0), lstm_steps=(2, 10), gather_groups=(4, 16),
            gather_rows=20, gather_outs=(256, 2048), gather_kept=(64, 512), block_seconds=0.005, blocks=3, passes=2)
TINY = Plan(gemm_ms=(1, 16), gemm_ns=(8, 32), gemm_ks=(8, 32), int8_ms=(1, 16), int8_ns=(16, 32),
            conv_batches=(1,), conv_channels=(4, 8), conv_sizes=(4, 8), bandwidth_elements=(1 << 8, 1 << 12),
            activation_elements=(1 << 8, 1 << 12),
            pooling_shapes=((1, 4, 8, 8), (1, 8, 16, 16)), stream_widths=(64, 128), lowrank_rows=(64,),
            lowrank_ranks=(4, 8), lowrank_widths=(40, 80), lstm_rows=(1, 4), lstm_hidden=(8, 16), lstm_keeps=(1.0,),
            lstm_steps=(1, 3), gather_groups=(2,), gather_rows=4, gather_outs=(16,), gather_kept=(8,),
            block_seconds=0.0005, blocks=2, passes=1)


def _seconds_per_call(fn: Callable[[], object], plan: Plan) -> float:
    """Median over ``plan.blocks`` blocks of the mean seconds per call, each block ~``plan.block_seconds``."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(10_000, math.ceil(plan.block_seconds / once)))
    means = []
    for _ in range(plan.blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls)
    return statistics.median(means)


def _sweep(cells: dict[Any, Callable[[], Callable[[], object]]], plan: Plan,
           step: Callable[[], None]) -> dict[Any, float]:
    """Seconds per call of every cell (a key and a maker of its call), the fastest of ``plan.passes`` sweeps
    over all of them: on a shared machine a neighbour's burst can slow one measurement by half, and sweeps
    tens of seconds apart rarely meet the same burst. A cell whose call takes five blocks' time or more is
    measured once: each of its blocks is already a single long call, and the largest GEMMs took a tenth of
    the calibration's minute in their second sweep."""
    fastest: dict[Any, float] = {}
    for sweep in range(plan.passes):
        for key, make in cells.items():
            if not sweep or fastest[key] < 5 * plan.block_seconds:
                fastest[key] = min(_seconds_per_call(make(), plan), fastest.get(key, math.inf))
            step()
    return fastest


def _gemm_cells(name: str, ms, ns, ks, make: Callable[[int, int, int], Callable[[], object]]) -> dict:
    return {(name, m, n, k): functools.partial(make, m, n, k) for m in ms for n in ns for k in ks}


def _gemm_grid(name: str, ms, ns, ks, measured: dict) -> Grid:
    seconds = [[[measured[(name, m, n, k)] for k in ks] for n in ns] for m in ms]
    return Grid(tuple(ms), tuple(ns), tuple(ks), monotone_grid(seconds))


def _linear(m: int, n: int, k: int) -> Callable[[], object]:
    x, layer = torch.randn(m, k), nn.Linear(k, n)
    return lambda: F.linear(x, layer.weight, layer.bias)


def _int8_weight(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, shape, dtype=torch.int8), torch.full((shape[0],), 0.01)


def _int8_linear(m: int, n: int, k: int) -> Callable[[], object]:
    x, layer = torch.randn(m, k), Int8Linear.from_int8(*_int8_weight(n, k), torch.zeros(n))
    return lambda: layer(x)


_CONV_KINDS = {  # class -> (kernel, stride, depthwise)
    "conv_pointwise": (1, 1, False), "conv_spatial": (3, 1, False), "conv_strided": (3, 2, False),
    "conv_depthwise": (3, 1, True), "int8_conv": (3, 1, False),
}


def _conv_shape(kind: str, channels: int, size: int) -> tuple[int, int, int, int]:
    """A conv of class ``kind`` on ``channels`` x ``size`` x ``size``: (groups, out size, and its implicit
    GEMM's N and K)."""
    kernel, stride, depthwise = _CONV_KINDS[kind]
    groups = channels if depthwise else 1
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return groups, out, channels // groups, (channels // groups) * kernel ** 2


def _conv(kind: str, batch: int, channels: int, size: int) -> Callable[[], object]:
    kernel, stride, _ = _CONV_KINDS[kind]
    groups = _conv_shape(kind, channels, size)[0]
    conv: nn.Module = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=groups)
    if kind == "int8_conv":
        conv = Int8Conv2d.from_int8(*_int8_weight(channels, channels // groups, kernel, kernel),
                                    torch.zeros(channels), stride=(stride, stride), padding=(kernel // 2,) * 2,
                                    dilation=(1, 1), groups=groups, input_range=(-3.0, 3.0),
                                    output_range=(-3.0, 3.0))
    x = torch.randn(batch, channels, size, size)
    return lambda: conv(x)


def _conv_cells(plan: Plan) -> dict:
    return {(kind, batch, channels, size): functools.partial(_conv, kind, batch, channels, size)
            for kind in _CONV_KINDS
            for batch, channels, size in itertools.product(plan.conv_batches, plan.conv_channels, plan.conv_sizes)}


def _conv_grid(kind: str, measured: dict) -> Grid:
    """A conv class measured over batch x channels x size, stored on its implicit-GEMM (M, N, K) axes.

    Channels in = channels out, so N and K move together; the grid's cells are the measured shapes, the
    cells between them interpolated like any other grid.
    """
    points = {}
    for (name, *shape), seconds in measured.items():
        if name == kind:
            batch, channels, size = shape
            groups, out, n, k = _conv_shape(kind, channels, size)
            points[(batch * out * out * groups, n, k)] = seconds
    return _grid_from_points(points)


def _lowrank(rows: int, rank: int, width: int) -> Callable[[], object]:
    """fxreduce's fused low-rank product over ``rows`` rows at ``rank``, in + out features = ``width`` split 1 : 4
    (a transformer MLP's first layer, an LSTM's gate matrix)."""
    features = width // 5
    x, first = torch.randn(rows, features), torch.randn(rank, features)
    second, bias = torch.randn(width - features, rank), torch.randn(width - features)
    return lambda: torch.ops.fxreduce.lowrank_linear(x, first, second, bias)


def _lstm(kind: str, steps: int, rows: int, hidden: int, keep: float) -> Callable[[], object]:
    """One call of fxreduce's LSTM time loop ``kind`` over ``steps`` steps, each step's product over its own
    random keep set of ``keep`` x ``hidden`` units (structured dropout's per-step recurrent masks), all units at
    keep 1."""
    ops, kept = torch.ops.fxreduce, max(1, round(keep * hidden))
    xp, h0, c0 = torch.randn(steps, rows, 4 * hidden), torch.zeros(rows, hidden), torch.zeros(rows, hidden)
    wt = torch.randn(hidden, 4 * hidden) * hidden ** -0.5
    index = None if kept == hidden else torch.rand(steps, hidden).argsort(1)[:, :kept].sort(1).values
    if kind == "lstm_forward":
        return lambda: ops.lstm_layer(xp, h0, c0, wt, index, 1 / keep, False)
    hs, c_last, acts, cs, tanh_cs = ops.lstm_layer(xp, h0, c0, wt, index, 1 / keep, False)
    dhs, dc_last = torch.randn_like(hs), torch.randn_like(c_last)
    return lambda: ops.lstm_layer_backward(dhs, dc_last, acts, cs, tanh_cs, hs, h0, c0, wt, index, 1 / keep, False)


def _gather(kind: str, groups: int, rows: int, out: int, kept: int) -> Callable[[], object]:
    """fxreduce's indirect-K GEMM ``kind`` (forward, input or weight gradient) over ``groups`` steps of ``rows``
    rows, each step reading its own random ``kept`` of 2 x ``kept`` weight rows (structured dropout at p=0.5)."""
    ops = torch.ops.fxreduce
    x, dout = torch.randn(groups, rows, kept), torch.randn(groups, rows, out)
    wt, bias = torch.randn(2 * kept, out), torch.randn(out)
    index = torch.rand(groups, 2 * kept).argsort(1)[:, :kept].sort(1).values
    if kind == "gather_forward":
        return lambda: ops.gather_matmul(x, wt, index, bias)
    if kind == "gather_input_grad":
        return lambda: ops.gather_matmul_input_grad(dout, wt, index, kept)
    return lambda: ops.gather_matmul_weight_grad(x, dout, index, 2 * kept)


def _native_cells(plan: Plan) -> dict:
    """fxreduce's own kernels (none without the native layer, whose ops then never run); each LSTM loop at a
    short and a long sequence."""
    if not native.available():
        return {}
    cells = {("lowrank", rows, rank, width): functools.partial(_lowrank, rows, rank, width)
             for rows in plan.lowrank_rows for rank in plan.lowrank_ranks for width in plan.lowrank_widths}
    cells.update({(kind, steps, rows, hidden, keep): functools.partial(_lstm, kind, steps, rows, hidden, keep)
                  for kind in LSTM_CLASSES for steps in plan.lstm_steps for rows in plan.lstm_rows
                  for hidden in plan.lstm_hidden for keep in plan.lstm_keeps})
    cells.update({(kind, groups, out, kept): functools.partial(_gather, kind, groups, plan.gather_rows, out, kept)
                  for kind in GATHER_CLASSES for groups in plan.gather_groups for out in plan.gather_outs
                  for kept in plan.gather_kept})
    return cells


def _native_grids(plan: Plan, measured: dict) -> tuple[dict[str, Grid], dict[str, float]]:
    """The low-rank product's grid on (rows, rank, in + out); each LSTM loop's time per step on (rows,
    4 x hidden, kept units), and its set-up per call (packing the recurrent weight) in seconds per weight byte;
    the indirect-K GEMMs on (rows, out, kept).

    A loop's call costs setup + steps x step: its two sequence lengths give both. Measured at H=650, 16 rows,
    the set-up was about 1 ms against 0.45 ms per step, so a grid timed at one short length would price the
    35-step loop of a language model twice too slow."""
    if not native.available():
        return {}, {}
    grids = {"lowrank": _grid_from_points({key[1:]: seconds for key, seconds in measured.items()
                                          if key[0] == "lowrank"})}
    short, long = plan.lstm_steps
    setups = {}
    for kind in LSTM_CLASSES:
        per_step, setup_rates = {}, []
        for rows, hidden, keep in itertools.product(plan.lstm_rows, plan.lstm_hidden, plan.lstm_keeps):
            brief, full = measured[(kind, short, rows, hidden, keep)], measured[(kind, long, rows, hidden, keep)]
            kept = max(1, round(keep * hidden))
            step = max((full - brief) / (long - short), full / long / 4)  # a noisy pair never prices a step at ~0
            per_step[(rows, 4 * hidden, kept)] = step
            setup_rates.append(max(full - long * step, 0.0) / (4 * 4 * hidden * kept))
        grids[kind] = _grid_from_points(per_step)
        setups[kind] = statistics.median(setup_rates)
    for kind in GATHER_CLASSES:
        grids[kind] = _grid_from_points({(key[1] * plan.gather_rows, key[2], key[3]): seconds
                                         for key, seconds in measured.items() if key[0] == kind})
    return grids, setups


def _with_fixed_cost(grid: Grid, overheads: float) -> Grid:
    """``grid`` with its kernel's fixed cost per call: its smallest measurement (whose arithmetic is a few
    hundred multiply-adds at most) less the Python call and dispatch every op is charged anyway."""
    return dataclasses.replace(grid, fixed=max(grid.seconds[0][0][0] - overheads, 0.0))


def _grid_from_points(points: dict[tuple[int, int, int], float]) -> Grid:
    """A full (M, N, K) grid from scattered measurements: each cell takes the throughput of the nearest
    measured point in log space, so interpolation never leaves what was measured."""
    ms, ns, ks = (tuple(sorted({key[axis] for key in points})) for axis in range(3))
    rates = {key: key[0] * key[1] * key[2] / seconds for key, seconds in points.items()}

    def nearest(m: int, n: int, k: int) -> tuple[int, int, int]:
        return min(points, key=lambda key: sum((math.log(a) - math.log(b)) ** 2 for a, b in zip(key, (m, n, k))))

    return Grid(ms, ns, ks, monotone_grid([[[m * n * k / rates[nearest(m, n, k)] for k in ks] for n in ns]
                                           for m in ms]))


def _bandwidth(plan: Plan, step: Callable[[], None]) -> tuple[tuple[int, float], ...]:
    pairs = []
    for elements in plan.bandwidth_elements:
        a, b = torch.randn(elements), torch.randn(elements)
        pairs.append((3 * elements * a.element_size(), _seconds_per_call(lambda: torch.add(a, b), plan)))
        step()
    return _running_minimum(pairs)


_BATCH_NORM_STATE = (torch.zeros(16), torch.ones(16), torch.ones(16), torch.zeros(16))  # mean, var, weight, bias
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid, "exp": torch.exp, "erf": torch.erf,
    "_softmax": functools.partial(torch.softmax, dim=-1), "_log_softmax": functools.partial(torch.log_softmax, dim=-1),
    "native_batch_norm": lambda x: F.batch_norm(x.view(1, 16, -1, 16), *_BATCH_NORM_STATE, training=False)}


def _activations(plan: Plan, step: Callable[[], None]) -> dict[str, tuple[tuple[int, float], ...]]:
    """Seconds of each activation by output elements (softmax over rows of 256; batch norm in eval mode over
    16 channels): their arithmetic, not the bytes they move, sets their time."""
    tables = {}
    for name, fn in _ACTIVATIONS.items():
        pairs = []
        for elements in plan.activation_elements:
            x = torch.randn(max(elements // 256, 1), min(elements, 256))
            pairs.append((x.numel(), _seconds_per_call(lambda: fn(x), plan)))
            step()
        tables[name] = _running_minimum(pairs)
    return tables


def _pooling(plan: Plan, step: Callable[[], None]) -> dict[str, tuple[tuple[int, float], ...]]:
    """Seconds of 3x3 / stride-2 max and average pooling by window elements read (outputs x 9): torch's
    CPU pooling runs far below the memory bandwidth, so the bytes it moves do not price it."""
    tables = {}
    for kind, pool in (("max_pool", F.max_pool2d), ("avg_pool", F.avg_pool2d)):
        pairs = []
        for shape in plan.pooling_shapes:
            x = torch.randn(shape)
            reads = pool(x, 3, 2, 1).numel() * 9
            pairs.append((reads, _seconds_per_call(lambda: pool(x, 3, 2, 1), plan)))
            step()
        tables[kind] = _running_minimum(pairs)
    return tables


def _weight_stream(plan: Plan, step: Callable[[], None]) -> tuple[tuple[int, float], ...]:
    """Seconds of a one-row float32 product by its (square) weight's bytes, 1 MB to 128 MB: how fast a weight
    streams from L2, the last-level cache or memory, the floor under every product's time."""
    pairs = []
    for width in plan.stream_widths:
        x, layer = torch.randn(1, width), nn.Linear(width, width, bias=False)
        pairs.append((4 * width * width, _seconds_per_call(lambda: F.linear(x, layer.weight), plan)))
        step()
    return _falling_rate(pairs)


def _falling_rate(pairs: list[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """(bytes, seconds) pairs with each size's rate raised to the fastest larger size's: a larger weight lives
    in the same or a slower level of memory, so it never streams faster per byte. Measured on the AVX2 machine,
    the 32 MB weight once streamed at 10 GB/s between 18 GB/s at 16 MB and 17 GB/s at 64 MB."""
    fastest, lowered = 0.0, []
    for size, seconds in reversed(pairs):
        if size / seconds >= fastest:
            fastest = size / seconds
            lowered.append((size, seconds))
        else:
            lowered.append((size, size / fastest))
    return tuple(reversed(lowered))


def _running_minimum(pairs: list[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """(size, seconds) pairs with each time lowered to the fastest larger size's: times never fall as sizes grow."""
    return tuple((size, min(seconds for _, seconds in pairs[index:])) for index, (size, _) in enumerate(pairs))


def _runtime_modules() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """A small instance of each module class graphs call whose Python work per call is not one of the
    measured kernels: torch.nn's common layers (BatchNorm's forward alone does a dozen checks in Python) and
    AntMan's factorised forms."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 64)
    forms = [factorize(dense, "lr", 8), factorize(dense, "group", groups=4)]
    forms += [factorize(dense, form, 8, 4) for form in ("sparse_lr", "lr_sparse", "grouped_shuffle")]
    rows = [(module, (4, 64)) for module in [dense] + forms]
    rows += [(module, (4, 64)) for module in (nn.LayerNorm(64), nn.GELU(), nn.Dropout(), nn.Softmax(-1), nn.Tanh())]
    images = [nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8),
              nn.ReLU(inplace=True), nn.ReLU(), nn.ReLU6(inplace=True), nn.SiLU(inplace=True), nn.Hardswish(),
              nn.Hardsigmoid(), nn.Sigmoid(), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1),
              nn.Flatten(), nn.Identity()]
    return rows + [(module.eval(), (1, 8, 4, 4)) for module in images]


def _module_calls(profile: Profile, plan: Plan, step: Callable[[], None]) -> dict[str, float]:
    """Each module class's cost per call beyond its priced aten ops, measured at a size where the kernels cost
    almost nothing (the median over the instances of a class)."""
    extra: dict[str, list[float]] = {}
    for module, shape in _runtime_modules():
        x = torch.randn(shape)
        measured = _seconds_per_call(lambda: module(x), plan)
        priced = module_seconds(profile, module, shape) - profile.module_call(module)
        extra.setdefault(module_class_name(module), []).append(max(measured - priced, 0.0))
        step()
    return {name: statistics.median(values) for name, values in extra.items()}


def _overheads(plan: Plan) -> tuple[float, float, float]:
    """(Python call, aten dispatch, nn.Module call) seconds: a one-element add from Python, the extra cost of
    a second aten op inside one call, and an identity module's call."""
    x, y = torch.randn(1), torch.randn(1)
    one = _seconds_per_call(lambda: torch.add(x, y), plan)
    two = _seconds_per_call(lambda: torch.addcmul(x, x, y), plan)
    identity = nn.Identity()
    module = _seconds_per_call(lambda: identity(x), plan)
    dispatch = max(min(two - one, one / 2), one / 10)
    return max(one - dispatch, 0.0), dispatch, module


BUSY_CORES_LIMIT = 0.5  # other processes' load above which calibrate warns that its timings are unreliable


def busy_cores(seconds: float = 0.25) -> float | None:
    """Cores the machine kept busy over ``seconds`` while this process slept: other processes' load (Linux's
    /proc/stat; None where it cannot be read)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # all but idle and iowait, all

    try:
        busy_before, total_before = sample()
        time.sleep(seconds)
        busy_after, total_after = sample()
    except (OSError, ValueError):
        return None
    return (busy_after - busy_before) / max(total_after - total_before, 1) * (os.cpu_count() or 1)


def _warn_if_busy() -> None:
    """Timings taken while other processes run are slow and uneven (a multi-threaded op waits for its
    descheduled threads), and the profile cannot tell afterwards: say so before measuring."""
    busy = busy_cores()
    if busy is not None and busy > BUSY_CORES_LIMIT:
        warnings.warn(f"fxreduce calibrate: other processes kept {busy:.1f} of {os.cpu_count()} cores busy as it "
                      "started; kernels timed under load run slower and more unevenly than on an idle machine, "
                      "and the profile will predict that. Calibrate again when the machine is idle.", stacklevel=3)


def calibrate(path: str | Path | None = None, *, quick: bool = False, threads: int | None = None,
              progress: bool = True) -> Profile:
    """Measure this machine and write its latency profile to ``path`` (default: the user's cache directory).

    ``quick`` measures a tiny grid (seconds; for tests). ``threads`` sets torch's thread count for the
    measurements, which the profile records (default: the current count).
    """
    plan = TINY if quick else FULL
    _warn_if_busy()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
    cells = {**_gemm_cells("gemm", plan.gemm_ms, plan.gemm_ns, plan.gemm_ks, _linear),
             **_gemm_cells("int8_gemm", plan.int8_ms, plan.int8_ns, plan.int8_ns, _int8_linear), **_conv_cells(plan),
             **_native_cells(plan)}
    total = (plan.passes * len(cells) + len(plan.bandwidth_elements) + 2 * len(plan.pooling_shapes)
             + len(_ACTIVATIONS) * len(plan.activation_elements)
             + len(plan.stream_widths) + len(_runtime_modules()))
    try:
        with torch.no_grad(), tqdm(total=total, desc="fxreduce calibrate", unit="kernel", disable=not progress,
                                   leave=False) as bar:
            step = functools.partial(bar.update, 1)
            call, dispatch, module = _overheads(plan)
            measured = _sweep(cells, plan, step)
            grids = {"gemm": _gemm_grid("gemm", plan.gemm_ms, plan.gemm_ns, plan.gemm_ks, measured),
                     "int8_gemm": _gemm_grid("int8_gemm", plan.int8_ms, plan.int8_ns, plan.int8_ns, measured),
                     **{kind: _conv_grid(kind, measured) for kind in _CONV_KINDS}}
            grids = {name: _with_fixed_cost(grid, call + dispatch) for name, grid in grids.items()}
            native_grids, lstm_setup = _native_grids(plan, measured)
            bandwidth = _bandwidth(plan, step)
            profile = Profile(Machine.current(), call, dispatch, module, bandwidth, {**grids, **native_grids},
                              datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              pooling=_pooling(plan, step), weight_stream=_weight_stream(plan, step),
                              lstm_setup=lstm_setup, activations=_activations(plan, step))
            profile = dataclasses.replace(profile, module_calls=_module_calls(profile, plan, step))
        profile.validate()
        profile.save(path if path is not None else default_profile_path())
        return profile
    finally:
        torch.set_num_threads(previous)
