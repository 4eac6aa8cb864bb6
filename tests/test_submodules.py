"""fr.apply(..., submodules=[...]) and `fxreduce apply --submodules`: models captured and rewritten part by part."""

import os
import sys

import pytest
import torch
import torchvision

import fxreduce as fr
from fxreduce.cli import main
from fxreduce.copying import copy_model
from fxreduce.errors import InputError, TraceError
from fxreduce.modules.int8 import Int8Conv2d, Int8Linear
from fxreduce.testing.contracts import check_contract

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
from faster_rcnn_parts import digits_image, small_detector  # noqa: E402

PARTS = ["backbone", "roi_heads.box_head"]


@pytest.fixture(scope="module")
def detector():
    model = small_detector()
    image = digits_image(120, 160)
    with torch.no_grad():
        expected = model(image)[0]
    return model, image, expected


@pytest.fixture(scope="module")
def lowered(detector):
    model, image, _ = detector
    return fr.apply(model, "lower_int8", submodules=PARTS, example_inputs=(image,))


def test_named_parts_are_rewritten_in_place_and_the_rest_stays_python(detector, lowered):
    model, image, expected = detector
    rewritten = lowered.model
    for name in PARTS:
        assert isinstance(rewritten.get_submodule(name), torch.fx.GraphModule)
        assert not isinstance(model.get_submodule(name), torch.fx.GraphModule)  # the user's model is unchanged
    kinds = {type(m) for m in rewritten.backbone.modules()} | {type(m) for m in rewritten.roi_heads.box_head.modules()}
    assert {Int8Conv2d, Int8Linear} <= kinds
    assert type(rewritten.rpn) is type(model.rpn) and type(rewritten.roi_heads) is type(model.roi_heads)
    with torch.no_grad():
        detections = rewritten(image)[0]
    assert detections["boxes"].shape == expected["boxes"].shape and bool(torch.isfinite(detections["scores"]).all())
    text = str(lowered.report)
    assert "submodule backbone" in text and "submodule roi_heads.box_head" in text and "not counted" in text
    params_before, params_after = lowered.report.totals("params")
    assert params_before == sum(p.numel() for name in PARTS for p in model.get_submodule(name).parameters())
    assert lowered.inputs["roi_heads.box_head"][0].shape[1:] == (256, 7, 7)


def test_each_rewritten_part_keeps_its_pass_contract(lowered):
    checked = check_contract("lower_int8", lowered.captured["roi_heads.box_head"], trials=1)
    assert checked.ok, str(checked)
    result = fr.apply(lowered.captured["roi_heads.box_head"], "sparse_lowrank(rank=8)")
    assert len(result.report.steps[0].rewrites) == 2


def test_an_exact_rewrite_of_a_part_leaves_boxes_and_scores_unchanged(detector):
    model, image, expected = detector
    result = fr.apply(model, "fold_batchnorm", submodules=["backbone"], example_inputs=(image,))
    assert result.report.parts["backbone"].report.steps[0].rewrites
    with torch.no_grad():
        actual = result.model(image)[0]
    torch.testing.assert_close(actual["boxes"], expected["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(actual["scores"], expected["scores"], rtol=1e-4, atol=1e-5)
    assert torch.equal(actual["labels"], expected["labels"])


class Parts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 4)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x):
        hidden = self.encoder(x)
        if bool(hidden.sum() > 0):  # data-dependent control flow: the whole model does not capture
            hidden = hidden * 2
        return self.head(input=hidden)


def test_bad_submodule_requests_are_clear_errors():
    model, x = Parts(), torch.randn(3, 8)
    cases = [
        (dict(submodules=["encodr"], example_inputs=(x,)), InputError, "did you mean 'encoder'"),
        (dict(submodules=["encoder", "encoder.0"], example_inputs=(x,)), InputError, "lies inside"),
        (dict(submodules=["unused"], example_inputs=(x,)), InputError, "never called"),
        (dict(submodules=["head"], example_inputs=(x,)), InputError, "keyword arguments input"),
        (dict(submodules=["encoder"], example_inputs=(torch.randn(3, 5),)), InputError, "does not run"),
        (dict(submodules="encoder", example_inputs=(x,)), InputError, "non-empty list"),
        (dict(submodules=["encoder"], example_inputs=None), InputError, "example inputs"),
    ]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text):
            fr.apply(model, "lower_int8", **kwargs)
    traced = fr.trace(torch.nn.Linear(8, 4), (x,))
    with pytest.raises(InputError, match="for submodules"):
        fr.apply(traced, "lower_int8", example_inputs=(x,))
    with pytest.raises(InputError, match="not a traced graph"):
        fr.apply(traced, "lower_int8", submodules=["weight"], example_inputs=(x,))
    result = fr.apply(model, "sparse_lowrank(rank=2)", submodules=["encoder"], example_inputs=(x,))
    assert result.report.parts["encoder"].report.steps[0].rewrites
    assert isinstance(model.encoder, torch.nn.Sequential)


def test_cli_apply_with_submodules(capsys):
    ref = os.path.join(EXAMPLES, "faster_rcnn_parts.py") + ":small_detector"
    code = main(["apply", ref, "--input-shape", "1,3,120,160", "--pipeline", "sparse_lowrank(rank=8)",
                 "--submodules", "roi_heads.box_head", "--no-measure"])
    out = capsys.readouterr().out
    assert code == 0
    assert "submodule roi_heads.box_head (TwoMLPHead" in out and "2 rewrite(s)" in out and "certificate" in out
    assert main(["apply", ref, "--input-shape", "1,3,120,160", "--pipeline", "lower_int8",
                 "--submodules", "roi_heads.box_head", "-o", "out.pt"]) == 2
    assert "cannot be saved" in capsys.readouterr().err


class StaleAttribute(torch.nn.Module):
    """Keeps a tensor computed in forward as a plain attribute, as RAFT keeps its correlation pyramid."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.last = [torch.zeros(1)]

    def forward(self, x):
        self.last = [self.linear(x)]
        return self.last[0].relu()


def test_models_holding_autograd_history_are_copied_detached():
    model = StaleAttribute()
    x = torch.randn(2, 4)
    model(x)
    with pytest.raises(RuntimeError, match="deepcopy"):
        __import__("copy").deepcopy(model)
    copied = copy_model(model, where="test")
    assert copied.last[0].grad_fn is None and model.last[0].grad_fn is not None
    result = fr.apply(model, "lower_int8", submodules=["linear"], example_inputs=(x,))
    assert isinstance(result.model.linear, torch.fx.GraphModule)


@pytest.mark.slow
def test_raft_captures_or_names_the_cause():
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    frames = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    model(*frames, num_flow_updates=1)  # with gradients on: RAFT keeps its correlation pyramid as an attribute
    result = fr.apply(model, "lower_int8", submodules=["feature_encoder"], example_inputs=frames)
    assert result.report.parts["feature_encoder"].report.steps[0].rewrites
    try:
        fr.trace(model, frames)
    except TraceError as error:
        assert "corr_pyramid" in str(error) and "no_grad" in str(error)
