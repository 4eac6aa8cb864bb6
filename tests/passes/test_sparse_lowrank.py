"""sparse_lowrank: its bounded contract on generated models (exactness at full rank is a module property,
tests/test_factorized.py: a full-rank factorisation never saves MACs, so the pass leaves it alone), the rank
the cost model solves for, certified per-layer savings, LSTM gates, model-level targets and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxreduce as fr
from fxreduce.cli import main
from fxreduce.errors import OptionError
from fxreduce.modules import DecomposedLSTM, LowRankLinear, SparseLowRankLinear
from fxreduce.passes import get_pass
from fxreduce.testing.contracts import check_contract
from fxreduce.testing.strategies import models

ROOT = Path(__file__).resolve().parents[2]


class _LanguageModel(nn.Module):
    def __init__(self, vocabulary=64, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, hidden)
        self.lstm = nn.LSTM(hidden, hidden, 2, batch_first=True)
        self.decoder = nn.Linear(hidden, vocabulary)

    def forward(self, tokens):
        return self.decoder(self.lstm(self.embed(tokens))[0])


def _language_model():
    torch.manual_seed(0)
    model = _LanguageModel().eval()
    return fr.trace(model, (torch.randint(0, 64, (3, 7)),), dynamic={"N": (0, 0)})


def _mlp(*sizes):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return fr.trace(nn.Sequential(*layers[:-1]).eval(), (torch.randn(4, sizes[0]),), dynamic={"N": (0, 0)})


@settings(max_examples=6)
@given(models(kinds=("mlp", "lstm"), max_layers=3), st.sampled_from(("lr", "sparse_lr", "lr_sparse", "grouped_shuffle")),
       st.floats(0.1, 1.0))
def test_contract_holds_on_generated_models(generated, form, ratio):
    spec = f"sparse_lowrank(form={form!r}, rank_ratio={ratio})"
    result = check_contract(spec, generated.module, generated.example_inputs, dynamic=generated.dynamic, trials=1)
    assert result.ok, str(result)


def test_flop_reduction_solves_for_the_largest_rank_and_the_certificate_proves_the_saving():
    gm = _mlp(64, 256, 64)
    result = fr.apply(gm, "sparse_lowrank(flop_reduction=4)")
    ranks = [m.rank for m in result.graph_module.modules() if isinstance(m, LowRankLinear)]
    # r (64 + 256) * 4 <= 64 * 256  ->  r <= 12.8
    assert ranks == [12, 12]
    step = result.report.steps[0]
    for item in step.rewrites:
        certificate = fr.certify(item.before, item.after)
        assert certificate.proven
        assert certificate.ratio_at(N=4) == pytest.approx(64 * 256 / (12 * 320))
        assert "4.27x fewer MACs" in item.rewrite.what
    text = str(result.report)
    assert "4.27x fewer MACs" in text and "||W - W'||_2" in text


def test_lstm_gates_and_decoder_are_rewritten_with_the_stated_errors():
    gm = _language_model()
    result = fr.apply(gm, "sparse_lowrank(form='lr', rank=4)")
    after = result.graph_module
    lstm = after.get_submodule("lstm")
    assert isinstance(lstm, DecomposedLSTM)
    original = gm.get_submodule("lstm")
    for kind in ("ih", "hh"):
        for layer in (0, 1):
            projection = lstm.projection(kind, layer)
            assert isinstance(projection, LowRankLinear) and projection.rank == 4
            weight = getattr(original, f"weight_{kind}_l{layer}").detach()
            sigma = torch.linalg.svdvals(weight)[4].item()
            assert f"{kind}_l{layer} lr r=4" in str(result.report)
            assert torch.linalg.matrix_norm(weight - projection.dense_weight(), ord=2).item() == pytest.approx(
                sigma, rel=1e-3)
    tokens = torch.randint(0, 64, (2, 5))
    assert get_pass("sparse_lowrank")(rank=4).check(gm, after, (tokens,)) is None
    # the cost model sees the factorised gates: (T N) rows x r (in + 4H) per projection
    node = next(n for n in after.graph.nodes if n.target == "lstm")
    assert node.meta["fxreduce"].cost.parts["hh_l0"] == 7 * fr.cost_models.symbol("N") * 4 * (32 + 128)


def test_grouped_gates_fall_back_to_the_autograd_path_and_stay_exact_to_their_dense_form():
    gm = _language_model()
    spec = "sparse_lowrank(form='grouped_shuffle', groups=4, flop_reduction=3)"
    result = check_contract(spec, gm, trials=1)
    assert result.ok, str(result)
    after = fr.apply(gm, spec).graph_module
    assert isinstance(after.get_submodule("lstm").projection("hh", 1), SparseLowRankLinear)


def test_a_broken_module_breaks_the_contract():
    gm = _mlp(16, 64, 8)
    pass_ = get_pass("sparse_lowrank")(rank=4)
    after = pass_.run(gm).graph_module
    with torch.no_grad():
        after.get_submodule("0").second.mul_(3.0)  # W' = 3 U V: off by 2 sigma_1 > sigma_5
    assert "report states" in pass_.check(gm, after, (torch.randn(3, 16),))


def test_rank_above_break_even_is_left_alone_with_the_reason():
    result = fr.apply(_mlp(16, 16), "sparse_lowrank(rank=9)")
    assert not result.report.steps[0].rewrites
    assert "break-even r < 8" in str(result.report)


def test_model_flop_reduction_shares_one_reduction_over_the_reachable_layers():
    gm = _mlp(64, 256, 64)
    result = fr.apply(gm, "sparse_lowrank(model_flop_reduction=3)")
    before, after = fr.cost(gm).at(N=4).macs, fr.cost(result.graph_module).at(N=4).macs
    assert before / after >= 3


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Linear(32, 32)

    def forward(self, x):
        return self.mlp(self.attention(x, x, x, need_weights=False)[0])


def test_model_flop_reduction_out_of_reach_says_the_reachable_share():
    torch.manual_seed(0)
    gm = fr.trace(_Attention().eval(), (torch.randn(2, 10, 32),), dynamic={"N": (0, 0)})
    with pytest.raises(OptionError, match=r"out of reach: the layers this pass can rewrite hold \d+\.\d% of the "
                                          r"model's MACs"):
        fr.apply(gm, "sparse_lowrank(model_flop_reduction=4)")


@pytest.mark.parametrize("spec, message", [
    ("sparse_lowrank(rank=40)", r"rank=40 exceeds min\(in, out\) = 16 at layer 0 \(16 -> 64\)"),
    ("sparse_lowrank(form='sparse_lr', groups=3, rank=6)", "groups=3 does not divide the layer's in_features=16 at layer 0"),
    ("sparse_lowrank(flop_reduction=100)", r"no rank meets a 100x reduction: even rank 1 gives 12.8x at layer 0"),
    ("sparse_lowrank(rank=0)", "option rank=0 of sparse_lowrank is out of range"),
    ("sparse_lowrank(rank=4, energy=0.9)", "one sizing rule"),
    ("sparse_lowrank(form='group', rank=4)", "form 'group' has no rank"),
])
def test_bad_options_are_clear_errors_naming_the_layer(spec, message):
    with pytest.raises(OptionError, match=message):
        fr.apply(_mlp(16, 64, 16), spec)


def test_energy_keeps_the_requested_share_of_the_spectrum():
    gm = _mlp(32, 128)
    after = fr.apply(gm, "sparse_lowrank(energy=0.5)").graph_module
    module = after.get_submodule("0")
    values = torch.linalg.svdvals(gm.get_submodule("0").weight.detach()) ** 2
    share = values.cumsum(0) / values.sum()
    assert share[module.rank - 1] >= 0.5 > share[module.rank - 2]


@pytest.mark.slow
def test_cli_rewrites_and_verifies_vit_b_16(capsys):
    spec = "sparse_lowrank(flop_reduction=4)"
    assert main(["apply", "torchvision:vit_b_16", "--pipeline", spec]) == 0
    out = capsys.readouterr().out
    assert out.count("lr r=153: 4.02x fewer MACs") == 24 and "proven" in out
    assert main(["verify", "torchvision:vit_b_16", "--pipeline", spec, "--trials", "1"]) == 0
    assert "holds" in capsys.readouterr().out
    assert main(["apply", "torchvision:vit_b_16", "--pipeline", "sparse_lowrank(model_flop_reduction=4)"]) == 2
    assert "out of reach" in capsys.readouterr().err


@pytest.mark.slow
def test_example_runs_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "antman_lm.py"), "--quick", "--output",
                          str(tmp_path / "antman.md")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "antman.md").read_text()
    assert "| dense teacher |" in text and "| + 1 epochs distillation |" in text
    assert "faster than the teacher with torch.nn.LSTM" in text and "lr r=" in text
