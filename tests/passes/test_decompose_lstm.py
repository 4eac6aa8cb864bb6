"""decompose_lstm: swaps nn.LSTM for the decomposed LSTM; outputs, costs and export are kept."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import fxreduce as fr
from fxreduce.cli import main
from fxreduce.modules.lstm import DecomposedLSTM
from fxreduce.testing import check_contract, lstm_models

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
from word_lm import word_language_model  # noqa: E402


@settings(max_examples=4)
@given(generated=lstm_models(max_layers=3))
def test_contract_on_generated_lstm_models(generated):
    result = check_contract("decompose_lstm", generated.module.eval(), generated.example_inputs,
                            dynamic=generated.dynamic, trials=2)
    assert result.ok, str(result)


def test_word_language_model_keeps_outputs_costs_and_exports():
    model = word_language_model()
    tokens = torch.randint(0, 2000, (3, 9))
    gm = fr.trace(model, (torch.randint(0, 2000, (2, 7)),), {"N": (0, 0), "T": (0, 1)})
    result = fr.apply(gm, "decompose_lstm")
    rewritten = result.graph_module
    assert any(isinstance(m, DecomposedLSTM) for m in rewritten.modules())
    torch.testing.assert_close(rewritten(tokens), model(tokens), rtol=1e-4, atol=1e-5)
    before, after = fr.cost(gm), fr.cost(rewritten)
    # nn.LSTM runs torch's decomposition, whose loop pins T to the example; the rewrite's cost is a formula in T.
    assert "T" in before.fixed and "T" in after.symbols
    at_example = after.at(T=7)
    assert before.nodes["lstm"].total_macs == sum(at_example.nodes["lstm_1"].parts.values())
    assert before.flops == at_example.flops
    assert "T = 7 (fixed in the other graph)" in str(fr.certify(before, after, metric="macs"))
    assert fr.certify(before, after, metric="macs").proven
    assert "note: dim T is symbolic after this pass" in str(result.report)
    program = torch.export.export(rewritten, (tokens,))  # the pass declares its inference graph exportable
    with torch.no_grad():
        expected = rewritten(tokens)
    torch.testing.assert_close(program.module()(tokens), expected)  # autograd on: no captured out= kernels


def test_cli_apply_and_verify_on_the_word_language_model(capsys):
    ref = f"{EXAMPLES / 'word_lm.py'}:word_language_model"
    assert main(["apply", ref, "--pipeline", "decompose_lstm", "--input-shape", "N,T=8:long"]) == 0
    assert "nn.LSTM decomposed" in capsys.readouterr().out
    assert main(["verify", ref, "--pipeline", "decompose_lstm", "--input-shape", "N,T=8:long"]) == 0
    assert "holds" in capsys.readouterr().out


def test_proj_size_is_left_alone_with_reason():
    class Projected(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 8, proj_size=3)

        def forward(self, x):
            return self.lstm(x)[0]

    result = fr.apply(fr.trace(Projected(), (torch.randn(5, 2, 4),)), "decompose_lstm")
    assert "proj_size is unsupported" in str(result.report)
    with pytest.raises(fr.FxReduceError, match="proj_size"):
        DecomposedLSTM(4, 8, proj_size=3)
