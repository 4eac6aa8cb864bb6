"""How long tracing, costing and the shipped pipeline take, and how that time grows with graph size.

Part 1 traces torchvision's ResNet-50 with N, H and W symbolic and times each phase inside one real
``fxreduce.trace`` call (capture with torch.fx; the symbolic fake-tensor run; turning its records
into per-node sympy costs), then the costing calls a user makes: the forward FLOPs formula, its value
at N=1, H=W=224, and a training-step count (forward + backward).

Part 2 builds residual MLPs of about 1k, 2k, 4k and 8k fx nodes (Linear -> BatchNorm1d or nothing ->
ReLU -> Dropout or nothing -> Linear, plus the skip add; half the blocks hold a BatchNorm, half a
Dropout, so every shipped pass has work) and times trace, cost and ``fr.apply`` with
"fold_batchnorm,remove_dropout,eliminate_dead_code". Sizes are measured round-robin in each repeat
and the median is reported. The goal is linear growth: time(2n) / time(n) <= 2.3 for each doubling.

Times are process CPU seconds (time.process_time) next to wall seconds: the work is single-threaded
Python, and CPU time stays comparable when other jobs share the machine, where wall time does not.
The ratios use CPU time; the load average at the start and end of the run is written with them.

    python benchmarks/bench_pipeline.py --repeats 5   # full run (~25 min on 2 cores), rewrites its section
                                                      # of docs/benchmarks.md
    python benchmarks/bench_pipeline.py --quick       # small sizes, one repeat, prints only (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fix_threads, markdown_table, write_section  # noqa: E402

import fxreduce as fr  # noqa: E402
from fxreduce import pipeline as fr_pipeline  # noqa: E402
from fxreduce import tracing as fr_tracing  # noqa: E402
from fxreduce.cost_models import propagation as fr_propagation  # noqa: E402
from fxreduce.passes import Pass  # noqa: E402

TITLE = "Tracing, costing and pipeline scaling"
SPEC = "fold_batchnorm,remove_dropout,eliminate_dead_code"
GOAL = 2.3
WIDTH = 16


# --- phase timers: wrap the functions fxreduce calls, so phases are timed inside the real calls ------


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now."""
    return time.perf_counter(), time.process_time()


class Phases:
    """CPU seconds spent in named functions during a call, collected by temporarily wrapping them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def wrap(self, owner: object, attribute: str, phase: str) -> Iterator[None]:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.process_time() - start

        setattr(owner, attribute, timed)
        try:
            yield
        finally:
            setattr(owner, attribute, original)


@contextlib.contextmanager
def no_time_limit(owner: object) -> Iterator[None]:
    """Call ``owner.propagate`` without its wall-clock limit (default 60 s): a slow, loaded machine must
    not turn the benchmark into a measurement of the fallback to concrete dims."""
    original = owner.propagate
    owner.propagate = lambda *args, **kwargs: original(*args, **{**kwargs, "time_limit": None})
    try:
        yield
    finally:
        owner.propagate = original


def stays_symbolic(gm, dims: tuple[str, ...]) -> None:
    symbolic = fr_propagation.graph_info(gm).symbolic
    if set(dims) - set(symbolic):
        raise RuntimeError(f"dims {sorted(set(dims) - set(symbolic))} were specialised: "
                           f"{dict(fr_propagation.graph_info(gm).specialised)}")


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result) of one call."""
    wall, cpu = clock()
    value = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, value


# --- part 1: ResNet-50 ------------------------------------------------------------------------------


def resnet_case(name: str, image: int) -> dict[str, object]:
    """One trace + cost of a torchvision model, split into phases: {phase: (CPU s, wall s)} and numbers."""
    import torchvision

    model = getattr(torchvision.models, name)().eval()
    phases = Phases()
    with contextlib.ExitStack() as stack:
        stack.enter_context(phases.wrap(fr_tracing, "_capture", "capture"))
        stack.enter_context(phases.wrap(fr_tracing, "propagate", "propagate"))
        stack.enter_context(phases.wrap(fr_propagation, "_run_with_fallback", "fake run"))
        cpu, wall, gm = timed(lambda: fr.trace(model, (torch.randn(2, 3, image, image),),
                                               {"N": (0, 0), "H": (0, 2), "W": (0, 3)}, time_limit=None))
    stays_symbolic(gm, ("N", "H", "W"))
    seconds: dict[str, tuple[float, float | None]] = {
        "trace (total)": (cpu, wall),
        "- capture (deepcopy + fx symbolic trace)": (phases.seconds["capture"], None),
        "- fake-tensor run (shapes + op counts)": (phases.seconds["fake run"], None),
        "- node costs (sympy conversion, params, bytes)":
            (phases.seconds["propagate"] - phases.seconds["fake run"], None),
    }
    cpu, wall, formula = timed(lambda: fr.cost(gm).flops)
    seconds["fr.cost(gm).flops (formula)"] = (cpu, wall)
    cpu, wall, value = timed(lambda: fr.cost(gm).at(N=1, H=224, W=224).flops)
    seconds["fr.cost(gm).at(N=1, H=224, W=224).flops"] = (cpu, wall)
    cpu, wall, step = timed(lambda: fr.cost(gm, training=True))
    seconds["fr.cost(gm, training=True) (forward + backward run)"] = (cpu, wall)
    cpu, wall, step_value = timed(lambda: step.at(N=1, H=224, W=224).flops)
    seconds["training step .at(N=1, H=224, W=224).flops"] = (cpu, wall)
    return {"seconds": seconds, "nodes": len(gm.graph.nodes), "flops": int(value),
            "training_flops": int(step_value), "terms": len(formula.args)}


# --- part 2: synthetic residual MLPs ----------------------------------------------------------------


class Block(nn.Module):
    """x + fc2(drop?(relu(bn?(fc1(x))))): 5 fx nodes; even blocks hold a BatchNorm1d, odd a Dropout."""

    def __init__(self, width: int, index: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width) if index % 2 == 0 else None
        self.drop = nn.Dropout(0.1) if index % 2 == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        if self.bn is not None:
            y = self.bn(y)
        y = self.act(y)
        if self.drop is not None:
            y = self.drop(y)
        return x + self.fc2(y)


def residual_mlp(blocks: int, width: int = WIDTH) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width, i) for i in range(blocks)]).eval()


def pipeline_case(blocks: int) -> dict[str, float | int]:
    """Trace, cost and apply the shipped pipeline once: CPU seconds per phase, wall total, graph sizes."""
    model = residual_mlp(blocks)
    start = clock()
    trace_s, _, gm = timed(lambda: fr.trace(model, (torch.randn(4, WIDTH),), {"N": (0, 0)}, time_limit=None))
    stays_symbolic(gm, ("N",))
    cost_s, _, _ = timed(lambda: (fr.cost(gm).flops, fr.cost(gm).at(N=1).flops))
    phases = Phases()
    with contextlib.ExitStack() as stack:
        stack.enter_context(phases.wrap(Pass, "run", "passes"))
        stack.enter_context(no_time_limit(fr_pipeline))
        stack.enter_context(phases.wrap(fr_pipeline, "propagate", "repropagate"))
        apply_s, _, result = timed(lambda: fr.apply(gm, SPEC))
    stays_symbolic(result.graph_module, ("N",))
    wall = time.perf_counter() - start[0]
    rewrites = sum(len(step.rewrites) for step in result.report.steps)
    return {
        "trace": trace_s, "cost": cost_s, "apply": apply_s, "total": trace_s + cost_s + apply_s,
        "passes": phases.seconds["passes"], "repropagate": phases.seconds["repropagate"],
        "report": apply_s - phases.seconds["passes"] - phases.seconds["repropagate"], "wall": wall,
        "nodes": len(gm.graph.nodes), "nodes_after": len(result.graph_module.graph.nodes), "rewrites": rewrites,
    }


# --- running and reporting ---------------------------------------------------------------------------


def seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def load() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def run(quick: bool, repeats: int) -> str:
    model_name, image = ("resnet18", 64) if quick else ("resnet50", 224)
    blocks = (20, 40, 80) if quick else (200, 400, 800, 1600)
    cases = [("resnet", None, r) for r in range(repeats)]
    cases += [("mlp", b, r) for r in range(repeats) for b in blocks]  # round-robin over sizes per repeat
    resnet_runs: list[dict] = []
    mlp_runs: dict[int, list[dict]] = defaultdict(list)
    warm = fr.trace(residual_mlp(2), (torch.randn(4, WIDTH),), {"N": (0, 0)})  # warm-up: imports, first calls
    fr.apply(warm, SPEC)
    load_before = load()
    for kind, size, _ in tqdm(cases, desc="bench_pipeline", unit="case"):
        if kind == "resnet":
            resnet_runs.append(resnet_case(model_name, image))
        else:
            mlp_runs[size].append(pipeline_case(size))
    load_after = load()

    first = resnet_runs[0]
    rows = []
    for phase, (_, wall) in first["seconds"].items():
        cpu_median = statistics.median(run["seconds"][phase][0] for run in resnet_runs)
        wall_median = statistics.median(run["seconds"][phase][1] for run in resnet_runs) if wall is not None else None
        rows.append([phase, seconds(cpu_median), seconds(wall_median) if wall_median is not None else ""])
    part1 = (
        f"### {model_name}: trace and cost\n\n"
        f"`fr.trace(torchvision.models.{model_name}().eval(), (torch.randn(2, 3, {image}, {image}),), "
        f'{{"N": (0, 0), "H": (0, 2), "W": (0, 3)}})`, {first["nodes"]} fx nodes; median of {repeats} '
        f"run(s). The rows marked - split the trace call by phase (CPU time inside the real call). "
        f"Forward FLOPs at N=1, H=W=224: {first['flops']:,} (a formula of {first['terms']} terms in N, H, W); "
        f"training step: {first['training_flops']:,}.\n\n"
        + markdown_table(["phase", "CPU s", "wall s"], rows)
    )

    medians = {b: {key: statistics.median(run[key] for run in mlp_runs[b]) for key in mlp_runs[b][0]}
               for b in blocks}
    columns = ["trace", "cost", "apply", "passes", "repropagate", "report", "total"]
    table = [[medians[b]["nodes"], medians[b]["nodes_after"], medians[b]["rewrites"],
              *(seconds(medians[b][c]) for c in columns), seconds(medians[b]["wall"])] for b in blocks]
    ratio_rows = []
    worst: dict[str, float] = {}
    for small, large in zip(blocks, blocks[1:]):
        ratios = {c: medians[large][c] / medians[small][c] for c in columns}
        for c, r in ratios.items():
            worst[c] = max(worst.get(c, 0.0), r)
        ratio_rows.append([f"{medians[small]['nodes']} -> {medians[large]['nodes']}",
                           *(f"{ratios[c]:.2f}" for c in columns)])
    over = [c for c in ("trace", "cost", "apply", "total") if worst[c] > GOAL]
    verdict = (f"Every doubling stays within the goal of {GOAL} for trace, cost, apply and the total."
               if not over else
               f"Above the goal of {GOAL}: {', '.join(f'{c} (worst {worst[c]:.2f})' for c in over)}.")
    sub = [c for c in ("passes", "repropagate", "report") if worst[c] > GOAL]
    if sub:
        verdict += (" Within apply, " + ", ".join(f"{c} grows by up to {worst[c]:.2f}x" for c in sub)
                    + " per doubling.")
    part2 = (
        f"### Pipeline scaling on residual MLPs\n\n"
        f"Residual blocks of Linear({WIDTH}) -> BatchNorm1d (even blocks) -> ReLU -> Dropout (odd blocks) -> "
        f"Linear({WIDTH}) + skip, input (N, {WIDTH}) with N symbolic; pipeline `{SPEC}`. Median CPU seconds "
        f"of {repeats} repeat(s), sizes measured round-robin; the last column is the wall time of the "
        f"whole case. *cost* is `fr.cost(gm).flops` plus `.at(N=1).flops`; *apply* is `fr.apply(gm, spec)`, "
        f"split into *passes* (Pass.run: copy, rewrite, lint, recompile), *repropagate* (the symbolic "
        f"fake-tensor run after each modifying pass) and *report* (the rest: per-rewrite costs, "
        f"certificates).\n\n"
        + markdown_table(["fx nodes", "nodes after", "rewrites", *(f"{c} CPU s" for c in columns), "wall s"],
                         table)
        + f"\n\ntime(2n) / time(n) per doubling, CPU time (goal: <= {GOAL}):\n\n"
        + markdown_table(["doubling", *columns], ratio_rows)
        + f"\n\n{verdict} Load average (1, 5, 15 min) at the start: {load_before}; at the end: {load_after}."
    )
    return part1 + "\n\n" + part2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat, do not write docs")
    parser.add_argument("--repeats", type=int, help="repeats per case (default: 3, or 1 with --quick)")
    args = parser.parse_args(argv)
    fix_threads(2)
    repeats = args.repeats or (1 if args.quick else 3)
    body = run(args.quick, repeats)
    print(body)
    if not args.quick:
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
