"""Int8 modules and lower_int8: real int8 kernels within their stated error bound, exact lowering of grid
weights, weights-only saves, torch.export, int8 MAC counts, calibration sources and honest storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxreduce as fr
from fxreduce.errors import CostError, InputError, OptionError
from fxreduce.modules.int8 import Int8Conv2d, Int8Linear, storage_of
from fxreduce.passes.lower_int8 import find_grid, to_int8
from fxreduce.testing.contracts import check_contract
from fxreduce.testing.strategies import models
from fxreduce.training.admm import exact_scale, project_quantized

seeds = st.integers(0, 2**31 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@given(seeds, st.integers(1, 127), st.floats(1e-5, 10.0), st.booleans())
def test_grid_weights_lower_exactly(seed, levels, raw_scale, per_channel):
    generator = _generator(seed)
    weight = torch.randn(6, 5, generator=generator)
    weight[torch.rand(6, 5, generator=generator) < 0.5] = 0
    scale = exact_scale(raw_scale)
    projected = project_quantized(weight, scale, levels)
    lowered = to_int8(projected, per_channel)
    assert lowered.exact and lowered.error == 0.0
    assert torch.equal(lowered.values.float() * lowered.scales[:, None], projected)


def test_grids_with_a_scale_per_channel_and_rounded_products_are_found():
    k = torch.tensor([[3.0, -7.0, 0.0], [2.0, 4.0, -6.0]])
    per_channel = k * torch.tensor([[0.1], [0.37]])  # inexact products: 0.1 has no short mantissa
    lowered = to_int8(per_channel)
    assert lowered.exact and lowered.grid in ("one grid", "a grid per channel")
    assert torch.equal(lowered.values.float() * lowered.scales[:, None], per_channel)
    assert find_grid(torch.randn(1000)) is None


@given(seeds, st.booleans())
def test_off_grid_weights_are_rounded_within_half_a_step(seed, per_channel):
    weight = torch.randn(8, 16, generator=_generator(seed))
    lowered = to_int8(weight, per_channel)
    assert not lowered.exact
    step = weight.abs().amax(1) / 127 if per_channel else weight.abs().max().expand(8) / 127
    error = (lowered.values.float() * lowered.scales[:, None] - weight).abs()
    assert bool((error <= step[:, None] / 2 * (1 + 1e-5)).all()) and error.max() == pytest.approx(lowered.error)


def _random_int8(generator, *shape):
    return torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8)


@given(seeds, st.integers(1, 70), st.integers(1, 40), st.booleans(), st.floats(0.01, 50))
def test_int8_linear_stays_within_its_bound(seed, in_features, out_features, relu, spread):
    generator = _generator(seed)
    module = Int8Linear.from_int8(_random_int8(generator, out_features, in_features),
                                  torch.rand(out_features, generator=generator) * 0.01 + 1e-3,
                                  torch.randn(out_features, generator=generator), relu=relu)
    x = torch.randn(3, 2, in_features, generator=generator) * spread + spread / 3
    error = (module(x) - module.reference(x)).abs()
    assert bool((error <= module.error_bound(x)).all())


@given(seeds, st.sampled_from([(1, 1, 0, 1, 3), (2, 1, 1, 1, 3), (1, 2, 2, 1, 3), (1, 1, 1, 2, 3), (2, 1, 0, 1, 1),
                               (3, 1, 0, 2, 1)]), st.booleans(), st.booleans())
def test_int8_conv2d_stays_within_its_bound_inside_and_outside_the_calibrated_range(seed, settings, relu, wide):
    stride, dilation, padding, groups, kernel = settings
    generator = _generator(seed)
    weight = _random_int8(generator, 4, 4 // groups, kernel, kernel)
    scale = torch.rand(4, generator=generator) * 0.01 + 1e-3
    x = torch.randn(2, 4, 9, 9, generator=generator)
    reference = F.conv2d(x, weight.float() * scale[:, None, None, None], None, stride, padding, dilation, groups)
    squeeze = 1.0 if wide else 0.5  # inputs beyond the calibrated range when not wide
    module = Int8Conv2d.from_int8(weight, scale, torch.randn(4, generator=generator), stride=(stride,) * 2,
                                  padding=(padding,) * 2, dilation=(dilation,) * 2, groups=groups,
                                  input_range=(float(x.min()) * squeeze, float(x.max()) * squeeze),
                                  output_range=(float(reference.min()) * squeeze, float(reference.max()) * squeeze),
                                  relu=relu)
    out = module(x)
    assert out.shape == reference.shape
    assert bool(((out - module.reference(x)).abs() <= module.error_bound(x)).all())


def test_int8_modules_run_real_int8_kernels_not_fake_quantization():
    generator = _generator(0)
    weight = _random_int8(generator, 16, 32)
    module = Int8Linear.from_int8(weight, torch.full((16,), 0.01))
    x = torch.randn(4, 32, generator=generator)
    # A dequantize-then-float kernel would match the reference to float rounding; int8 activations do not.
    assert (module(x) - module.reference(x)).abs().max() > 1e-3
    scale = (x.max() - x.min().clamp(max=0)) / 127
    zero = torch.round(-x.min().clamp(max=0) / scale)
    activations = (torch.clamp(torch.round(x / scale) + zero, 0, 127) - zero) * scale
    assert torch.allclose(module(x), F.linear(activations, module.dequantized_weight()), atol=1e-4)


def test_strided_pointwise_conv_runs_as_an_int8_gemm_over_the_pixels_it_reads():
    generator = _generator(3)
    weight = _random_int8(generator, 16, 8, 1, 1)
    x = torch.randn(2, 8, 10, 10, generator=generator)
    module = Int8Conv2d.from_int8(weight, torch.full((16,), 0.01), torch.randn(16, generator=generator), stride=(2, 2),
                                  padding=(0, 0), dilation=(1, 1), groups=1, input_range=(-2.0, 2.0),
                                  output_range=(-1.0, 1.0))
    assert module.pointwise
    scale, zero = module.input_qparams.tolist()
    # Static input quantization (clamped to uint8), exact int32 sums, float32 out: no output requantization,
    # so outputs far outside the calibrated output range are not clipped.
    activations = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    expected = F.conv2d(activations, module.dequantized_weight(), module.bias, stride=2)
    out = module(x)
    assert torch.allclose(out, expected, atol=1e-4) and out.abs().max() > 1.0
    assert bool(((out - module.reference(x)).abs() <= module.error_bound(x)).all())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc(torch.flatten(self.same(x), 1))


def _traced(model=None, batch: int = 2):
    torch.manual_seed(0)
    return fr.trace((model or Net()).eval(), (torch.randn(batch, 3, 14, 14),), {"N": (0, 0)})


def test_lower_int8_rewrites_fuses_relu_skips_what_it_cannot_and_counts_int8_macs():
    gm = _traced()
    result = fr.apply(gm, "lower_int8")
    step = result.report.steps[0]
    assert [r.rewrite.replaced for r in step.rewrites] == [["conv1", "relu"], ["conv2"], ["fc"]]
    assert [s.node for s in step.skipped] == ["same"] and "padding='same'" in step.skipped[0].reason
    assert "random batch" in step.rewrites[0].rewrite.what and "rounded per channel" in step.rewrites[0].rewrite.what
    lowered = result.graph_module
    assert not any(n.target is torch.relu for n in lowered.graph.nodes)
    before, after = fr.cost(gm), fr.cost(lowered)
    assert after.macs == before.macs
    same_macs = before.nodes["same"].macs["float32"]
    assert after.macs_by_dtype["int8"] == before.macs - same_macs
    assert after.macs_by_dtype["float32"] == same_macs


@given(models(kinds=("mlp", "cnn")))
def test_contract_holds_on_generated_models(generated):
    result = check_contract("lower_int8", generated.module, generated.example_inputs, dynamic=generated.dynamic,
                            trials=1)
    assert result.ok, str(result)


def test_exact_lowering_of_projected_weights_end_to_end():
    model = Net()
    with torch.no_grad():
        for layer, levels in ((model.conv1, 5), (model.conv2, 31), (model.fc, 127)):
            scale = exact_scale(float(layer.weight.abs().max()) / levels)
            layer.weight.copy_(project_quantized(layer.weight, scale, levels))
    result = fr.apply(_traced(model), "lower_int8")
    assert all("weights exact on one grid" in r.rewrite.what for r in result.report.steps[0].rewrites)
    for name in ("conv1", "conv2", "fc"):
        assert torch.equal(result.graph_module.get_submodule(name).dequantized_weight(),
                           model.get_submodule(name).weight)


def test_lowered_graph_saves_weights_only_and_exports(tmp_path):
    gm = _traced(batch=3)
    lowered = fr.apply(gm, "lower_int8").graph_module
    x = torch.randn(5, 3, 14, 14)
    expected = lowered(x)
    path = tmp_path / "state.pt"
    torch.save(lowered.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = fr.apply(_traced(batch=3), "lower_int8(calibration_batches=1)").graph_module
    assert not torch.equal(fresh(x), expected)  # other calibration, other activation scales
    fresh.load_state_dict(state)  # in-place copies: the cached prepacked weights must be refreshed
    assert torch.equal(fresh(x), expected)
    program = torch.export.export(lowered, (torch.randn(3, 3, 14, 14),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"fxreduce.int8_conv2d.default", "fxreduce.int8_linear.default"} <= targets
    assert torch.equal(program.module()(x), expected)
    reloaded = fr.trace(program.module(), (torch.randn(3, 3, 14, 14),), {"N": (0, 0)})
    assert fr.cost(reloaded).macs_by_dtype == fr.cost(lowered).macs_by_dtype  # int8 MACs stay int8


def test_calibration_from_a_file_and_bad_calibration_input(tmp_path):
    data = torch.randn(16, 3, 14, 14)
    path = tmp_path / "calibration.pt"
    torch.save(data, path)
    from_file = fr.apply(_traced(), f"lower_int8(calibration={str(path)!r})")
    assert f"calibration file {path}" in from_file.report.steps[0].rewrites[0].rewrite.what
    given_tensor = fr.apply(_traced(), fr.Pipeline([fr.get_pass("lower_int8")(calibration=data)]))
    assert "1 given calibration batch" in given_tensor.report.steps[0].rewrites[0].rewrite.what
    x = torch.randn(4, 3, 14, 14)
    assert torch.equal(from_file.graph_module(x), given_tensor.graph_module(x))
    with pytest.raises(InputError, match="no such calibration file"):
        fr.apply(_traced(), f"lower_int8(calibration={str(tmp_path / 'missing.pt')!r})")
    with pytest.raises(InputError, match="does not run on calibration inputs of shape"):
        fr.apply(_traced(), fr.Pipeline([fr.get_pass("lower_int8")(calibration=torch.randn(2, 5, 14, 14))]))
    with pytest.raises(OptionError, match="calibration_batches=0"):
        fr.get_pass("lower_int8")(calibration_batches=0)
    with pytest.raises(InputError, match="-128"):
        Int8Linear.from_int8(torch.full((2, 2), -128, dtype=torch.int8), torch.ones(2))


def test_storage_counts_values_index_and_scales():
    dense = torch.tensor([[1, -2, 3, -4], [4, 3, -2, 1]], dtype=torch.int8)
    assert storage_of(dense).format == "dense"
    assert storage_of(dense).total_bits == 8 * 4 + 32  # 9 codes (-4..4) need 4 bits; one scale
    sparse = torch.zeros(4, 64, dtype=torch.int8)
    sparse[0, 0], sparse[1, 10], sparse[3, 63] = 1, -1, 1
    s = storage_of(sparse, scales=4)
    # 3 non-zeros, 1 value bit each (±1); relative index: gaps 0, 73, 180; with 7-bit gaps 180 needs one
    # filler (and a zero code), with 8-bit gaps none: 3 x (1 + 8) = 27 bits beat CSR's 3 x (1+6) + 5 x 2 = 31.
    assert (s.format, s.value_bits, s.index_bits, s.entries) == ("relative", 1, 8, 3)
    assert s.total_bits == 27 + 4 * 32 and s.reduction == pytest.approx(32 * 256 / s.total_bits)


def test_cli_calibration_flag_reaches_lower_int8(tmp_path, capsys):
    from fxreduce.cli import main

    calibration = tmp_path / "calibration.pt"
    torch.save(torch.randn(4, 3, 32, 32), calibration)
    assert main(["apply", "default", "--pipeline", "lower_int8", "--input-shape", "N,3,H=32,W=32",
                 "--calibration", str(calibration)]) == 0
    assert "calibration" in capsys.readouterr().out
    assert main(["apply", "default", "--pipeline", "fold_batchnorm", "--input-shape", "N,3,H=32,W=32",
                 "--calibration", str(calibration)]) == 2
    assert "no pass of the pipeline takes calibration data" in capsys.readouterr().err


def test_a_training_cost_through_int8_kernels_is_a_clear_error():
    """int8 kernels have no gradient: a training step whose backward must cross one names that."""
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).train()
    gm = fr.apply(fr.trace(model, (torch.randn(4, 8),), {"N": (0, 0)}), "lower_int8").graph_module
    with pytest.raises(CostError, match="cannot run its backward") as error:
        fr.cost(gm, training=True)
    assert "before them" in error.value.fix
