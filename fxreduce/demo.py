"""``fxreduce demo``: each technique of the library cutting computation on a small real model, in one run.

Every section traces a model, rewrites it with one technique through the public pipeline, proves the cut
with the cost model (fxreduce.certify), times the original and the rewrite side by side in the same
process (fxreduce.measurement), and checks the pass's contract on fresh inputs (fxreduce.testing). All
figures are computed here from the settings; nothing is quoted from a benchmark. ``Settings.fast()``
shrinks every workload for tests; the default settings are what the README shows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx
from torch import nn

from .cost_models import GraphCost, certify, graph_cost, graph_info
from .cost_models.symbolic import at_pinned, pinned_dims
from .errors import InputError
from .measurement import time_side_by_side
from .models import demo as demo_cnn
from .pipeline import apply
from .testing.contracts import check_contract
from .text import count
from .tracing import trace

TECHNIQUES = ("sparse_lowrank", "lower_int8", "structured_dropout", "on_device", "dynamic_resolution")


@dataclass(frozen=True)
class Settings:
    """What each section runs; every figure the demo prints follows from these."""

    threads: int = 2
    repeats: int = 5
    trials: int = 1
    seed: int = 0
    mlp_widths: tuple[int, ...] = (784, 1024, 1024, 10)
    mlp_batch: int = 64
    lowrank_spec: str = "sparse_lowrank(flop_reduction=4)"
    cnn_size: int = 64
    cnn_batch: int = 32
    int8_spec: str = "fold_batchnorm,lower_int8"
    lm_vocabulary: int = 2000
    lm_hidden: int = 400
    lm_steps: int = 35
    lm_batch: int = 20
    dropout_spec: str = "structured_dropout(p=0.5, mode='per_sequence', recurrent=True)"
    train_size: int = 64
    train_batch: int = 32
    on_device_spec: str = "error_map_pruning(keep=0.3),instance_filter"
    resolutions: tuple[int, ...] = (64, 48, 32)
    resolution_batch: int = 64
    resolution_shares: tuple[float, ...] = (0.25, 0.4, 0.35)

    @classmethod
    def fast(cls) -> "Settings":
        """Small workloads and few repeats: the same code path in seconds (tests)."""
        return cls(repeats=2, trials=1, mlp_widths=(64, 256, 256, 10), mlp_batch=8, cnn_size=32, cnn_batch=4,
                   lm_vocabulary=100, lm_hidden=64, lm_steps=6, lm_batch=4, train_size=32, train_batch=8,
                   resolutions=(32, 24, 16), resolution_batch=8)


@dataclass
class Section:
    """One technique's outcome: the proven cut, the measured times and the contract check."""

    technique: str
    title: str
    workload: str
    spec: str
    metric: str
    before: float
    after: float
    proven: bool
    before_seconds: float
    after_seconds: float
    contract: str
    contract_ok: bool
    inputs_checked: int
    command: str
    notes: list[str] = field(default_factory=list)
    original: fx.GraphModule | None = field(default=None, repr=False)
    rewritten: fx.GraphModule | None = field(default=None, repr=False)
    report: Any = field(default=None, repr=False)

    @property
    def cut(self) -> float:
        """Percent of ``metric`` the rewrite saves on the measured workload."""
        return 100.0 * (self.before - self.after) / self.before

    @property
    def speedup(self) -> float:
        return self.before_seconds / self.after_seconds

    def lines(self) -> list[str]:
        verdict = "holds" if self.contract_ok else "BROKEN"
        proof = "proven for all sizes" if self.proven else "NOT proven for all sizes"
        ratio = f", {self.before / self.after:.2f}x" if self.after else ""
        return [f"workload: {self.workload}", f"rewrite:  {self.spec}",
                f"cost:     {self.metric} {count(self.before)} -> {count(self.after)} "
                f"(-{self.cut:.1f}%{ratio}; {proof})",
                f"measured: {self.before_seconds * 1e3:.1f} ms -> {self.after_seconds * 1e3:.1f} ms, "
                f"{self.speedup:.2f}x (side by side, median of interleaved runs)",
                f"contract: {self.contract} -- {verdict} on {self.inputs_checked} input(s)",
                *self.notes, f"full example: {self.command}"]


class MLP(nn.Module):
    """A plain ReLU multilayer perceptron (MNIST-sized input by default)."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for index, (inputs, outputs) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(inputs, outputs))
            if index < len(widths) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LanguageModel(nn.Module):
    """The Zaremba et al. word-level LM: embedding, dropout, 2-layer LSTM with dropout between, decoder."""

    def __init__(self, vocabulary: int, hidden: int, p: float = 0.5):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, hidden)
        self.drop_in = nn.Dropout(p)
        self.lstm = nn.LSTM(hidden, hidden, 2, dropout=p, batch_first=True)
        self.drop_out = nn.Dropout(p)
        self.decoder = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.drop_in(self.embed(tokens)))
        return self.decoder(self.drop_out(output))


def _values(gm: fx.GraphModule, inputs: tuple) -> dict[str, int]:
    """The symbolic dims of ``gm`` at the sizes of ``inputs``."""
    spec = graph_info(gm).spec
    return {name: int(inputs[index].shape[axis]) for name, (index, axis) in spec.dims.items()}


def _cut(old: GraphCost, new: GraphCost, before: sympy.Expr, after: sympy.Expr, dims: dict[str, int],
         metric: str) -> tuple[float, float, bool]:
    """``before`` and ``after`` (expressions of the costs ``old`` and ``new``) at ``dims``, and whether
    after <= before is proven for all sizes (at the size of a dim either graph fixes)."""
    pinned = pinned_dims(old, new)
    before, after = at_pinned(before, pinned), at_pinned(after, pinned)
    certificate = certify(before, after, metric=metric)
    point = {symbol: dims[symbol.name] for symbol in (before.free_symbols | after.free_symbols)}
    return float(before.xreplace(point)), float(after.xreplace(point)), certificate.proven


def _timed(candidates: dict[str, Callable[[], object]], settings: Settings, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each candidate, interleaved, at ``settings.threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return time_side_by_side(candidates, repeats=settings.repeats, warmup=warmup)
    finally:
        torch.set_num_threads(previous)


def _eval_call(model: nn.Module, inputs: tuple) -> Callable[[], object]:
    model.eval()

    def call() -> object:
        with torch.no_grad():
            return model(*inputs)
    return call


def _contract(spec: str, gm: fx.GraphModule, settings: Settings) -> tuple[str, bool, int]:
    result = check_contract(spec, gm, trials=settings.trials, seed=settings.seed)
    contracts = "; ".join(f"{check.pass_.name}: {check.pass_.contract.kind}" for check in result.checks)
    return contracts, result.ok, min(check.inputs_checked for check in result.checks)


def _eval_section(technique: str, title: str, workload: str, model: nn.Module, inputs: tuple,
                  dims: dict[str, tuple[int, int]], spec: str, settings: Settings, command: str,
                  metric: str = "flops", dtype: str | None = None) -> Section:
    """An inference rewrite: cost certified on ``metric`` (or one dtype's MACs), eval forward timed."""
    gm = trace(model, inputs, dims)
    result = apply(gm, spec, seed=settings.seed)
    rewritten = result.graph_module
    old, new = graph_cost(gm), graph_cost(rewritten)
    if dtype is None:
        before, after, label = old.flops, new.flops, "FLOPs"
    else:
        before, after = (2 * cost.macs_by_dtype.get(dtype, sympy.Integer(0)) for cost in (old, new))
        label = f"{dtype} FLOPs"
    values = _cut(old, new, before, after, _values(gm, inputs), metric)
    times = _timed({"before": _eval_call(gm, inputs), "after": _eval_call(rewritten, inputs)}, settings)
    contract = _contract(spec, gm, settings)
    return Section(technique, title, workload, spec, label, *values, times["before"], times["after"], *contract,
                   command, original=gm, rewritten=rewritten, report=result.report)


def sparse_lowrank(settings: Settings) -> Section:
    torch.manual_seed(settings.seed)
    widths = settings.mlp_widths
    x = torch.randn(settings.mlp_batch, widths[0])
    return _eval_section(
        "sparse_lowrank", "AntMan: Linear layers as SVD-initialised low-rank products",
        f"MLP {'-'.join(map(str, widths))}, eval forward, batch {settings.mlp_batch}",
        MLP(widths).eval(), (x,), {"N": (0, 0)}, settings.lowrank_spec, settings,
        "python examples/antman_lm.py  (docs/antman.md)")


def lower_int8(settings: Settings) -> Section:
    torch.manual_seed(settings.seed)
    size = settings.cnn_size
    x = torch.randn(settings.cnn_batch, 3, size, size)
    section = _eval_section(
        "lower_int8", "int8 kernels (fbgemm) for Conv2d / Linear",
        f"the demo CNN (fxreduce.models.DemoNet), eval forward, {settings.cnn_batch}x3x{size}x{size}",
        demo_cnn(), (x,), {"N": (0, 0), "H": (0, 2), "W": (0, 3)}, settings.int8_spec, settings,
        "python examples/admm_lenet5.py  (docs/admm.md)", dtype="float32")
    section.notes.append("note:     int8 MACs replace float32 ones (the FLOP count is unchanged; the float32 "
                         "work is what goes)")
    return section


def _train_call(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens)
        nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
    return step


def structured_dropout(settings: Settings) -> Section:
    torch.manual_seed(settings.seed)
    vocabulary, hidden = settings.lm_vocabulary, settings.lm_hidden
    tokens = torch.randint(0, vocabulary, (settings.lm_batch, settings.lm_steps))
    targets = torch.randint(0, vocabulary, (settings.lm_batch, settings.lm_steps))
    model = LanguageModel(vocabulary, hidden)
    gm = trace(model, (tokens,), {"N": (0, 0), "T": (0, 1)})
    spec = settings.dropout_spec
    result = apply(gm, spec, seed=settings.seed)
    rewritten = result.graph_module
    old, new = graph_cost(gm, training=True), graph_cost(rewritten, training=True)
    values = _cut(old, new, old.flops, new.flops, {"N": settings.lm_batch, "T": settings.lm_steps}, "flops")
    times = _timed({"before": _train_call(gm, tokens, targets), "after": _train_call(rewritten, tokens, targets)},
                   settings, warmup=1)
    return Section("structured_dropout", "structured dropout: batch-shared masks whose GEMMs skip dropped units",
                   f"2-layer LSTM LM (H={hidden}; vocabulary {vocabulary}), training step, batch "
                   f"{settings.lm_batch} x {settings.lm_steps} tokens", spec, "training FLOPs", *values,
                   times["before"], times["after"], *_contract(spec, gm, settings),
                   "python examples/structured_dropout_lm.py  (docs/structured-dropout.md)", original=gm,
                   rewritten=rewritten, report=result.report)


def on_device(settings: Settings) -> Section:
    from .training.on_device import OnDeviceTrainer

    torch.manual_seed(settings.seed)
    size, batch = settings.train_size, settings.train_batch
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    gm = trace(demo_cnn().train(), (x,), {"N": (0, 0)})
    spec = settings.on_device_spec
    torch.manual_seed(settings.seed + 1)
    result = apply(gm, spec, seed=settings.seed)
    rewritten = result.graph_module
    trainers = {name: OnDeviceTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0))
                for name, model in (("before", gm), ("after", rewritten))}
    times = _timed({name: (lambda t=trainer: t.step(x, y)) for name, trainer in trainers.items()}, settings, warmup=1)
    steps = {name: trainer.step(x, y) for name, trainer in trainers.items()}
    kept = steps["after"].kept.numel()
    contract = _contract(spec, gm, settings)
    section = Section("on_device", "on-device training: error map pruning + the early instance filter",
                      f"the demo CNN, training step (forward, backward, SGD), {batch}x3x{size}x{size}", spec,
                      "training FLOPs", float(steps["before"].flops), float(steps["after"].flops), True,
                      times["before"], times["after"], *contract, "python examples/on_device_mnist.py  "
                      "(docs/on-device-training.md)", original=gm, rewritten=rewritten, report=result.report)
    section.proven = certify(graph_cost(gm, training=True), graph_cost(rewritten, training=True)).proven
    section.notes.append(f"note:     the (untrained) filter kept {kept}/{batch} instances this step; the cost "
                         "counts the filter's own work and the kept share")
    return section


def dynamic_resolution(settings: Settings) -> Section:
    from .modules.dynamic_resolution import force_resolution
    from .training.dynamic_resolution import resolution_costs

    torch.manual_seed(settings.seed)
    resolutions, batch = settings.resolutions, settings.resolution_batch
    x = torch.randn(batch, 3, resolutions[0], resolutions[0])
    gm = trace(demo_cnn(), (x,), {"N": (0, 0)})
    spec = f"dynamic_resolution(resolutions={tuple(resolutions)}, predictor_width=0.25)"
    result = apply(gm, spec, seed=settings.seed)
    rewritten = result.graph_module.eval()
    shares = torch.tensor(settings.resolution_shares, dtype=torch.float64)
    counts = torch.round(shares * batch).long()
    counts[0] += batch - int(counts.sum())
    choices = torch.repeat_interleave(torch.arange(len(resolutions)), counts)
    choices = choices[torch.randperm(batch, generator=torch.Generator().manual_seed(settings.seed))]
    costs = resolution_costs(rewritten)
    measured_shares = counts.double() / batch
    before, after = costs.backbone_flops[0], costs.expected_flops(measured_shares)
    with force_resolution(rewritten, choices):
        times = _timed({"before": _eval_call(gm, (x,)), "after": _eval_call(rewritten, (x,))}, settings)
    contract = _contract(spec, gm, settings)
    shares_text = " / ".join(f"{r}px {s:.0%}" for r, s in zip(resolutions, measured_shares.tolist()))
    section = Section("dynamic_resolution", "DRNet: a predictor picks each image's resolution; the batch runs "
                      "grouped", f"the demo CNN, eval forward, {batch} images at {resolutions[0]}x{resolutions[0]}",
                      spec, "FLOPs per image", before, after, before >= after, times["before"], times["after"],
                      *contract, "python examples/drnet_mnist.py  (docs/drnet.md)", original=gm, rewritten=rewritten,
                      report=result.report)
    section.notes.append(f"shares:   fixed, not predicted ({shares_text}); the untrained predictor still runs and "
                         "its FLOPs are counted")
    return section


SECTIONS: dict[str, Callable[[Settings], Section]] = {
    "sparse_lowrank": sparse_lowrank, "lower_int8": lower_int8, "structured_dropout": structured_dropout,
    "on_device": on_device, "dynamic_resolution": dynamic_resolution}


def run(techniques: Sequence[str] | None = None, settings: Settings | None = None,
        echo: Callable[[str], None] = print) -> list[Section]:
    """Run the named sections (all by default) in order, printing each as it finishes."""
    settings = settings or Settings()
    names = list(techniques or TECHNIQUES)
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise InputError(f"unknown demo technique(s) {', '.join(unknown)}", where="fxreduce demo --technique",
                         fix=f"choose from {', '.join(TECHNIQUES)}")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # set-up (SVDs, tracing, contract checks) is small and latency-bound
    sections = []
    try:
        for index, name in enumerate(names, 1):
            started = time.perf_counter()
            section = SECTIONS[name](settings)
            echo(f"== {index}. {name}: {section.title}")
            echo("\n".join("   " + line for line in section.lines()))
            echo(f"   ({time.perf_counter() - started:.1f} s)\n")
            sections.append(section)
    finally:
        torch.set_num_threads(previous)
    return sections


def summary(sections: Sequence[Section], threads: int) -> list[str]:
    """The closing table: one row per technique."""
    rows = [["technique", "workload", "cost cut", "proven", "speedup", "contract"]]
    for section in sections:
        rows.append([section.technique, section.workload.split(",")[0], f"-{section.cut:.1f}% {section.metric}",
                     "yes" if section.proven else "no", f"{section.speedup:.2f}x",
                     "holds" if section.contract_ok else "BROKEN"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"speedups: {threads} torch threads, this machine, 1-minute load average {load:.1f}")
    cores = os.cpu_count() or 1
    if load > cores:
        lines.append(f"warning: the load average is above the {cores} core(s): other processes shared the cores "
                     "while timing, so the speedups are noisy (the cost cuts and contracts are not affected)")
    return lines


__all__ = ["LanguageModel", "MLP", "SECTIONS", "Section", "Settings", "TECHNIQUES", "run", "summary"]
