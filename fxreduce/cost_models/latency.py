"""Predicted latency: what a graph will take on this machine, before it runs.

A FLOP cut is not a time cut: a thin GEMM runs far below the machine's peak, int8 pays off on large
layers and little at batch 1, and every call has an overhead that small layers never amortise. The
model here prices each kernel a graph will call with throughputs measured on this machine
(:class:`Profile`, written by ``fxreduce calibrate``):

- the graph runs once on fake tensors at the requested dims (no arithmetic, no timing), and every aten
  op it dispatches is recorded with its shapes and attributed to its fx node;
- a matrix product (mm, addmm, bmm, attention and nn.MultiheadAttention's fused kernel, oneDNN's LSTM
  layer and fxreduce's LSTM time loop as their GEMMs, fxreduce's int8 GEMM, any op with a registered FLOP
  formula) costs its class's fixed cost plus MACs / throughput, the throughput interpolated in log space
  over the profile's (M, N, K) grid for its class, and never less than streaming its weight once; a
  convolution is priced as its implicit GEMM (M = N*Ho*Wo, N = out/groups, K = in/groups*kh*kw) on the
  grid of its class (pointwise, spatial, strided, depthwise);
- fxreduce's own kernels are priced from grids of their own, where the profile has them (measured with the
  native layer loaded): the fused low-rank product on (rows, rank, in + out), and the LSTM time loop
  (forward, inference priced alike, and backward) as a set-up per weight byte plus a time per step on
  (rows, 4 x hidden, kept hidden units), and the indirect-K GEMM and its two gradients on (rows, out, kept);
- a pooling window op (max or average pooling) costs its window reads at the rate measured for its kind;
- an activation that computes more than it moves (sigmoid, tanh, GELU, SiLU, hardswish, exp, softmax, eval-mode
  batch norm and the like) costs its output elements at the rate measured for it;
- every other op moves bytes (inputs read, outputs written) at the bandwidth measured for its size;
  a view moves nothing;
- every op pays the profile's dispatch overhead and every fx node its Python call overhead.

The graph's time is the sum along the execution order (one stream; torch's intra-op threads are in
the measured throughputs). Where the fake run cannot follow a graph (data-dependent control flow), each
node is priced from its symbolic cost instead, and the result says so.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .. import meta, native
from ..errors import CostError, InputError, ProfileError
from ..files import atomic_path

FORMAT = "fxreduce.latency-profile"
VERSION = 4
GEMM_CLASSES = ("gemm", "int8_gemm")
# fxreduce's own kernels' grids (a profile measured without the native layer lacks them)
LSTM_CLASSES = ("lstm_forward", "lstm_backward")
GATHER_CLASSES = ("gather_forward", "gather_input_grad", "gather_weight_grad")
_GATHER_GRIDS = {"gather_matmul": "gather_forward", "gather_matmul_input_grad": "gather_input_grad",
                 "gather_matmul_weight_grad": "gather_weight_grad"}
# The LSTM loop's grid by its op: inference runs the training forward's loop without keeping activations
_LSTM_GRIDS = {"lstm_layer_inference": "lstm_forward", "lstm_layer": "lstm_forward",
               "lstm_layer_backward": "lstm_backward"}
CONV_CLASSES = ("conv_pointwise", "conv_spatial", "conv_strided", "conv_depthwise", "int8_conv")
POOLING_KINDS = ("max_pool", "avg_pool")
# Elementwise ops whose arithmetic, not their bytes, sets their time on a CPU: each has its own measured rate
# (its in-place and out= forms share it). The LSTM LM's sigmoid ran at a third of the bandwidth's speed, and
# eval-mode batch norm at a quarter (shufflenet's 56 at batch 1: 1.3 ms measured, 0.36 ms by their bytes).
ACTIVATIONS = ("sigmoid", "tanh", "gelu", "silu", "hardswish", "hardsigmoid", "exp", "erf", "_softmax", "_log_softmax",
               "native_batch_norm")
_SAME_KERNEL = {"_native_batch_norm_legit_no_training": "native_batch_norm"}  # aten ops measured as another
aten = torch.ops.aten


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernels_identity() -> str:
    """fxreduce's native kernels as a profile records them: ISA and source digest, or "none"."""
    isa = native.active_isa()
    return "none" if isa is None else f"{isa} {native.sources_digest()}"


@dataclass(frozen=True)
class Machine:
    """What a profile's numbers hold for: the CPU, the vector ISA torch uses on it, threads, torch, and
    fxreduce's native kernels: their ISA and the digest of their sources ("avx2 3f2a9c1b0d4e"; "none" without
    them), so a profile measured before a kernel change is refused rather than pricing the old speed."""

    cpu: str
    isa: str
    threads: int
    torch: str
    kernels: str

    @classmethod
    def current(cls, threads: int | None = None) -> "Machine":
        return cls(cpu_name(), torch.backends.cpu.get_cpu_capability(), threads or torch.get_num_threads(),
                   torch.__version__.split("+")[0], kernels_identity())

    def differences(self, other: "Machine") -> list[str]:
        """Each field that differs, as 'field: this vs other'."""
        return [f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
                for name in ("cpu", "isa", "threads", "torch", "kernels")
                if getattr(self, name) != getattr(other, name)]


@dataclass(frozen=True)
class Grid:
    """Measured seconds per call over a log-spaced (M, N, K) grid; ``seconds[i][j][k]`` at (ms[i], ns[j], ks[k]).

    ``fixed`` is the kernel's own cost per call whatever its size (oneDNN's primitive set-up, a thread
    pool's wake-up), beyond the dispatch overhead priced for every op. Throughput (MACs / (seconds -
    overheads)) is interpolated in log space, clamped to the grid's range: past its largest sizes a
    product runs at the largest measured throughput.
    """

    ms: tuple[int, ...]
    ns: tuple[int, ...]
    ks: tuple[int, ...]
    seconds: tuple[tuple[tuple[float, ...], ...], ...]
    fixed: float = 0.0

    def validate(self, name: str) -> None:
        shape = (len(self.ms), len(self.ns), len(self.ks))
        axes = (self.ms, self.ns, self.ks)
        if min(shape) < 1 or any(list(axis) != sorted(set(axis)) or axis[0] < 1 for axis in axes):
            raise ValueError(f"grid {name}: axes must be increasing positive sizes")
        if (len(self.seconds), len(self.seconds[0]), len(self.seconds[0][0])) != shape or any(
                len(row) != shape[1] or any(len(cell) != shape[2] for cell in row) for row in self.seconds):
            raise ValueError(f"grid {name}: seconds do not match its axes {shape}")
        if any(not (value > 0 and math.isfinite(value)) for row in self.seconds for cell in row for value in cell):
            raise ValueError(f"grid {name}: every time must be a positive number")
        if monotone_grid(self.seconds) != self.seconds:
            raise ValueError(f"grid {name}: times must not fall as M, N or K grow")
        if not (math.isfinite(self.fixed) and 0 <= self.fixed <= self.seconds[0][0][0]):
            raise ValueError(f"grid {name}: its fixed cost must be between 0 and its smallest time")

    def log_throughput(self, i: int, j: int, k: int, overhead: float) -> float:
        macs = self.ms[i] * self.ns[j] * self.ks[k]
        return math.log(macs / max(self.seconds[i][j][k] - overhead, self.seconds[i][j][k] * 0.05))

    def seconds_for(self, m: float, n: float, k: float, overhead: float, count: int = 1) -> float:
        """Predicted seconds of ``count`` (m, n, k) products in one call (a batched GEMM runs each of its
        matrices at that matrix's own throughput), the dispatch ``overhead`` excluded, the fixed cost included."""
        if m * n * k * count <= 0:
            return 0.0
        corners = [_bracket(axis, value) for axis, value in ((self.ms, m), (self.ns, n), (self.ks, k))]
        log_rate = 0.0
        for (i, wi) in corners[0]:
            for (j, wj) in corners[1]:
                for (l, wl) in corners[2]:
                    log_rate += wi * wj * wl * self.log_throughput(i, j, l, overhead + self.fixed)
        return self.fixed + count * m * n * k / math.exp(log_rate)


def monotone_grid(seconds: Sequence[Sequence[Sequence[float]]]) -> tuple[tuple[tuple[float, ...], ...], ...]:
    """``seconds`` made non-decreasing along M, N and K: each cell at most every cell above it on each axis
    (a running minimum from the largest sizes down).

    A larger product never takes less time in the model, and log-space interpolation of a monotone grid
    stays monotone between its points. Lowering rather than raising: a noisy measurement is almost
    always too slow (a preempted thread), and one such stall must not spread to every larger size.
    """
    grid = [[list(cell) for cell in row] for row in seconds]
    sizes = (len(grid), len(grid[0]), len(grid[0][0]))
    for i in reversed(range(sizes[0])):
        for j in reversed(range(sizes[1])):
            for k in reversed(range(sizes[2])):
                above = [grid[i + 1][j][k]] if i + 1 < sizes[0] else []
                above += [grid[i][j + 1][k]] if j + 1 < sizes[1] else []
                above += [grid[i][j][k + 1]] if k + 1 < sizes[2] else []
                grid[i][j][k] = min([grid[i][j][k], *above])
    return tuple(tuple(tuple(cell) for cell in row) for row in grid)


def _bracket(axis: Sequence[int], value: float) -> list[tuple[int, float]]:
    """The grid indices around ``value`` and their linear weights in log space (clamped to the ends)."""
    if value <= axis[0]:
        return [(0, 1.0)]
    if value >= axis[-1]:
        return [(len(axis) - 1, 1.0)]
    upper = bisect.bisect_right(axis, value)
    lower = upper - 1
    weight = (math.log(value) - math.log(axis[lower])) / (math.log(axis[upper]) - math.log(axis[lower]))
    return [(lower, 1.0 - weight), (upper, weight)]


@dataclass(frozen=True)
class Profile:
    """This machine's measured kernel speeds: the latency model's only input besides the graph."""

    machine: Machine
    call_overhead: float
    op_overhead: float
    module_overhead: float
    bandwidth: tuple[tuple[int, float], ...]
    grids: Mapping[str, Grid]
    created: str = ""
    module_calls: Mapping[str, float] = field(default_factory=dict)
    pooling: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    weight_stream: tuple[tuple[int, float], ...] = ()
    lstm_setup: Mapping[str, float] = field(default_factory=dict)  # an LSTM loop's set-up, seconds per weight byte
    activations: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)  # (elements, seconds)

    def validate(self) -> None:
        for name in ("call_overhead", "op_overhead", "module_overhead"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        tables = [("bandwidth", self.bandwidth), *((f"pooling {kind}", t) for kind, t in self.pooling.items()),
                  *((f"activation {name}", t) for name, t in self.activations.items())]
        for name, table in tables + ([("weight_stream", self.weight_stream)] if self.weight_stream else []):
            if not table or any(size <= 0 or not (seconds > 0) for size, seconds in table):
                raise ValueError(f"{name} needs at least one (size, seconds) pair of positive numbers")
            sizes, times = zip(*table)
            if list(sizes) != sorted(set(sizes)) or list(times) != sorted(times):
                raise ValueError(f"{name} sizes must increase, and their times must not fall")
        unknown = set(self.pooling) - set(POOLING_KINDS)
        if unknown:
            raise ValueError(f"unknown pooling kinds {', '.join(sorted(unknown))} (known: {', '.join(POOLING_KINDS)})")
        unknown = set(self.activations) - set(ACTIVATIONS)
        if unknown:
            raise ValueError(f"unknown activations {', '.join(sorted(unknown))} (known: {', '.join(ACTIVATIONS)})")
        missing = [name for name in GEMM_CLASSES + CONV_CLASSES if name not in self.grids]
        if missing:
            raise ValueError(f"missing grids: {', '.join(missing)}")
        for name, grid in self.grids.items():
            grid.validate(name)
        if any(not (isinstance(value, float) and math.isfinite(value) and value >= 0)
               for value in self.module_calls.values()):
            raise ValueError("module_calls must map class names to non-negative seconds")
        if set(self.lstm_setup) - set(LSTM_CLASSES) or any(not (isinstance(value, float) and math.isfinite(value)
                                                                and value >= 0) for value in self.lstm_setup.values()):
            raise ValueError("lstm_setup must map LSTM loop grids to non-negative seconds per byte")

    def module_call(self, module: torch.nn.Module) -> float:
        """What one call of ``module`` costs beyond its aten ops: its class's measured Python work (fxreduce's
        runtime modules do more per call than a bare nn.Module), else the generic module overhead."""
        return self.module_calls.get(module_class_name(module), self.module_overhead)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created": self.created, "machine": asdict(self.machine),
                "call_overhead": self.call_overhead, "op_overhead": self.op_overhead,
                "module_overhead": self.module_overhead, "bandwidth": [list(pair) for pair in self.bandwidth],
                "grids": {name: asdict(grid) for name, grid in self.grids.items()},
                "module_calls": dict(self.module_calls),
                "pooling": {kind: [list(pair) for pair in table] for kind, table in self.pooling.items()},
                "weight_stream": [list(pair) for pair in self.weight_stream], "lstm_setup": dict(self.lstm_setup),
                "activations": {name: [list(pair) for pair in table] for name, table in self.activations.items()}}

    @classmethod
    def from_json(cls, data: Any) -> "Profile":
        """A profile from its JSON form; ValueError names what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("it is not an fxreduce latency profile")
        if data.get("version") != VERSION:
            raise ValueError(f"it has profile format version {data.get('version')!r}, this fxreduce reads {VERSION}")
        try:
            grids = {name: Grid(tuple(g["ms"]), tuple(g["ns"]), tuple(g["ks"]),
                                tuple(tuple(tuple(float(v) for v in cell) for cell in row) for row in g["seconds"]),
                                float(g["fixed"]))
                     for name, g in data["grids"].items()}
            profile = cls(Machine(**data["machine"]), float(data["call_overhead"]), float(data["op_overhead"]),
                          float(data["module_overhead"]), _pairs(data["bandwidth"]), grids,
                          str(data.get("created", "")),
                          {str(name): float(seconds) for name, seconds in data["module_calls"].items()},
                          {str(kind): _pairs(table) for kind, table in data["pooling"].items()},
                          _pairs(data["weight_stream"]),
                          {str(kind): float(rate) for kind, rate in data["lstm_setup"].items()},
                          {str(name): _pairs(table) for name, table in data["activations"].items()})
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
            raise ValueError(f"a field is missing or malformed ({type(error).__name__}: {error})") from None
        profile.validate()
        return profile

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON, atomically (a reader sees the old file or the new one, never half)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=1)

    def bytes_seconds(self, moved: float) -> float:
        """Seconds to move ``moved`` bytes through memory in one op, overhead excluded."""
        return self._table_seconds(self.bandwidth, moved)

    def weight_seconds(self, weight_bytes: float, resident_bytes: float = 0.0) -> float:
        """The least time a float32 product takes to stream a weight of ``weight_bytes`` from where it lives
        (L2, L3 or memory), measured as single-row products; 0 where the profile has no such table.

        A weight lives where the model's whole set of weights, ``resident_bytes``, fits: every forward
        cycles all of them through the caches, so a layer's small weight still comes from memory when the
        model's weights do not fit in the last-level cache."""
        if not self.weight_stream or weight_bytes <= 0:
            return 0.0
        footprint = max(weight_bytes, resident_bytes)
        return weight_bytes * self._table_seconds(self.weight_stream, footprint) / footprint

    def pooling_seconds(self, kind: str, window_reads: float) -> float | None:
        """Seconds of a pooling op of ``kind`` reading ``window_reads`` window elements, overhead excluded
        (None where the profile has no rate for that kind)."""
        table = self.pooling.get(kind)
        return self._table_seconds(table, window_reads) if table else None

    def activation_seconds(self, name: str, elements: float) -> float | None:
        """Seconds of the activation ``name`` writing ``elements`` outputs, overhead excluded (None where the
        profile has no rate for it)."""
        table = self.activations.get(name)
        return self._table_seconds(table, elements) if table else None

    def _table_seconds(self, table: tuple[tuple[int, float], ...], amount: float) -> float:
        """A (size, seconds) table's rate interpolated in log space at ``amount``, clamped at its ends."""
        if amount <= 0:
            return 0.0
        weights = _bracket([size for size, _ in table], amount)
        log_rate = sum(w * math.log(size / max(seconds - self.op_overhead, seconds * 0.05))
                       for (i, w) in weights for size, seconds in [table[i]])
        return amount / math.exp(log_rate)


def _pairs(table: Any) -> tuple[tuple[int, float], ...]:
    return tuple((int(size), float(seconds)) for size, seconds in table)


def module_class_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def default_profile_path(threads: int | None = None) -> Path:
    """Where ``fxreduce calibrate`` writes and the latency model reads: one profile per thread count."""
    root = os.environ.get("FXREDUCE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fxreduce")
    return Path(root) / f"latency-profile-{threads or torch.get_num_threads()}threads.json"


def load_profile(path: str | os.PathLike | None = None, *, check_machine: bool = True) -> Profile:
    """The profile at ``path`` (default: the one ``fxreduce calibrate`` wrote for torch's thread count).

    A missing, corrupt, or foreign profile (another CPU, ISA, thread count or torch) raises ProfileError
    naming both sides; it is never used silently.
    """
    path = Path(path) if path is not None else default_profile_path()
    if not path.is_file():
        raise ProfileError(f"no profile: no latency profile at {str(path)!r}", where=str(path),
                           fix="run `fxreduce calibrate` (about a minute) to measure this machine")
    try:
        profile = Profile.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as error:
        raise ProfileError(f"the latency profile {str(path)!r} is unreadable: {error}", where=str(path),
                           fix="run `fxreduce calibrate` again to rewrite it") from None
    if check_machine:
        here = Machine.current()
        different = profile.machine.differences(here)
        if different:
            raise ProfileError(f"the latency profile {str(path)!r} was measured on another setup "
                               f"({'; '.join(different)}; profile vs now)", where=str(path),
                               fix="run `fxreduce calibrate` on this machine with this torch and thread count")
    return profile


@dataclass(frozen=True)
class NodeLatency:
    """One fx node's predicted seconds, and what it was priced as."""

    name: str
    seconds: float
    kind: str
    ops: int


@dataclass(frozen=True)
class Latency:
    """A graph's predicted seconds at concrete dims (eval forward, or a training step), per node.

    A training step's backward is one entry, ``backward``, and the SGD update another, ``update``."""

    seconds: float
    nodes: tuple[NodeLatency, ...]
    dims: Mapping[str, int]
    method: str = "fake run"
    note: str = ""

    def __float__(self) -> float:
        return self.seconds

    def by_kind(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for node in self.nodes:
            totals[node.kind] = totals.get(node.kind, 0.0) + node.seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def lines(self, top: int = 8) -> list[str]:
        dims = ", ".join(f"{name}={value}" for name, value in self.dims.items())
        lines = [f"predicted latency{' at ' + dims if dims else ''}: {_format_seconds(self.seconds)} "
                 f"({self.method}{'; ' + self.note if self.note else ''})"]
        lines.append("  by kind: " + ", ".join(f"{kind} {_format_seconds(seconds)}"
                                               for kind, seconds in self.by_kind().items()))
        for node in sorted(self.nodes, key=lambda n: -n.seconds)[:top]:
            lines.append(f"  {node.name:<32} {_format_seconds(node.seconds):>10}  {node.kind}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(size) for size in value.shape)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _conv_class(weight_shape: Sequence[int], stride: Sequence[int], groups: int, in_channels: int) -> str:
    if groups > 1 and groups == in_channels:
        return "conv_depthwise"
    if any(int(s) > 1 for s in stride):
        return "conv_strided"
    return "conv_pointwise" if all(int(k) == 1 for k in weight_shape[2:]) else "conv_spatial"


def _conv_gemm(input_shape, weight_shape, output_shape, groups) -> tuple[int, int, int]:
    """A convolution as its implicit GEMM: M output pixels, N output channels, K reduction length (per group)."""
    m = output_shape[0] * _numel(output_shape[2:]) * groups
    return m, weight_shape[0] // groups, weight_shape[1] * _numel(weight_shape[2:])


class _Pricer:
    """Prices one aten op from its shapes with a profile."""

    def __init__(self, profile: Profile, resident_bytes: float = 0.0):
        self.profile = profile
        self.resident_bytes = resident_bytes  # the weights the priced graph cycles through the caches

    def gemm(self, grid: str, m: int, n: int, k: int, count: int = 1) -> float:
        """A product on its class's grid; a float32 one never faster than streaming its weight (K x N per
        matrix) once, which the grid's own weights, all within the last-level cache, do not show."""
        seconds = self.profile.grids[grid].seconds_for(m, n, k, self.profile.op_overhead, count)
        floor = self.profile.weight_seconds(4 * count * n * k, self.resident_bytes) if grid == "gemm" else 0.0
        return max(seconds, floor)

    def pooling(self, kind: str, spatial: int, kernel_size: Sequence[int], out: Any) -> float | None:
        """A pooling op as the window elements it reads: output elements x window size (aten gives one size
        for a square or cubic window)."""
        first = next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        sizes = [int(size) for size in kernel_size]
        window = math.prod(sizes) if len(sizes) == spatial else sizes[0] ** spatial
        return self.profile.pooling_seconds(kind, first.numel() * window)

    def attention(self, heads: int, queries: int, keys: int, head_dim: int) -> float:
        """Q K^T then P V, each a batch of ``heads`` (batch x heads) products over ``queries`` rows."""
        return (self.gemm("gemm", queries, keys, head_dim, count=heads)
                + self.gemm("gemm", queries, head_dim, keys, count=heads))

    def recurrent_layer(self, x: Sequence[int], w_ih: Sequence[int], w_hh: Sequence[int], batch_first: bool) -> float:
        """One recurrent layer (oneDNN's LSTM): the input projection of every step as one GEMM, then one
        small GEMM per step on the recurrent weight, and the gates' elementwise work."""
        steps, batch = (x[1], x[0]) if batch_first else (x[0], x[1])
        gates = w_ih[0]
        return (self.gemm("gemm", steps * batch, gates, w_ih[1]) + self.steps(steps, batch, gates, w_hh[1])
                + self.profile.bytes_seconds(4 * steps * batch * gates * 3))

    def recurrent_layer_backward(self, x: Sequence[int], w_ih: Sequence[int], w_hh: Sequence[int],
                                 batch_first: bool) -> float:
        """The backward of one oneDNN LSTM layer: per step the hidden state's gradient through the recurrent
        weight, then the input's gradient and both weights' gradients as GEMMs over every step at once, and
        the cells' elementwise backward."""
        steps, batch = (x[1], x[0]) if batch_first else (x[0], x[1])
        gates, inputs, hidden = w_ih[0], w_ih[1], w_hh[1]
        rows = steps * batch
        return (self.steps(steps, batch, hidden, gates) + self.gemm("gemm", rows, inputs, gates)
                + self.gemm("gemm", gates, inputs, rows) + self.gemm("gemm", gates, hidden, rows)
                + self.profile.bytes_seconds(4 * rows * gates * 5))

    def steps(self, steps: int, m: int, n: int, k: int) -> float:
        """``steps`` products of one recurrence on the same (k, n) weight: each at the grid's time, the weight
        streamed once (it stays cached from one step to the next), not once per step."""
        grid = self.profile.grids["gemm"]
        return max(steps * grid.seconds_for(m, n, k, self.profile.op_overhead),
                   self.profile.weight_seconds(4 * n * k, self.resident_bytes))

    def native_recurrence(self, kernel: str, gates: Sequence[int], index: Any) -> float:
        """fxreduce's LSTM time loop ``kernel`` on its (steps, rows, 4 x hidden) gate pre-activations, each step's
        product over the kept hidden units: its measured set-up (packing the recurrent weight, never faster than
        streaming it from where it lives) plus steps times its measured time per step. Without the loop's grid
        (a profile measured without the native layer), each step is priced as its products on the GEMM grid
        (forward one, backward two) plus the cells' elementwise work."""
        steps, rows, width = gates
        kept = width // 4 if index is None else int(index.shape[-1])
        grid = self.profile.grids.get(_LSTM_GRIDS[kernel])
        if grid is None:
            passes = 2 if kernel == "lstm_layer_backward" else 1
            return passes * (self.steps(steps, rows, width, kept)
                             + self.profile.bytes_seconds(4 * steps * rows * width * 3))
        weight_bytes = 4 * width * kept
        setup = max(self.profile.lstm_setup.get(_LSTM_GRIDS[kernel], 0.0) * weight_bytes,
                    self.profile.weight_seconds(weight_bytes, self.resident_bytes))
        return setup + steps * grid.seconds_for(rows, width, kept, 0.0)

    def gather(self, kernel: str, args: tuple) -> float:
        """The indirect-K GEMM ``kernel`` (forward, input or weight gradient) on its grid by the forward's shape:
        rows (steps x batch), output features, kept inputs; never faster than streaming the kept weight rows."""
        if kernel == "gather_matmul_input_grad":
            dout = _shape(args[0])
            rows, out, kept = _numel(dout[:-1]), dout[-1], int(args[3])
        else:
            x = _shape(args[0])
            rows, out, kept = _numel(x[:-1]), _shape(args[1])[-1], x[-1]
        seconds = self.profile.grids[_GATHER_GRIDS[kernel]].seconds_for(rows, out, kept, self.profile.op_overhead)
        return max(seconds, self.profile.weight_seconds(4 * out * kept, self.resident_bytes))

    def lowrank(self, rows: int, rank: int, width: int) -> float:
        """fxreduce's fused low-rank product (rows x rank x (in + out) multiply-adds) on its grid, never faster
        than streaming both factors once."""
        seconds = self.profile.grids["lowrank"].seconds_for(rows, rank, width, self.profile.op_overhead)
        return max(seconds, self.profile.weight_seconds(4 * rank * width, self.resident_bytes))

    def by_formula(self, packet: Any, formula: Callable, args: tuple, kwargs: dict, out: Any) -> tuple[str, float]:
        """An op with a registered FLOP formula (fxreduce's native kernels among them), priced as one GEMM
        shaped by its output: M rows of its last dim N, K = MACs / (M N)."""
        macs = formula(*args, **kwargs, out_val=out) / 2  # torch's FlopCounterMode calls formulas so
        first = next((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dim()), None)
        kind = "gemm" if getattr(packet, "_qualified_op_name", "").startswith("aten::") else "native"
        if not macs or first is None:
            return kind, 0.0
        n = first.shape[-1]
        m = max(first.numel() // max(n, 1), 1)
        return kind, self.gemm("gemm", m, n, max(macs / (m * n), 1.0))

    def price(self, func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[str, float]:
        packet = getattr(func, "overloadpacket", None)
        if packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
            first, second = (args[1], args[2]) if packet in (aten.addmm, aten.baddbmm) else (args[0], args[1])
            a, b = _shape(first), _shape(second)
            return "gemm", self.gemm("gemm", a[-2], b[-1], a[-1], count=a[0] if len(a) == 3 else 1)
        if packet in (aten.convolution, aten._convolution, aten.mkldnn_convolution):
            weight, stride, groups = _shape(args[1]), args[3], int(args[-1])
            x, y = _shape(args[0]), _shape(out)
            return "conv", self.gemm(_conv_class(weight, stride, groups, x[1]), *_conv_gemm(x, weight, y, groups))
        if packet in _ATTENTION:
            q, k = _shape(args[0]), _shape(args[1])
            return "attention", self.attention(_numel(q[:-2]), q[-2], k[-2], q[-1])
        if packet is aten.mkldnn_rnn_layer:
            return "recurrent", self.recurrent_layer(_shape(args[0]), _shape(args[1]), _shape(args[2]),
                                                     bool(args[14]))
        if packet is aten.mkldnn_rnn_layer_backward:
            return "recurrent", self.recurrent_layer_backward(_shape(args[0]), _shape(args[1]), _shape(args[2]),
                                                              bool(args[21]))
        if packet is aten._native_multi_head_attention:
            query, key = _shape(args[0]), _shape(args[1])
            embed, heads = int(args[3]), int(args[4])
            tokens, batch_length = _numel(query[:-1]), _numel(key[:-1])
            projections = (self.gemm("gemm", tokens, embed, embed) + 2 * self.gemm("gemm", batch_length, embed, embed)
                           + self.gemm("gemm", tokens, embed, embed))
            return "attention", projections + self.attention(_numel(query[:-2]) * heads, query[-2], key[-2],
                                                             embed // heads)
        name = getattr(packet, "__name__", "")
        if name in _LSTM_GRIDS:
            backward = name == "lstm_layer_backward"
            return "recurrent", self.native_recurrence(name, _shape(args[2] if backward else args[0]),
                                                       args[9 if backward else 4])
        if _GATHER_GRIDS.get(name) in self.profile.grids:
            return "native", self.gather(name, args)
        if name == "lowrank_linear" and "lowrank" in self.profile.grids:
            x, first, second = _shape(args[0]), _shape(args[1]), _shape(args[2])
            return "native", self.lowrank(_numel(x[:-1]), first[0], first[1] + second[0])
        if name == "grouped_lowrank_linear" and args[1] is not None and "lowrank" in self.profile.grids:
            # G blocks (G, r/G, in/G) and (G, out/G, r/G) run as one fused product of rank r whose every rank-one
            # term reads in/G + out/G features: the same kernel, priced on the same grid as the dense form.
            x, first, second = _shape(args[0]), _shape(args[1]), _shape(args[2])
            return "native", self.lowrank(_numel(x[:-1]), first[0] * first[1], first[2] + second[1])
        if name == "int8_linear":
            x, weight = _shape(args[0]), _shape(args[1])
            return "int8_gemm", self.gemm("int8_gemm", _numel(x[:-1]), weight[0], weight[1])
        if name == "int8_conv2d":
            x, weight, y = _shape(args[0]), _shape(args[1]), _shape(out)
            return "int8_conv", self.gemm("int8_conv", *_conv_gemm(x, weight, y, int(args[6])))
        if packet in _POOLING:
            seconds = self.pooling(*_POOLING[packet], args[1], out)
            if seconds is not None:
                return "pooling", seconds
        if getattr(func, "is_view", False) or packet in _METADATA_ONLY:
            return "view", 0.0
        activation = _SAME_KERNEL.get(name.rstrip("_"), name.rstrip("_"))
        if activation in ACTIVATIONS:
            first = next((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)), None)
            seconds = self.profile.activation_seconds(activation, first.numel()) if first is not None else None
            if seconds is not None:
                return "activation", seconds
        formula = flop_registry.get(packet)
        if formula is not None:
            return self.by_formula(packet, formula, args, kwargs, out)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors + outputs)
        return "memory", self.profile.bytes_seconds(moved)


_ATTENTION = tuple(op for op in (getattr(aten, name, None) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math")) if op is not None)
_POOLING = {aten.max_pool2d_with_indices: ("max_pool", 2), aten.max_pool2d: ("max_pool", 2),
            aten.max_pool3d_with_indices: ("max_pool", 3), aten.avg_pool2d: ("avg_pool", 2),
            aten.avg_pool3d: ("avg_pool", 3)}
_METADATA_ONLY = (aten.detach, aten.lift_fresh, aten.alias, aten.sym_size, aten.sym_stride, aten.sym_numel,
                  torch.ops.prim.device)


class _Recorder(TorchDispatchMode):
    """Prices every aten op dispatched while an fx node runs, attributed to that node."""

    def __init__(self, pricer: _Pricer):
        super().__init__()
        self.pricer = pricer
        self.node: str = ""
        self.priced: dict[str, list[tuple[str, float]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.priced.setdefault(self.node, []).append(self.pricer.price(func, args, kwargs, out))
        return out


class _NodeTracker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, recorder: _Recorder):
        super().__init__(gm)
        self.recorder = recorder

    def run_node(self, node: fx.Node) -> Any:
        self.recorder.node = node.name
        return super().run_node(node)


_CALLS = ("call_module", "call_function", "call_method")


def _node_latency(gm: fx.GraphModule, node: fx.Node, priced: list[tuple[str, float]],
                  profile: Profile) -> NodeLatency:
    seconds = sum(seconds for _, seconds in priced) + profile.op_overhead * sum(kind != "view" for kind, _ in priced)
    if node.op in _CALLS:
        seconds += profile.call_overhead
    if node.op == "call_module":
        seconds += profile.module_call(gm.get_submodule(node.target))
    weights: dict[str, float] = {}
    for kind, cost in priced:
        weights[kind] = weights.get(kind, 0.0) + cost
    kind = max(weights, key=weights.get) if weights else ("python" if node.op in _CALLS else node.op)
    return NodeLatency(node.name, seconds, kind, len(priced))


def concrete_inputs(gm: fx.GraphModule, dims: Mapping[str, int], make: Callable[..., torch.Tensor]) -> tuple:
    """The graph's example inputs with each named dim resized to ``dims``; ``make(shape, dtype)`` builds a tensor."""
    from .propagation import graph_info

    info = graph_info(gm)
    missing = [name for name in info.symbolic if name not in dims]
    if missing:
        example = ", ".join(f"{name}={info.spec.hint(name)}" for name in missing)
        raise CostError(f"dims {', '.join(missing)} are still symbolic, and a latency needs a number for each",
                        where="latency", fix=f"give them, e.g. latency({example})")
    unknown = [name for name in dims if name not in info.spec.dims]
    if unknown:
        raise CostError(f"unknown dim name(s) {', '.join(unknown)}", where="latency",
                        fix=f"the named dims of this graph are: {', '.join(info.spec.dims) or 'none'}")
    return info.spec.resized({name: int(size) for name, size in dims.items()},
                             lambda value, shape: make(tuple(shape), value.dtype))


def predict(gm: fx.GraphModule, profile: Profile, dims: Mapping[str, int], training: bool = False) -> Latency:
    """``gm``'s predicted seconds at ``dims`` on the machine ``profile`` measured: the eval forward, or with
    ``training`` a training step (train-mode forward, the backward of the summed outputs to every trainable
    parameter, and an SGD update reading and writing each parameter and its gradient)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module

    shape_dims, data_values, note = _split_dims(gm, dims)
    recorder = _Recorder(_Pricer(profile, _state_bytes(gm)))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        inputs = concrete_inputs(gm, shape_dims, lambda shape, dtype: torch.empty(shape, dtype=dtype))
        state = {name: fake.from_tensor(p, static_shapes=True).requires_grad_(p.requires_grad)
                 for name, p in gm.named_parameters()} if training else {}
    trainable = [p for p in gm.parameters() if p.requires_grad]
    parameters = _reparametrize_module(gm, state) if training else contextlib.nullcontext()
    was_training = gm.training
    gm.train(training)
    try:
        with (torch.set_grad_enabled(training), fake, recorder, parameters,
              native.fake_runs_as_eager(data_values)):
            outputs = _NodeTracker(gm, recorder).run(*inputs)
            if training:
                recorder.node = "backward"
                leaves = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
                wanted = [t for t in state.values() if t.requires_grad]
                if leaves and wanted:
                    torch.autograd.grad(sum(t.float().sum() for t in leaves), wanted, allow_unused=True)
    except InputError:  # a value the caller gave is wrong (DRNet's shares): say so, never price around it
        raise
    except Exception as error:
        if training:
            raise CostError(f"the training step's fake run stopped at node {recorder.node}: "
                            f"{type(error).__name__}", where="latency(training=True)",
                            fix="predict the eval forward (fxreduce.cost(gm).latency(...)) for this graph") from error
        return _predict_from_costs(gm, profile, dims, f"the fake run stopped at node {recorder.node} "
                                                      f"({type(error).__name__}); priced from symbolic costs")
    finally:
        gm.train(was_training)
    nodes = tuple(_node_latency(gm, node, recorder.priced.get(node.name, []), profile) for node in gm.graph.nodes)
    if training:
        backward = recorder.priced.get("backward", [])
        update = [("memory", profile.bytes_seconds(3 * p.numel() * p.element_size())) for p in trainable]
        nodes += tuple(NodeLatency(name, sum(seconds for _, seconds in priced)
                                   + profile.op_overhead * sum(kind != "view" for kind, _ in priced),
                                   "backward" if name == "backward" else "memory", len(priced))
                       for name, priced in (("backward", backward), ("update", update)))
    return Latency(sum(n.seconds for n in nodes), nodes, dict(dims), method="fake run" + (
        " (training step)" if training else ""), note=note)


def _split_dims(gm: fx.GraphModule, dims: Mapping[str, float]) -> tuple[dict[str, int], dict[str, float], str]:
    """``dims`` split into the graph's named input dims and values of the quantities its data decides (symbols
    of its cost that are not input dims: DRNet's shares of images per resolution), and a note naming the
    data-decided quantities not given (the fake run then takes each one's default)."""
    from .propagation import graph_info

    shape_names = set(graph_info(gm).spec.dims)
    data_names = sorted({str(free) for free in _cost_symbols(gm)} - shape_names)
    unknown = [name for name in dims if name not in shape_names and name not in data_names]
    if unknown:
        known = ", ".join(sorted(shape_names) + data_names) or "none"
        raise CostError(f"unknown dim name(s) {', '.join(unknown)}", where="latency",
                        fix=f"the named dims of this graph, and the quantities its data decides, are: {known}")
    missing = [name for name in data_names if name not in dims]
    note = (f"{', '.join(missing)} not given (the data decides them): priced at each one's default, DRNet's "
            "dispatch at its base resolution for every image" if missing else "")
    return ({name: value for name, value in dims.items() if name in shape_names},
            {name: float(value) for name, value in dims.items() if name not in shape_names}, note)


def _cost_symbols(gm: fx.GraphModule) -> set:
    """The free symbols of the graph's MAC formulas: its input dims and what its data decides."""
    return {free for node in gm.graph.nodes if (node_info := meta.info(node)) is not None
            for expr in node_info.cost.macs.values() for free in getattr(expr, "free_symbols", ())}


def _state_bytes(module: torch.nn.Module) -> int:
    """The bytes of a module's parameters and buffers: what one forward reads through the caches."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def module_seconds(profile: Profile, module: torch.nn.Module, *input_shapes: Sequence[int],
                   dtype: torch.dtype = torch.float32) -> float:
    """Predicted eval seconds of one call of ``module`` on inputs of ``input_shapes``: how a pass weighs
    candidate rewrites of a layer (its ops priced like a graph's, plus one module call)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recorder = _Recorder(_Pricer(profile, _state_bytes(module)))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        inputs = [torch.empty(tuple(shape), dtype=dtype) for shape in input_shapes]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), fake, recorder, native.fake_runs_as_eager():
            module(*inputs)
    finally:
        module.train(was_training)
    priced = recorder.priced.get("", [])
    return (sum(seconds for _, seconds in priced) + profile.op_overhead * sum(kind != "view" for kind, _ in priced)
            + profile.call_overhead + profile.module_call(module))


def example_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    """``node``'s output shape at the graph's example sizes (None for several outputs or data-decided sizes):
    the size a pass prices a layer at."""
    from .propagation import graph_info, symbol

    spec = graph_info(gm).spec
    values = {symbol(name): spec.hint(name) for name in spec.dims}
    node_info = meta.info(node)
    return _numbers(node_info.shape, values) if node_info is not None else None


def _predict_from_costs(gm: fx.GraphModule, profile: Profile, dims: Mapping[str, int], note: str) -> Latency:
    """Each node priced from its symbolic cost at ``dims``: its MACs on the GEMM grid of its dtype, shaped
    as its output gives (M rows of N columns, K = MACs / (M N)), the rest as bytes moved. Sizes the data
    decides (a boolean mask's count) have no number: such nodes are priced at their overheads and named."""
    from .propagation import symbol

    substitutions = {symbol(name): value for name, value in dims.items()}
    substitutions.update({free: dims[str(free)] for free in _cost_symbols(gm) if str(free) in dims})
    pricer = _Pricer(profile, _state_bytes(gm))
    nodes, unpriced = [], []
    for node in gm.graph.nodes:
        node_info = meta.info(node)
        priced: list[tuple[str, float]] = []
        if node_info is not None and node.op in _CALLS:
            cost = node_info.cost.subs(substitutions)
            macs = {dtype: _number(value) for dtype, value in cost.macs.items()}
            moved = _number(cost.bytes_read + cost.bytes_written)
            if None in macs.values() or moved is None:
                unpriced.append(node.name)
            elif any(macs.values()):
                total = sum(macs.values())
                shape = _numbers(node_info.shape, substitutions)
                n = max(shape[-1], 1) if shape else round(total ** (1 / 3)) or 1
                m = max(math.prod(shape) // n, 1) if shape else n
                grid = "int8_gemm" if any("int8" in dtype for dtype in macs) else "gemm"
                priced.append((grid, pricer.gemm(grid, m, n, max(total / (m * n), 1.0))))
            elif moved:
                priced.append(("memory", profile.bytes_seconds(moved)))
        nodes.append(_node_latency(gm, node, priced, profile))
    if unpriced:
        note += f"; sizes the data decides left {', '.join(unpriced)} at their overheads"
    return Latency(sum(n.seconds for n in nodes), tuple(nodes), dict(dims), method="symbolic costs", note=note)


def _number(expr: Any) -> float | None:
    """``expr`` as a float, or None where it still holds a symbol (a size only the data decides)."""
    try:
        return float(expr)
    except TypeError:
        return None


def _numbers(shape: Any, substitutions: Mapping) -> tuple[int, ...] | None:
    """A single tensor's shape with the dims substituted, or None (several outputs, or data-decided sizes)."""
    if not isinstance(shape, tuple) or not shape or isinstance(shape[0], tuple):
        return None
    values = [_number(size.subs(substitutions) if hasattr(size, "subs") else size) for size in shape]
    return None if None in values else tuple(int(value) for value in values)
