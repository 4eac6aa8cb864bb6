"""Sparse int8 kernels on ADMM's LeNet-5: each layer on the sparse kernel, the dense int8 kernel and fp32, and
the whole model lowered by lower_int8 (which picks sparse or dense per layer) against fp32, at batch 64 and
1000, with the cost model's certified FLOPs and the predictions against the ADMM model on the test set.

The ADMM model comes from examples/admm_lenet5.py (its ``compress``: baseline training, ADMM pruning to 2-20%
density and 4-bit quantization, ~5-10 min on 2 cores), cached in the fxreduce cache directory.

    python benchmarks/bench_sparse_int8.py            # full run, rewrites its section of docs/benchmarks.md
    python benchmarks/bench_sparse_int8.py --quick    # the example's quick model, few repeats, writes nothing
    python benchmarks/bench_sparse_int8.py --cpu-time # 1 thread, CPU seconds: figures that survive a loaded machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(ROOT / "examples"))
from _common import fix_threads, markdown_table, shuffled_rounds, time_side_by_side, time_warm, write_section  # noqa: E402
from admm_lenet5 import PRUNE, LeNet5, compress, load_mnist  # noqa: E402

import fxreduce as fr  # noqa: E402
from fxreduce.modules.int8 import Int8Conv2d, Int8Linear  # noqa: E402
from fxreduce.modules.sparse_int8 import SparseInt8Conv2d, SparseInt8Linear  # noqa: E402
from fxreduce.passes.lower_int8 import to_int8  # noqa: E402

TITLE = "Sparse int8 kernels (ADMM LeNet-5)"
BATCHES = (64, 1000)
GOALS = {"fc1": 3.0, "conv2": 1.5}  # sparse over dense int8, the must-show


def cpu_seconds(candidates: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds of this thread per call (each timed call after an untimed one, rounds shuffled): with
    one thread, what a call costs however many other jobs share the cores."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for order in shuffled_rounds(list(candidates), repeats):
        for name in order:
            candidates[name]()
            start = time.thread_time()
            candidates[name]()
            samples[name].append(time.thread_time() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


TIMERS = {"wall": (time_warm, lambda candidates, repeats: time_side_by_side(candidates, repeats=repeats)),
          "cpu": (cpu_seconds, cpu_seconds)}
TIMER = {"layer": time_warm, "model": TIMERS["wall"][1]}


def cache_path(quick: bool) -> Path:
    root = os.environ.get("FXREDUCE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxreduce")
    return Path(root) / f"admm_lenet5{'_quick' if quick else ''}.pt"


def admm_model(quick: bool) -> nn.Module:
    """The example's ADMM-compressed LeNet-5 (fp32 arithmetic), trained once and cached."""
    path = cache_path(quick)
    model = LeNet5()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    trained = compress(quick, PRUNE).model
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trained.state_dict(), path)
    return trained.eval()


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's input on ``x``, recorded by forward hooks."""
    seen, hooks = {}, []

    def record(name: str):
        def hook(module, args, out) -> None:
            seen[name] = args[0]
        return hook

    for name in ("conv1", "conv2", "fc1", "fc2"):
        hooks.append(getattr(model, name).register_forward_hook(record(name)))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def nonzero_macs(model: nn.Module, image: torch.Tensor) -> int:
    """Multiply-adds per image of the non-zero weights: each layer's non-zeros x its output pixels."""
    inputs = layer_inputs(model, image[:1])
    total = 0
    for name, x in inputs.items():
        layer = getattr(model, name)
        with torch.no_grad():
            out = layer(x)
        pixels = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
        total += int((layer.weight != 0).sum()) * pixels
    return total


def variants(layer: nn.Module, x: torch.Tensor, relu: bool) -> dict[str, nn.Module]:
    """fp32, dense int8 and sparse int8 forms of one layer (ReLU fused where lower_int8 fuses it)."""
    weights = to_int8(layer.weight)
    bias = layer.bias.detach()
    fp32 = nn.Sequential(layer, nn.ReLU()) if relu else layer
    if isinstance(layer, nn.Linear):
        return {"fp32": fp32, "dense int8": Int8Linear.from_int8(weights.values, weights.scales, bias, relu),
                "sparse int8": SparseInt8Linear.from_int8(weights.values, weights.scales, bias, relu)}
    with torch.no_grad():
        y = layer(x)
    geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                    input_range=(float(x.min()), float(x.max())), relu=relu)
    return {"fp32": fp32,
            "dense int8": Int8Conv2d.from_int8(weights.values, weights.scales, bias, groups=1,
                                               output_range=(float(y.min()), float(y.max())), **geometry),
            "sparse int8": SparseInt8Conv2d.from_int8(weights.values, weights.scales, bias, **geometry)}


def bench_layers(model: nn.Module, images: torch.Tensor, picks: dict[str, str],
                 repeats: int) -> tuple[str, list[str]]:
    """Each layer on fp32, dense int8 and sparse int8; the goals apply to the kernel lower_int8 picks."""
    rows, misses = [], []
    for batch in BATCHES:
        inputs = layer_inputs(model, images[:batch])
        for name in ("conv1", "conv2", "fc1", "fc2"):
            layer, x = getattr(model, name), inputs[name]
            candidates = variants(layer, x, relu=name == "fc1")
            density = float((layer.weight != 0).float().mean())
            with torch.no_grad():
                times = TIMER["layer"]({key: (lambda m=m: m(x)) for key, m in candidates.items()}, repeats)
            sparse_vs_dense = times["dense int8"] / times["sparse int8"]
            picked = times["dense int8"] / times[picks[name]]
            goal = GOALS.get(name, 1.0)
            if picked < goal:
                misses.append(f"{name} at batch {batch}: {picks[name]} {picked:.2f}x dense int8, goal {goal}x")
            rows.append([name, batch, f"{density:.1%}", f"{times['fp32'] * 1e3:.3f}",
                         f"{times['fp32'] / times['dense int8']:.2f}x", f"{times['fp32'] / times['sparse int8']:.2f}x",
                         f"{sparse_vs_dense:.2f}x", picks[name], f"**{picked:.2f}x** (goal {goal}x)"])
            print(rows[-1], flush=True)
    table = markdown_table(["layer", "batch", "density", "fp32 ms", "dense int8 / fp32", "sparse int8 / fp32",
                            "sparse / dense int8", "lower_int8 picks", "picked / dense int8"], rows)
    return table, misses


def lower(model: nn.Module, train_x: torch.Tensor, x_test: torch.Tensor):
    """The traced fp32 model and lower_int8's results with its default crossover and with every layer dense."""
    fp32 = fr.trace(model, (x_test[:2],), {"N": (0, 0)})
    result = fr.apply(fp32, fr.Pipeline([fr.get_pass("lower_int8")(calibration=train_x[:512])]))
    dense = fr.apply(fp32, fr.Pipeline([fr.get_pass("lower_int8")(calibration=train_x[:512], sparse_density=0.0)]))
    return fp32, result, dense


SWEEP = {  # name: (kind, in, out, (kernel, size) for convs, batches)
    "Linear 800->500 (fc1)": ("linear", 800, 500, None, (64, 1000)),
    "Linear 1024->1024": ("linear", 1024, 1024, None, (64, 1000)),
    "Conv2d 20->50 5x5 on 12x12 (conv2)": ("conv", 20, 50, (5, 12), (64, 256)),
    "Conv2d 64->64 3x3 on 28x28, pad 1": ("conv", 64, 64, (3, 28), (64,)),
}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)


def bench_crossover(repeats: int) -> str:
    """Sparse over dense int8 on random int8 weights at several densities: where lower_int8's crossover comes from."""
    rows = []
    for name, (kind, cin, cout, conv, batches) in SWEEP.items():
        for batch in batches:
            cells = [name, batch]
            for density in DENSITIES:
                g = torch.Generator().manual_seed(0)
                shape = (cout, cin) if kind == "linear" else (cout, cin, conv[0], conv[0])
                weight = (torch.randint(-8, 9, shape, generator=g) * (torch.rand(shape, generator=g) < density)).to(
                    torch.int8)
                scale = torch.rand(cout, generator=g) * 0.01 + 1e-3
                if kind == "linear":
                    x = torch.randn(batch, cin, generator=g)
                    dense, sparse = Int8Linear.from_int8(weight, scale), SparseInt8Linear.from_int8(weight, scale)
                else:
                    x = torch.randn(batch, cin, conv[1], conv[1], generator=g)
                    pad = conv[0] // 2 if conv[0] == 3 else 0
                    geometry = dict(stride=(1, 1), padding=(pad, pad), dilation=(1, 1), input_range=(-3.0, 3.0))
                    dense = Int8Conv2d.from_int8(weight, scale, None, groups=1, output_range=(-50.0, 50.0), **geometry)
                    sparse = SparseInt8Conv2d.from_int8(weight, scale, None, **geometry)
                with torch.no_grad():
                    times = TIMER["layer"]({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats)
                cells.append(f"{times['dense'] / times['sparse']:.2f}x")
            rows.append(cells)
            print(rows[-1], flush=True)
    return markdown_table(["shape", "batch", *(f"{d:.0%}" for d in DENSITIES)], rows)


def bench_model(fp32, result, dense, test: tuple, repeats: int) -> tuple[str, dict]:
    x_test, y_test = test
    lowered, dense_int8 = result.graph_module, dense.graph_module
    with torch.no_grad():
        reference = fp32(x_test).argmax(1)
        agree = float((lowered(x_test).argmax(1) == reference).float().mean())
        agree_dense = float((dense_int8(x_test).argmax(1) == reference).float().mean())
        accuracy = {name: float((m(x_test).argmax(1) == y_test).float().mean())
                    for name, m in (("fp32", fp32), ("sparse", lowered), ("dense", dense_int8))}
    flops_fp32 = int(fr.cost(fp32).at(N=1).flops)
    flops_dense = int(fr.cost(dense_int8).at(N=1).flops)
    flops_sparse = int(fr.cost(lowered).at(N=1).flops)
    rows = []
    speed = {}
    with torch.no_grad():
        for batch in BATCHES:
            x = x_test[:batch]
            times = TIMER["model"]({"fp32": lambda: fp32(x), "dense int8": lambda: dense_int8(x),
                                    "lower_int8": lambda: lowered(x)}, repeats)
            speed[batch] = times["fp32"] / times["lower_int8"]
            rows.append([batch, f"{times['fp32'] * 1e3:.3f}", f"{times['fp32'] / times['dense int8']:.2f}x",
                         f"**{speed[batch]:.2f}x**", f"{times['dense int8'] / times['lower_int8']:.2f}x"])
            print(rows[-1], flush=True)
    kernels = [line for line in result.report.lines() if "int8 " in line]
    figures = dict(agree=agree, agree_dense=agree_dense, accuracy=accuracy, speed=speed, flops=(flops_fp32,
                   flops_dense, flops_sparse), kernels=kernels)
    table = markdown_table(["batch", "fp32 ms", "dense int8 (sparse_density=0) / fp32", "lower_int8 / fp32",
                            "lower_int8 / dense int8"], rows)
    return table, figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the example's quick model, few repeats, writes nothing")
    parser.add_argument("--cpu-time", action="store_true",
                        help="1 thread, CPU seconds of the calling thread instead of wall time (a loaded machine)")
    args = parser.parse_args(argv)
    fix_threads(1 if args.cpu_time else 2)
    TIMER["layer"], TIMER["model"] = TIMERS["cpu" if args.cpu_time else "wall"]
    model = admm_model(args.quick)
    (train_x, _), test = load_mnist(args.quick)
    test_images = torch.cat([test[0]] * (1 + max(BATCHES) // len(test[0])))  # batch 1000 from a quick test set
    repeats = 5 if args.quick else 41
    fp32, result, dense = lower(model, train_x, test[0])
    picks = {name: "sparse int8" if "Sparse" in type(module).__name__ else "dense int8"
             for name, module in result.graph_module.named_modules() if "Int8" in type(module).__name__}
    layer_table, misses = bench_layers(model, test_images, picks, repeats)
    sweep = bench_crossover(3 if args.quick else 11)
    model_table, figures = bench_model(fp32, result, dense, test, repeats)
    fp32_flops, dense_flops, sparse_flops = figures["flops"]
    print(f"FLOPs per image: fp32 {fp32_flops:,}, dense int8 {dense_flops:,}, lower_int8 {sparse_flops:,}")
    print(f"same predictions as the ADMM model: lower_int8 {figures['agree']:.2%}, "
          f"dense int8 {figures['agree_dense']:.2%}")
    if figures["speed"][1000] < 6.0:
        misses.append(f"whole model at batch 1000: {figures['speed'][1000]:.2f}x fp32, goal 6x")
    print("goals missed: " + ("; ".join(misses) if misses else "none"))
    if args.quick:
        return
    load = os.getloadavg()
    pruned = nonzero_macs(model, test[0])
    accuracy = figures["accuracy"]
    body = f"""The ADMM-compressed LeNet-5 of `examples/admm_lenet5.py` (pruned to {', '.join(f'{k} {1 - v:.0%}'
for k, v in PRUNE.items())} density, 4-bit levels), cached after its first training. Load average at the end
of the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min; the machine is shared).

Per layer, each layer's real input from the test images, medians of warm interleaved calls (`time_warm`):

{layer_table}

Whole model: fp32 (the ADMM model, traced), `lower_int8(sparse_density=0)` (every layer on the dense int8
kernel) and `lower_int8` (sparse or dense per layer by density; each conv's following max_pool2d runs in the
sparse conv's kernel, `fuse_pool`, so the conv's full-size output is never written: the per-layer rows above
time the convs unpooled), medians of interleaved calls:

{model_table}

The crossover: sparse over dense int8 (time ratio, above 1: sparse faster) on random int8 weights at each
density, 2 threads, medians of warm interleaved calls. lower_int8 runs a layer sparse at or below 5% non-zeros
(`sparse_density`), 20% for a conv reducing over at most 512 inputs, and never below 16 output channels:

{sweep}

lower_int8's choices (its report):

{chr(10).join('- ' + line.strip() for line in figures['kernels'])}

Cost model, FLOPs per image: fp32 {fp32_flops:,}; dense int8 {dense_flops:,}; lower_int8 {sparse_flops:,}
(**{fp32_flops / sparse_flops:.1f}x fewer**). The pruning ratio of the multiply-adds (fp32 FLOPs over twice the
non-zero weights x output pixels, {pruned:,}) is {fp32_flops / (2 * pruned):.1f}x; what lower_int8 leaves of the
difference is the layers its crossover keeps on the dense kernel (their zeros still multiplied).
Test accuracy: fp32 ADMM model {accuracy['fp32']:.2%}, lower_int8 {accuracy['sparse']:.2%}, dense int8
{accuracy['dense']:.2%}; same predictions as the ADMM model on {figures['agree']:.2%} of the test images
(dense int8: {figures['agree_dense']:.2%}).

Goals missed: {'; '.join(misses) if misses else 'none'}.
"""
    if args.cpu_time:
        body = body.replace("medians of warm interleaved calls (`time_warm`)", "median CPU seconds of warm interleaved "
                            "calls (`cpu_seconds`)")
        body = body.replace("medians of warm interleaved calls", "median CPU seconds of warm interleaved calls")
        body = body.replace("medians of interleaved calls", "median CPU seconds of interleaved calls")
        body = body.replace("density, 2 threads,", "density, 1 thread,")
    write_section(TITLE + (" - 1 thread, CPU time" if args.cpu_time else ""), body, per_isa=True)


if __name__ == "__main__":
    main()
