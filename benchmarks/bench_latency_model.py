"""The latency model against the clock: predicted vs measured speedup of rewrites, and whole-model latency.

The profile is calibrated at the start of the run (``fxreduce calibrate``'s full grid), so prediction
and measurement see the same machine state. Rewrites: int8 Linear and Conv2d (lower_int8) at batch 1 / 8
/ 64; low-rank, grouped and sparse x low-rank Linear layers (sparse_lowrank) at 2x-12x MAC cuts and
batch 1-200, ViT-B's MLP, an LSTM LM's gate matrices; fold_batchnorm on ResNet-18; DRNet's grouped
dispatch on ResNet-18 (images forced to the resolutions at two mixes of shares, the same shares given to
the latency model as p_<resolution>); structured dropout's training step on the LSTM LM (per_step
masks, recurrent off and on); error_map_pruning's training step on pairs of 3x3 convolutions. Each
rewrite's before and after run side by side (interleaved; eval under no_grad, or the training step),
each turn a block of back-to-back calls of one candidate after an untimed one (``time_steady``), as the
profile's calibration times its kernels: the model predicts a layer in steady state, its weights where
they settle when it runs alone. The table also gives the speedup with plain interleaving, where a small
rewritten layer runs right after its large original has streamed its weights through the cache. The
predicted speedup is latency(before) / latency(after). Whole models: ten
torchvision models at batch 1 and 8, predicted vs measured seconds. Goals (issue 18): median relative
error of the speedups <= 10%, >= 90% within 20%; whole models within 25%.

    python benchmarks/bench_latency_model.py           # full run, rewrites its section of docs/benchmarks.md
    python benchmarks/bench_latency_model.py --quick   # a few cases on a tiny grid, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torchvision
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DOCS, fix_threads, markdown_table, time_side_by_side, time_steady, write_section  # noqa: E402

import fxreduce as fr  # noqa: E402
from fxreduce.cost_models.latency import load_profile  # noqa: E402
from fxreduce.modules.dynamic_resolution import force_resolution  # noqa: E402

TITLE = "Latency model: predicted vs measured"
PLOT = DOCS.parent / "images" / "latency_model.png"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "alexnet",
          "squeezenet1_0", "shufflenet_v2_x1_0", "regnet_y_400mf", "mnasnet0_5"]


@dataclass
class Case:
    label: str
    before: torch.fx.GraphModule
    after: torch.fx.GraphModule
    inputs: tuple
    dims: dict
    training: bool = False  # a training step (forward, backward, SGD update) rather than the eval forward
    after_dims: dict = field(default_factory=dict)  # what the data decides in the rewritten graph (DRNet's shares)
    after_context: Callable[[], ContextManager] = contextlib.nullcontext  # the rewritten graph runs inside it


class MLP(nn.Module):
    """ViT-B's MLP block: fc1, GELU, fc2."""

    def __init__(self, width: int = 768, hidden: int = 3072):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WordLM(nn.Module):
    def __init__(self, vocab: int = 2000, hidden: int = 650, dropout: float = 0.0):
        super().__init__()
        self.embedding, self.lstm = nn.Embedding(vocab, hidden), nn.LSTM(hidden, hidden, 2, dropout=dropout)
        self.drop, self.decoder = nn.Dropout(dropout), nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.decoder(self.drop(self.lstm(self.drop(self.embedding(tokens)))[0]))


def _rewrite(label: str, model: nn.Module, x: torch.Tensor, dim: tuple[str, int, int], spec: str,
             baseline: str | None = None, training: bool = False) -> Case:
    name, axis, size = dim
    torch.manual_seed(0)
    gm = fr.trace(model.train(training), (x,), {name: (0, axis)})
    before = fr.apply(gm, baseline).graph_module if baseline else gm
    after = fr.apply(gm, f"{baseline},{spec}" if baseline else spec).graph_module
    return Case(label, before, after, (x,), {name: size}, training)


def _drnet_case(shares: tuple[float, ...], resolutions: tuple[int, ...] = (112, 84, 56), batch: int = 16) -> Case:
    """DRNet's grouped dispatch on ResNet-18: images forced to the resolutions at ``shares``, predicted with
    the same shares given to the latency model (p_<resolution>)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, resolutions[0], resolutions[0])
    gm = fr.trace(torchvision.models.resnet18().eval(), (x,), {"N": (0, 0)})
    drnet = fr.apply(gm, f"dynamic_resolution(resolutions={resolutions})").graph_module
    label = "/".join(f"{100 * s:.0f}%" for s in shares)
    indices = torch.repeat_interleave(torch.arange(len(shares)), torch.tensor([round(s * batch) for s in shares]))
    return Case(f"dynamic_resolution ResNet-18 {'/'.join(map(str, resolutions))}px at {label}, batch {batch}",
                gm, drnet, (x,), {"N": batch},
                after_dims={f"p_{r}": s for r, s in zip(resolutions[1:], shares[1:])},
                after_context=functools.partial(force_resolution, drnet, indices))


def rewrite_cases(quick: bool) -> list[Case]:
    cases = []
    linears = [(256, 256), (768, 3072)] if quick else [(256, 256), (768, 3072), (1024, 4096)]
    for (k, n) in linears:
        for batch in ((1, 8) if quick else (1, 8, 64)):
            cases.append(_rewrite(f"int8 Linear {k}->{n} batch {batch}", nn.Linear(k, n), torch.randn(batch, k),
                                  ("N", 0, batch), "lower_int8"))
    if quick:
        return cases
    for channels, size, kernel in ((64, 56, 3), (128, 28, 3), (256, 14, 1)):
        for batch in (1, 8, 64):
            conv = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=kernel // 2))
            cases.append(_rewrite(f"int8 Conv2d {channels}ch {kernel}x{kernel} {size}px batch {batch}", conv,
                                  torch.randn(batch, channels, size, size), ("N", 0, batch), "lower_int8"))
    for reduction in (2, 4, 12):
        for batch in (1, 20, 200):
            cases.append(_rewrite(f"low-rank 768->3072 {reduction}x batch {batch}", nn.Linear(768, 3072),
                                  torch.randn(batch, 768), ("N", 0, batch),
                                  f"sparse_lowrank(flop_reduction={reduction})"))
    for form in ("group", "sparse_lr"):
        for reduction in (4, 12):
            for batch in (20, 200):
                cases.append(_rewrite(f"{form} 768->3072 {reduction}x batch {batch}", nn.Linear(768, 3072),
                                      torch.randn(batch, 768), ("N", 0, batch),
                                      f"sparse_lowrank(form={form!r}, flop_reduction={reduction})"))
    for batch in (1, 20):
        cases.append(_rewrite(f"low-rank LSTM gates 1500->6000 4x batch {batch}", nn.Linear(1500, 6000),
                              torch.randn(batch, 1500), ("N", 0, batch), "sparse_lowrank(flop_reduction=4)"))
    for reduction in (4, 12):
        cases.append(_rewrite(f"ViT-B MLP {reduction}x, 197 tokens", MLP(), torch.randn(1, 197, 768),
                              ("T", 1, 197), f"sparse_lowrank(flop_reduction={reduction})"))
    cases.append(_rewrite("LSTM LM H=650 gates 4x, T=35 B=20", WordLM(), torch.randint(0, 2000, (35, 20)),
                          ("T", 0, 35), "sparse_lowrank(flop_reduction=4)", baseline="decompose_lstm"))
    for batch in (1, 8):
        cases.append(_rewrite(f"fold_batchnorm ResNet-18 batch {batch}", torchvision.models.resnet18(),
                              torch.randn(batch, 3, 224, 224), ("N", 0, batch), "fold_batchnorm"))
    for shares in ((0.5, 0.3, 0.2), (0.2, 0.3, 0.5)):
        cases.append(_drnet_case(shares))
    for hidden in (200, 650):
        for recurrent in (False, True):
            cases.append(_rewrite(f"structured_dropout per_step{' +h' if recurrent else ''} LSTM LM H={hidden}, "
                                  "T=35 B=20, training step", WordLM(hidden=hidden, dropout=0.5),
                                  torch.randint(0, 2000, (35, 20)), ("T", 0, 35),
                                  f"structured_dropout(p=0.5, mode='per_step', recurrent={recurrent})", training=True))
    for channels, size in ((64, 56), (256, 14)):
        for keep in (0.5, 0.3):
            convs = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
            cases.append(_rewrite(f"error_map_pruning keep {keep} {channels}ch {size}px batch 16, training step",
                                  convs, torch.randn(16, channels, size, size), ("N", 0, 16),
                                  f"error_map_pruning(keep={keep})", training=True))
    return cases


def eval_call(gm: torch.fx.GraphModule, inputs: tuple, context: Callable[[], ContextManager] = contextlib.nullcontext):
    def call():
        with torch.no_grad(), context():
            return gm(*inputs)
    return call


def _training_call(gm: torch.fx.GraphModule, inputs: tuple,
                   context: Callable[[], ContextManager] = contextlib.nullcontext):
    """What the latency model's training step prices: forward, backward of the summed output, SGD update."""
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-6)

    def call():
        optimizer.zero_grad(set_to_none=True)
        with context():
            gm(*inputs).sum().backward()
        optimizer.step()
    return call


def measure_rewrites(cases: list[Case], profile, repeats: int) -> list[list[object]]:
    rows = []
    for case in tqdm(cases, desc="rewrites", leave=False):
        case.before.train(case.training), case.after.train(case.training)
        call = _training_call if case.training else eval_call
        candidates = {"before": call(case.before, case.inputs),
                      "after": call(case.after, case.inputs, case.after_context)}
        times = time_steady(candidates, repeats)
        cold = time_side_by_side(candidates, repeats=repeats)
        predicted = (fr.cost(case.before, training=case.training).latency(profile, **case.dims).seconds
                     / fr.cost(case.after, training=case.training).latency(profile, **case.dims,
                                                                            **case.after_dims).seconds)
        measured = times["before"] / times["after"]
        rows.append([case.label, f"{measured:.2f}x", f"{predicted:.2f}x", predicted / measured - 1,
                     f"{cold['before'] / cold['after']:.2f}x"])
    return rows


def measure_models(names: list[str], batches: tuple[int, ...], profile, repeats: int) -> list[list[object]]:
    rows = []
    for name in tqdm(names, desc="models", leave=False):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        gm = fr.trace(model, (torch.randn(1, 3, 224, 224),), {"N": (0, 0)})
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224)
            measured = time_side_by_side({"model": eval_call(gm, (x,))}, repeats=repeats)["model"]
            predicted = fr.cost(gm).latency(profile, N=batch).seconds
            rows.append([f"{name} batch {batch}", f"{measured * 1e3:.1f} ms", f"{predicted * 1e3:.1f} ms",
                         predicted / measured - 1])
    return rows


def _share_within(errors: list[float], bound: float) -> float:
    return sum(abs(e) <= bound for e in errors) / len(errors)


def plot(rewrites: list[list[object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [float(row[1][:-1]) for row in rewrites]
    predicted = [float(row[2][:-1]) for row in rewrites]
    figure, axes = plt.subplots(figsize=(5.5, 5))
    axes.scatter(measured, predicted, s=18)
    top = max(measured + predicted) * 1.1
    axes.plot([0, top], [0, top], color="grey", linewidth=1, label="predicted = measured")
    axes.fill_between([0, top], [0, top * 0.8], [0, top * 1.2], color="grey", alpha=0.15, label="within 20%")
    axes.set_xlabel("measured speedup")
    axes.set_ylabel("predicted speedup")
    axes.set_title(f"{len(rewrites)} rewrites, predicted before running")
    axes.legend(loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle:
        figure.savefig(handle.name, dpi=110)
    os.replace(handle.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases on a tiny grid; writes nothing")
    parser.add_argument("--profile", help="use this profile instead of calibrating at the start")
    args = parser.parse_args()
    fix_threads()
    with tempfile.TemporaryDirectory() as scratch:
        profile = (load_profile(args.profile) if args.profile
                   else fr.calibrate(Path(scratch) / "profile.json", quick=args.quick))
        rewrites = measure_rewrites(rewrite_cases(args.quick), profile, repeats=5 if args.quick else 15)
        models = measure_models(MODELS[:1] if args.quick else MODELS, (1,) if args.quick else (1, 8), profile,
                                repeats=3 if args.quick else 7)
    errors = [row[3] for row in rewrites]
    model_errors = [row[3] for row in models]
    cold_errors = [float(row[2][:-1]) / float(row[4][:-1]) - 1 for row in rewrites]
    summary = (f"Rewrites: {len(rewrites)}; median |error| of the predicted speedup "
               f"{100 * statistics.median(abs(e) for e in errors):.1f}%, within 20%: "
               f"{100 * _share_within(errors, 0.2):.0f}% of cases (goal: median <= 10%, >= 90% within 20%); "
               f"against the interleaved cold speedups: median "
               f"{100 * statistics.median(abs(e) for e in cold_errors):.1f}%, "
               f"within 20%: {100 * _share_within(cold_errors, 0.2):.0f}%.  \n"
               f"Whole models: {len(models)}; within 25%: {100 * _share_within(model_errors, 0.25):.0f}%, median "
               f"|error| {100 * statistics.median(abs(e) for e in model_errors):.1f}%.")
    for row in rewrites + models:
        row[3] = f"{100 * row[3]:+.0f}%"
    rewrite_header = ["rewrite", "measured (steady)", "predicted", "error", "measured, interleaved cold"]
    body = "\n\n".join([summary, markdown_table(rewrite_header, rewrites),
                        markdown_table(["model (eval, 224x224)", "measured", "predicted", "error"], models),
                        f"![predicted vs measured speedup](images/{PLOT.name})"])
    print(body)
    if not args.quick:
        plot(rewrites, PLOT)
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
