"""DRNet eval throughput: the rewritten model vs the original, side by side, threads fixed.

Three ways to classify the same images:

    original        the backbone at the base resolution for every image
    DRNet           the rewritten graph: predictor, then the backbone once per chosen resolution
    run all + mask  what the public DRNet port does: every resolution for every image, logits masked

MNIST: the DRNet trained by examples/drnet_mnist.py (its checkpoint; trained here with the example's
recipe if missing), on the example's 1,000 test digits with the choices its predictor makes.
torchvision resnet50 at 224/168/112 (resnet18 at 64/48/32 with --quick): the same grouping at
ImageNet scale, the choices forced per image at the shares the MNIST predictor chose (no ImageNet
predictor is trained here; DRNet's untrained ResNet-10 predictor still runs, so its cost is paid).

    python benchmarks/bench_dynamic_resolution.py            # writes its section of docs/benchmarks.md
    python benchmarks/bench_dynamic_resolution.py --quick    # small, writes nothing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import drnet_mnist as example  # noqa: E402
from _common import fix_threads, markdown_table, time_side_by_side, write_section  # noqa: E402

import fxreduce as fr  # noqa: E402
from fxreduce.modules.dynamic_resolution import dynamic_resolution_parts, force_resolution  # noqa: E402
from fxreduce.training.dynamic_resolution import pretrain_multi_resolution, resolution_costs  # noqa: E402

TITLE = "DRNet dynamic resolution: eval throughput"


def run_all_and_mask(drnet: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The public port's evaluation: the backbone at every resolution for every image, one kept per image."""
    dispatch = dynamic_resolution_parts(drnet).dispatch
    outputs = torch.stack([dispatch.run_at(x, j) for j in range(len(dispatch.resolutions))])
    return outputs[indices, torch.arange(len(x))]


def mnist_drnet(config: example.Config, seed: int) -> tuple[example.Built, torch.Tensor, torch.Tensor]:
    """The example's trained DRNet (from its checkpoint, else trained now) and its test set."""
    (train_x, train_y), (test_x, test_y) = example.load_mnist(config, seed)
    built = example.build(config, seed, test_x[:2])
    if example.CHECKPOINT.exists() and config == example.Config():
        built.drnet.load_state_dict(torch.load(example.CHECKPOINT, weights_only=True)["state_dict"])
        return built, test_x, test_y
    print(f"no checkpoint at {example.CHECKPOINT}: training the example's DRNet", file=sys.stderr)
    data = example.Batches(train_x, train_y, config.batch, shuffle=True, seed=seed)
    pretrain_multi_resolution(built.drnet, data, epochs=config.pretrain_epochs, lr=config.lr, progress=True)
    target = config.targets[len(config.targets) // 2] * resolution_costs(built.drnet).backbone_flops[0]
    built.drnet = example.finetuned(built.drnet, built.drnet.state_dict(), data, config, target, seed, progress=True)
    return built, test_x, test_y


def row(name: str, batch: int, shares: list[float], seconds: dict[str, float], flops_ratio: float) -> list[object]:
    original, drnet, masked = (batch / seconds[key] for key in ("original", "DRNet", "run all + mask"))
    return [name, batch, "/".join(f"{s:.0%}" for s in shares), f"{original:,.0f}", f"{drnet:,.0f}",
            f"{drnet / original:.2f}x", f"{masked:,.0f}", f"{flops_ratio:.2f}"]


def measure(original, drnet, x: torch.Tensor, indices: torch.Tensor, repeats: int) -> dict[str, float]:
    """Images per second of the three ways, DRNet and the masked port on the same per-image choices
    (for the trained predictor, the choices it makes itself)."""
    with torch.no_grad(), force_resolution(drnet, indices):
        return time_side_by_side({"original": lambda: original(x), "DRNet": lambda: drnet(x),
                                  "run all + mask": lambda: run_all_and_mask(drnet, x, indices)}, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and inputs; writes nothing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threads = fix_threads()
    repeats = 3 if args.quick else 7
    config = example.QUICK if args.quick else example.Config()
    built, test_x, _ = mnist_drnet(config, args.seed)
    drnet = built.drnet.eval()
    parts = dynamic_resolution_parts(drnet)
    with torch.no_grad():
        chosen = parts.choice(parts.predictor(drnet.resolution_resize(test_x))).argmax(1)
    costs = resolution_costs(drnet)
    shares = torch.bincount(chosen, minlength=len(costs.resolutions)) / len(chosen)
    seconds = measure(built.traced.eval(), drnet, test_x, chosen, repeats)
    rows = [row(f"MNIST ResNet-8, {'/'.join(map(str, costs.resolutions))} px, trained predictor", len(test_x),
                shares.tolist(), seconds, costs.expected_flops(shares) / costs.backbone_flops[0])]

    name, resolutions, batch = ("resnet18", (64, 48, 32), 8) if args.quick else ("resnet50", (224, 168, 112), 16)
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(batch, 3, resolutions[0], resolutions[0])
    big = fr.apply(fr.trace(model, (x,)), f"dynamic_resolution(resolutions={resolutions})").graph_module.eval()
    generator = torch.Generator().manual_seed(args.seed)
    indices = torch.multinomial(shares, batch, replacement=True, generator=generator)
    shares = torch.bincount(indices, minlength=len(resolutions)) / batch
    big_costs = resolution_costs(big)
    seconds = measure(model, big, x, indices, repeats)
    rows.append(row(f"torchvision {name}, {'/'.join(map(str, resolutions))} px, forced at the MNIST shares", batch,
                    shares.tolist(), seconds, big_costs.expected_flops(shares) / big_costs.backbone_flops[0]))

    table = markdown_table(["model", "batch", "images per resolution", "original img/s", "DRNet img/s",
                            "DRNet speedup", "run all + mask img/s", "DRNet / original FLOPs"], rows)
    body = (f"{table}\n\nDRNet = the rewritten graph (predictor + one backbone run per chosen resolution); "
            "run all + mask = the public port's evaluation (every resolution for every image). FLOPs ratio "
            "from the cost model at the measured shares, predictor included. Threads fixed to "
            f"{threads}; interleaved medians of {repeats} runs.")
    print(body)
    if not args.quick:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
