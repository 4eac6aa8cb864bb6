"""Int8 kernels of lower_int8 against fp32 and the other int8 paths on the CPU, as ratios, threads fixed.

Linear at the issue's three shapes: fxreduce's Int8Linear, torch.ao's quantize_dynamic (the same fbgemm
kernel) and torchao's Int8DynamicActivationInt8WeightConfig in eager mode, each against fp32 nn.Linear (MKL), and
fxreduce's against fp32 on oneDNN with a prepacked weight (the faster fp32 kernel on this CPU).
The distinct Conv2d layers of ResNet-18 (224x224) at batch 1 and 8: Int8Conv2d (activation scales
calibrated on the same input) against fp32. Whole models: LeNet-5 (Caffe's) and ResNet-18 as traced fp32,
fp32 with BatchNorm folded, and fold_batchnorm + lower_int8.

    python benchmarks/bench_int8.py            # full run, rewrites its section of docs/benchmarks.md
    python benchmarks/bench_int8.py --quick    # small shapes, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fix_threads, markdown_table, time_side_by_side, time_warm, write_section  # noqa: E402

import fxreduce as fr  # noqa: E402
from fxreduce.modules.int8 import Int8Conv2d, Int8Linear  # noqa: E402
from fxreduce.passes.lower_int8 import to_int8  # noqa: E402

TITLE = "Int8 kernels (lower_int8)"
LINEAR_SHAPES = [(64, 1024, 1024), (256, 1024, 4096), (32, 4096, 4096)]
QUICK_LINEAR_SHAPES = [(16, 256, 256)]


def torchao_config():
    """torchao's eager int8 config, or None (with the reason) when torchao is not installed."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as error:
        return None, f"torchao is not installed ({error}); `pip install torchao` adds the column"
    return (quantize_, Int8DynamicActivationInt8WeightConfig), None


class OneDnnLinear(nn.Module):
    """fp32 Linear on oneDNN with the weight packed once for the batch size (what torch's CPU inductor backend
    emits): on this AMD CPU it runs the issue's shapes 2.7-3.2x faster than nn.Linear's MKL sgemm, so it is
    the fp32 baseline an int8 speedup should also be read against."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def ratio(times: dict[str, float], name: str, base: str = "fp32") -> str:
    return f"{times[base] / times[name]:.2f}x" if name in times else "n/a"


def bench_linear(shapes, repeats: int) -> tuple[str, list[str]]:
    torchao, missing = torchao_config()
    rows = []
    for m, k, n in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(k, n).eval()
        lowered = to_int8(linear.weight)
        int8 = Int8Linear.from_int8(lowered.values, lowered.scales, linear.bias.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
            per_channel = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(linear), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
        candidates = {"fp32": linear, "fp32 oneDNN": OneDnnLinear(linear, m), "fxreduce int8": int8,
                      "quantize_dynamic": dynamic, "quantize_dynamic per-channel": per_channel}
        if torchao is not None:
            quantize_, config = torchao
            ao = nn.Sequential(nn.Linear(k, n))
            ao.load_state_dict({"0." + key: value for key, value in linear.state_dict().items()})
            quantize_(ao, config())
            candidates["torchao eager"] = ao
        x = torch.randn(m, k)
        torch.testing.assert_close(candidates["fp32 oneDNN"](x), linear(x).detach(), rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            times = time_warm({name: (lambda f=f: f(x)) for name, f in candidates.items()}, repeats)
        rows.append([f"{m}x{k}x{n}", f"{times['fp32'] * 1e3:.3f}", ratio(times, "fp32 oneDNN"),
                     ratio(times, "fxreduce int8"), ratio(times, "fxreduce int8", "fp32 oneDNN"),
                     ratio(times, "quantize_dynamic"), ratio(times, "quantize_dynamic per-channel"),
                     ratio(times, "torchao eager"),
                     ratio(times, "fxreduce int8", "quantize_dynamic"),
                     ratio(times, "fxreduce int8", "quantize_dynamic per-channel")])
        print(rows[-1], flush=True)
    table = markdown_table(["M x K x N", "fp32 ms", "fp32 oneDNN", "fxreduce int8", "fxreduce int8 / fp32 oneDNN",
                            "quantize_dynamic",
                            "quantize_dynamic per-channel", "torchao eager", "fxreduce / quantize_dynamic",
                            "fxreduce / per-channel"], rows)
    return table, [missing] if missing else []


def resnet18_convs(size: int) -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """ResNet-18's Conv2d layers with distinct shapes, and the input shape each sees at batch 1."""
    model = torchvision.models.resnet18().eval()
    seen, shapes = {}, {}

    def record(name: str):
        def hook(module, args, out) -> None:
            shapes[name] = args[0].shape
        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, tuple(shapes[name][2:]))
            seen.setdefault(key, (name, module, tuple(shapes[name][1:])))
    return list(seen.values())


def int8_conv(conv: nn.Conv2d, x: torch.Tensor) -> Int8Conv2d:
    lowered = to_int8(conv.weight)
    with torch.no_grad():
        y = conv(x)
    return Int8Conv2d.from_int8(lowered.values, lowered.scales, conv.bias, stride=conv.stride, padding=conv.padding,
                                dilation=conv.dilation, groups=conv.groups, input_range=(float(x.min()), float(x.max())),
                                output_range=(float(y.min()), float(y.max())))


def bench_convs(size: int, batches: tuple[int, ...], repeats: int) -> str:
    rows = []
    for name, conv, shape in resnet18_convs(size):
        cells = [name, f"{conv.in_channels}->{conv.out_channels}, k{conv.kernel_size[0]} s{conv.stride[0]}, "
                       f"{shape[1]}x{shape[2]}"]
        for batch in batches:
            x = torch.randn(batch, *shape).relu()  # ResNet's convs read ReLU outputs (conv1 reads the image)
            if name == "conv1":
                x = torch.randn(batch, *shape)
            int8 = int8_conv(conv, x)
            with torch.no_grad():
                times = time_warm({"fp32": lambda: conv(x), "int8": lambda: int8(x)}, repeats)
            cells += [f"{times['fp32'] * 1e3:.3f}", ratio(times, "int8")]
        rows.append(cells)
        print(rows[-1], flush=True)
    header = ["layer", "shape"] + [item for b in batches for item in (f"fp32 ms (N={b})", f"int8 (N={b})")]
    return markdown_table(header, rows)


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv2(F.max_pool2d(self.conv1(x), 2)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def bench_models(cases, repeats: int) -> str:
    rows = []
    for name, model, shape, batches in cases:
        model.eval()
        torch.manual_seed(0)
        example = torch.randn(2, *shape)
        gm = fr.trace(model, (example,), {"N": (0, 0)})
        folded = fr.apply(gm, "fold_batchnorm").graph_module
        calibration = torch.randn(8, *shape)
        int8 = fr.apply(folded, fr.Pipeline([fr.get_pass("lower_int8")(calibration=calibration)])).graph_module
        for batch in batches:
            x = torch.randn(batch, *shape)
            with torch.no_grad():
                error = float((int8(x) - gm(x)).abs().max() / gm(x).abs().max())
                times = time_side_by_side({"fp32": lambda: gm(x), "folded": lambda: folded(x), "int8": lambda: int8(x)},
                                          repeats=repeats)
            rows.append([name, batch, f"{times['fp32'] * 1e3:.2f}", ratio(times, "folded"), ratio(times, "int8"),
                         ratio(times, "int8", "folded"), f"{error:.2%}"])
            print(rows[-1], flush=True)
    return markdown_table(["model", "batch", "fp32 ms", "fp32, BN folded", "int8", "int8 vs folded",
                           "max output error (random weights, random input)"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats; writes nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: benchmarks' 2)")
    args = parser.parse_args(argv)
    threads = fix_threads(args.threads) if args.threads else fix_threads()
    repeats = 3 if args.quick else 30
    # The same int8 kernel varies by a few percent between rounds; the Linears are quick, so they get 3x the rounds.
    linear, notes = bench_linear(QUICK_LINEAR_SHAPES if args.quick else LINEAR_SHAPES, 3 * repeats)
    convs = bench_convs(64 if args.quick else 224, (1,) if args.quick else (1, 8), repeats)
    lenet = ("LeNet-5", LeNet5(), (1, 28, 28), (1, 64) if args.quick else (1, 64, 1000))
    resnet = ("ResNet-18", torchvision.models.resnet18(), (3, 64, 64) if args.quick else (3, 224, 224),
              (1,) if args.quick else (1, 8))
    models = bench_models([lenet, resnet], repeats)
    if args.quick:
        return
    notes_text = "".join(f"\nNote: {note}\n" for note in notes)
    body = f"""Speed of each int8 path as a ratio over fp32 nn.Linear / nn.Conv2d (higher is faster), {threads} threads, medians of
{repeats} interleaved runs ({3 * repeats} for the Linears; single layers: each timed call follows an untimed call of the same layer, so no
kernel is timed only with the cache its predecessor flushed). fxreduce's modules run fbgemm through torch's quantized engine: Linear quantizes
its input per call (7-bit, per tensor), Conv2d with static activation scales (here calibrated on the input);
strided 1x1 convs (the downsample layers) run as an int8 GEMM over the pixels they read, with float32 out.
fxreduce's int8 weights have a scale per output channel (exact for ADMM's projected weights), so the
like-for-like reference is quantize_dynamic with torch's per-channel qconfig, the same fbgemm kernel;
its default packs one scale per tensor. Ratios between int8 kernels vary by about 5% from run to run
on this machine. nn.Linear runs fp32 on MKL's sgemm, which on this AMD CPU is well behind oneDNN's fp32
kernel with a prepacked weight (the "fp32 oneDNN" column, over nn.Linear): read the int8 Linear speedups
against that column too ("fxreduce int8 / fp32 oneDNN"). Convolutions already run fp32 on oneDNN.

### Linear

{linear}
{notes_text}
### ResNet-18's Conv2d layers (224x224)

{convs}

### Whole models (traced fp32; fp32 with fold_batchnorm; fold_batchnorm + lower_int8, calibrated on 8 random inputs)

{models}
"""
    write_section(TITLE, body)


if __name__ == "__main__":
    main()
