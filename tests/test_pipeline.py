"""Pipelines and the shipped passes: specs, order checks, reports, contracts on generated models."""

import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxreduce as fr
from fxreduce.errors import OptionError, PassError, PassNotFoundError
from fxreduce.passes import REGISTRY, Contract, Pass, option, register
from fxreduce.pipeline import parse_spec
from fxreduce.testing.contracts import check_contract
from fxreduce.testing.strategies import models

SHIPPED = ["fold_batchnorm", "remove_dropout", "eliminate_dead_code"]


@dataclass
class ScaleOptions:
    factor: float = option(1.0, "multiplier", check=("0 < factor <= 10", lambda v: 0 < v <= 10))


@register
class NeedsDropout(Pass):
    """A test pass that needs the graph's dropout, to check the pipeline's order check."""

    name = "test_needs_dropout"
    summary = "test only"
    contract = Contract("exact", "changes nothing")
    Options = ScaleOptions
    needs = frozenset({"dropout"})

    def rewrite(self, gm, outcome):
        pass


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.3)
        self.fc = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        unused = x * 3  # noqa: F841 -- dead code on purpose
        return self.fc(self.drop(x.mean((2, 3))))


def traced(training=False):
    model = Net().train(training)
    return fr.trace(model, (torch.randn(2, 3, 8, 8),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})


def test_parse_spec():
    assert parse_spec("a(x=1, y='s', z=(1, 2)),b") == [("a", {"x": 1, "y": "s", "z": (1, 2)}), ("b", {})]


@pytest.mark.parametrize("spec, error, match", [
    ("fold_batchnrom", PassNotFoundError, "fold_batchnorm"),
    ("fold_batchnorm(layer='x')", OptionError, "did you mean 'layers'"),
    ("test_needs_dropout(factor=11)", OptionError, "0 < factor <= 10"),
    ("test_needs_dropout(factor='big')", OptionError, "must be float"),
    ("fold_batchnorm(", OptionError, "cannot parse"),
    ("fold_batchnorm(layers=os.system)", OptionError, "not a literal"),
])
def test_bad_specs_raise_clear_errors(spec, error, match):
    with pytest.raises(error, match=match):
        fr.Pipeline(spec)


def test_a_pass_needing_what_an_earlier_pass_took_out_fails_when_its_turn_comes():
    with pytest.raises(PassError, match="pass test_needs_dropout rewrites dropout layers, which the earlier pass "
                                        "remove_dropout took out of the graph"):
        fr.apply(traced(), "remove_dropout,test_needs_dropout")
    fr.apply(traced(), "test_needs_dropout,remove_dropout")


def test_report_has_one_line_per_rewrite_and_certificate():
    result = fr.apply(traced(), "fold_batchnorm,remove_dropout,eliminate_dead_code")
    text = str(result.report)
    assert "conv (Conv2d) + bn (BatchNorm2d) -> conv" in text
    assert "drop (Dropout) -> (removed)" in text
    assert "mul (<built-in function mul>) -> (removed)" in text or "mul (mul)" in text
    assert "proven" in text
    steps = result.report.steps
    assert [len(s.rewrites) for s in steps] == [1, 1, 1]
    assert result.report.certificate.proven


def test_training_mode_layers_are_left_alone_with_reason():
    result = fr.apply(traced(training=True), "fold_batchnorm,remove_dropout")
    skipped = [s.reason for step in result.report.steps for s in step.skipped]
    assert any("training mode" in reason for reason in skipped) and len(skipped) == 2


def test_nothing_to_rewrite_is_reported():
    result = fr.apply(traced(), "fold_batchnorm(layers='nothing*')")
    assert "nothing to rewrite" in str(result.report)


def test_input_graph_is_not_mutated_and_result_is_deterministic():
    gm = traced()
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    first = fr.apply(gm, ",".join(SHIPPED)).graph_module
    second = fr.apply(gm, ",".join(SHIPPED)).graph_module
    assert gm.code == code and all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    assert first.code == second.code
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())


@pytest.mark.parametrize("name", SHIPPED)
def test_rewritten_inference_graphs_export(name):
    assert REGISTRY[name].exports
    result = fr.apply(traced(), name).graph_module
    program = torch.export.export(result, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(program.module()(x), result(x))


@settings(max_examples=8)
@given(generated=models(), first=st.sampled_from(SHIPPED), second=st.sampled_from(SHIPPED))
def test_pairs_of_shipped_passes_keep_their_contracts(generated, first, second):
    result = check_contract([first, second], generated.module.eval(), generated.example_inputs,
                            dynamic=generated.dynamic, trials=2)
    assert result.ok, str(result)


@settings(max_examples=8)
@given(generated=models(kinds=("cnn",)))
def test_fold_batchnorm_removes_every_eval_batchnorm_after_conv(generated):
    gm = fr.trace(generated.module.eval(), generated.example_inputs, generated.dynamic)
    result = fr.apply(gm, "fold_batchnorm")
    folded = len(result.report.steps[0].rewrites)
    remaining = [n for n in result.graph_module.graph.nodes if n.op == "call_module"
                 and isinstance(result.graph_module.get_submodule(n.target), torch.nn.BatchNorm2d)
                 and n.args[0].op == "call_module"
                 and isinstance(result.graph_module.get_submodule(n.args[0].target), torch.nn.Conv2d)
                 and len(n.args[0].users) == 1]
    assert not remaining and folded >= 0


def test_a_single_pass_object_or_class_is_a_pipeline():
    by_object = fr.apply(traced(), fr.get_pass("fold_batchnorm")())
    by_class = fr.apply(traced(), fr.get_pass("fold_batchnorm"))
    assert [s.pass_.name for s in by_object.report.steps] == ["fold_batchnorm"]
    assert by_object.graph_module.code == by_class.graph_module.code


def test_reports_name_a_few_nodes_of_long_rewrites():
    from fxreduce.text import joined_names

    assert joined_names(["a", "b"]) == "a + b"
    assert joined_names([f"bn{i}" for i in range(5)]) == "bn0 + bn1 + bn2 + bn3 + bn4"
    assert joined_names([f"bn{i}" for i in range(20)]) == "bn0 + bn1 + bn2 + bn3 + 16 more"
