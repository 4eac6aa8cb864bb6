"""dynamic_resolution (DRNet): contracts on generated CNNs and torchvision models, the declared cost
against torch's FLOP counter, training, and bad input."""

import copy

import pytest
import sympy
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxreduce as fr
from fxreduce.errors import InputError, OptionError, UnsupportedError
from fxreduce.modules.dynamic_resolution import (MobileNetPredictor, ResNet10Predictor, ResolutionAwareBatchNorm,
                                                 dynamic_resolution_parts, force_resolution, resize)
from fxreduce.passes.dynamic_resolution import DynamicResolution, share_symbol
from fxreduce.testing.strategies import cnn_models
from fxreduce.training.dynamic_resolution import (evaluate, finetune_joint, pretrain_multi_resolution,
                                                  resolution_costs)

DIMS = {"N": (0, 0), "H": (0, 2), "W": (0, 3)}


def rewrite(model: nn.Module, x: torch.Tensor, resolutions: tuple, dims=None, **options):
    """Trace (static shapes unless ``dims``: the pass makes the backbone's H and W symbolic itself) and rewrite."""
    gm = fr.trace(model, (x,), dims)
    options.setdefault("predictor_width", 0.125)
    return gm, fr.apply(gm, [DynamicResolution(resolutions=resolutions, **options)])


def perturb_norm_sets(after: nn.Module, seed: int) -> None:
    """Give every BatchNorm set but the base one its own statistics and affine, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for module in dynamic_resolution_parts(after).dispatch.backbone.modules():
        if isinstance(module, ResolutionAwareBatchNorm):
            for norm in module.norms[1:]:
                with torch.no_grad():
                    norm.running_mean.add_(torch.randn(norm.running_mean.shape, generator=generator))
                    norm.running_var.mul_(torch.rand(norm.running_var.shape, generator=generator) + 0.5)
                    if norm.affine:
                        norm.weight.mul_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
                        norm.bias.add_(torch.randn(norm.bias.shape, generator=generator))


def with_norm_set(model: nn.Module, after: nn.Module, index: int) -> nn.Module:
    """The original model with every BatchNorm replaced by set ``index`` of the rewritten one: the reference."""
    reference = copy.deepcopy(model).eval()
    for name, module in dynamic_resolution_parts(after).dispatch.backbone.named_modules():
        if isinstance(module, ResolutionAwareBatchNorm):
            reference.get_submodule(name).load_state_dict(module.norms[index].state_dict())
    return reference


def check_contracts(model: nn.Module, after: nn.Module, x: torch.Tensor, resolutions: tuple,
                    per_sample: list[int]) -> None:
    model, after = model.eval(), after.eval()
    with torch.no_grad():
        with force_resolution(after, "base"):
            assert torch.equal(after(x), model(x))  # exactly: same ops on the same images
        perturb_norm_sets(after, seed=len(per_sample))
        references = [with_norm_set(model, after, j) for j in range(len(resolutions))]
        for j, r in enumerate(resolutions):
            with force_resolution(after, r):
                torch.testing.assert_close(after(x), references[j](resize(x, r)), rtol=1e-5, atol=1e-5)
        with force_resolution(after, torch.tensor(per_sample)):
            got = after(x)
        expected = torch.cat([references[j](resize(x[i:i + 1], resolutions[j])) for i, j in enumerate(per_sample)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=5)
@given(cnn_models(max_layers=4, spatial=(12, 16)), st.data())
def test_contracts_hold_on_generated_cnns(generated, data):
    model = generated.module.eval()
    third = max(generated.min_spatial, 8)
    resolutions = (16, 12, third) if third < 12 else (16, 12)
    x = torch.randn(3, generated.example_inputs[0].shape[1], 16, 16)
    _, result = rewrite(model, x, resolutions)
    per_sample = data.draw(st.lists(st.integers(0, len(resolutions) - 1), min_size=3, max_size=3))
    check_contracts(model, result.graph_module, x, resolutions, per_sample)


@pytest.mark.parametrize("name,predictor", [
    ("resnet18", "resnet10"),
    # The pass's symbolic shape propagation of these deeper graphs takes most of a minute on 2 cores:
    # they run in the slow CI step (pytest -m slow), as the torchvision zoo test does.
    pytest.param("resnet50", "resnet10", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "mobilenet", marks=pytest.mark.slow),
])
def test_torchvision_models(name, predictor):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    x = torch.randn(3, 3, 64, 64)
    resolutions = (64, 48, 32)
    before, result = rewrite(model, x, resolutions, predictor=predictor)
    after = result.graph_module
    assert DynamicResolution(resolutions=resolutions).check(before, after, (x,)) is None
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    aware = [m for m in after.modules() if isinstance(m, ResolutionAwareBatchNorm)]
    assert len(aware) == norms  # shortcut (downsample) BatchNorms included
    check_contracts(model, after, x, resolutions, per_sample=[2, 0, 1])


def test_declared_cost_is_what_runs():
    """Eval FLOPs counted by torch equal the declared formula at the measured shares: each chosen
    resolution runs once, nothing runs at a resolution no image chose."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(5, 3, 64, 64)
    resolutions = (64, 48, 32)
    before, result = rewrite(model, x, resolutions, DIMS)
    after = result.graph_module
    dispatch = dynamic_resolution_parts(after).dispatch
    backbone_cost = fr.cost(dispatch.backbone)
    for r, macs in zip(resolutions, dispatch.backbone_macs):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(resize(x[:1], r))
        assert 2 * backbone_cost.at(N=1, H=r, W=r).macs == counter.get_total_flops() == 2 * macs
    for choice in ([0, 0, 2, 2, 2], [1, 1, 1, 1, 1], [2, 0, 1, 2, 2]):
        with FlopCounterMode(display=False) as counter, torch.no_grad(), force_resolution(after, torch.tensor(choice)):
            after(x)
        shares = {share_symbol(r): sympy.Rational(choice.count(j), len(choice)) for j, r in enumerate(resolutions) if j}
        declared = fr.cost(after).at(N=len(choice)).flops.subs(shares)
        assert declared == counter.get_total_flops()
    assert "iff" in str(result.report) and "p_32" in str(result.report)
    table = str(fr.inspect(dispatch.backbone))
    assert "ResolutionAwareBatchNorm" in table


def brightness_predictor() -> nn.Module:
    """Picks by mean brightness: bright images the base resolution, dark ones the smallest, the rest the middle."""
    predictor = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        predictor[2].weight.copy_(torch.tensor([[1.0] * 3, [0.0] * 3, [-1.0] * 3]))
        predictor[2].bias.copy_(torch.tensor([-1.0, 0.0, -1.0]))
    return predictor


def test_eval_choice_is_deterministic_and_groups_keep_order():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(9, 3, 32, 32) + torch.tensor([-2.0, 0.0, 2.0]).repeat(3).reshape(9, 1, 1, 1)
    _, result = rewrite(model, x, (32, 24, 16), predictor=brightness_predictor())
    after = result.graph_module.eval()
    parts = dynamic_resolution_parts(after)
    with torch.no_grad():
        chosen = parts.predictor(after.resolution_resize(x)).argmax(1)
        first, second = after(x), after(x)
    assert chosen.tolist() == [2, 1, 0] * 3
    assert torch.equal(first, second)  # no noise at evaluation
    expected = torch.cat([parts.dispatch.run_at(x[i:i + 1], j) for i, j in enumerate(chosen.tolist())])
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))


def tiny_drnet(seed: int = 0):
    torch.manual_seed(seed)
    gm = fr.trace(TinyNet().eval(), (torch.randn(2, 1, 16, 16),), DIMS)
    predictor = ResNet10Predictor(1, 3, width=4, stem_stride=1)
    return fr.apply(gm, [DynamicResolution(resolutions=(16, 12, 8), predictor=predictor, predictor_input=8)]).graph_module


def batches(seed: int, count: int = 4, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 16, 16, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def test_straight_through_training_reaches_the_predictor():
    drnet = tiny_drnet().train()
    x, y = batches(1, count=1)[0]
    nn.functional.cross_entropy(drnet(x), y).backward()
    parts = dynamic_resolution_parts(drnet)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts.predictor.fc.parameters())


def test_training_recipe():
    drnet = tiny_drnet()
    parts = dynamic_resolution_parts(drnet)
    losses = pretrain_multi_resolution(drnet, batches(2), epochs=2, lr=0.05, progress=False)
    assert len(losses) == 2 and losses[1] < losses[0]
    aware = next(m for m in parts.dispatch.backbone.modules() if isinstance(m, ResolutionAwareBatchNorm))
    assert not torch.equal(aware.norms[0].running_mean, aware.norms[2].running_mean)  # own statistics per resolution

    costs = resolution_costs(drnet)
    cheapest = costs.predictor_flops + costs.backbone_flops[-1]
    history = finetune_joint(drnet, batches(3), target_flops=cheapest, eta=20.0, lr=0.01, predictor_lr=0.5,
                             epochs=3, progress=False)
    assert history[-1].mean_flops < history[0].mean_flops  # the FLOPs penalty moves choices to cheaper sizes
    assert history[-1].shares[-1] > history[0].shares[-1]

    data = batches(4)
    outcome = evaluate(drnet, data)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for x, _ in data:
            drnet.eval()(x)
    assert outcome.mean_flops == pytest.approx(counter.get_total_flops() / outcome.images)
    assert sum(outcome.shares) == pytest.approx(1.0)


def test_options_and_predictors():
    drnet = tiny_drnet()
    parts = dynamic_resolution_parts(drnet)
    assert isinstance(parts.predictor, ResNet10Predictor) and parts.resolutions == (16, 12, 8)
    gm = fr.trace(TinyNet().eval(), (torch.randn(2, 1, 16, 16),), DIMS)
    shared = fr.apply(gm, "dynamic_resolution(resolutions=(16, 8), per_resolution_bn=False, predictor='mobilenet', "
                          "predictor_width=0.25)").graph_module
    assert not any(isinstance(m, ResolutionAwareBatchNorm) for m in shared.modules())
    assert isinstance(dynamic_resolution_parts(shared).predictor, MobileNetPredictor)
    assert resolution_costs(shared).resolutions == (16, 8)
    with pytest.raises(InputError, match="not a candidate"):
        with force_resolution(shared, 12):
            pass


class FixedClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


class FullyConvolutional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("resolutions", [(8, 12, 16), (16, 16, 8), (16, 0), (16,), (16.0, 8.0)])
def test_bad_resolutions(resolutions):
    with pytest.raises(OptionError, match="strictly descending"):
        DynamicResolution(resolutions=resolutions)


def test_fixed_size_classifier_names_the_node():
    gm = fr.trace(FixedClassifier().eval(), (torch.randn(2, 1, 16, 16),), DIMS)
    with pytest.raises(UnsupportedError, match=r"12x12 input: node fc .*Linear.*fed by flatten.*global/adaptive pooling"):
        fr.apply(gm, "dynamic_resolution(resolutions=(16, 12))")
    gm = fr.trace(FullyConvolutional().eval(), (torch.randn(2, 1, 16, 16),), DIMS)
    with pytest.raises(UnsupportedError, match="output shape depends on its input size.*at node conv"):
        fr.apply(gm, "dynamic_resolution(resolutions=(16, 12))")


def test_predictor_with_the_wrong_number_of_outputs():
    gm = fr.trace(TinyNet().eval(), (torch.randn(2, 1, 16, 16),), DIMS)
    with pytest.raises(OptionError, match=r"\(1, 2\), but there are 3 candidate resolutions"):
        fr.apply(gm, [DynamicResolution(resolutions=(16, 12, 8), predictor=ResNet10Predictor(1, 2, width=4))])


def test_non_image_model():
    gm = fr.trace(nn.Sequential(nn.Linear(4, 2)), (torch.randn(2, 4),), {"N": (0, 0)})
    with pytest.raises(UnsupportedError, match=r"one \(N, C, H, W\) input"):
        fr.apply(gm, "dynamic_resolution")
