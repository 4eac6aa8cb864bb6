"""testing/kit.py: the functions contract checks are built from."""

import torch
from torch import nn

from fxreduce.testing import capture_calls, compare_outputs, run_eval, seeded_forward, seeded_gradients


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.drop, self.last = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.last(self.drop(torch.relu(self.first(x)))))


def test_run_eval_runs_in_eval_mode_without_gradients_and_restores_the_mode():
    model = Noisy().train()
    x = torch.randn(3, 4)
    out = run_eval(model, (x,))
    assert model.training and not out.requires_grad
    assert torch.equal(out, run_eval(model, (x,)))


def test_compare_outputs_says_what_differs():
    a = (torch.ones(2), {"b": torch.zeros(3)})
    assert compare_outputs(a, (torch.ones(2), {"b": torch.zeros(3)}), 1e-6) is None
    assert "output 1 differs by 0.5" in compare_outputs(a, (torch.ones(2), {"b": torch.full((3,), 0.5)}), 1e-6)
    assert "shape changed: (2,) -> (3,)" in compare_outputs(a, (torch.ones(3), {"b": torch.zeros(3)}), 1e-6)
    assert "structure changed" in compare_outputs(a, (torch.ones(2),), 1e-6)


def test_capture_calls_returns_each_submodules_first_call_and_removes_its_hooks():
    model = Noisy()
    x = torch.randn(3, 4)
    seen = capture_calls(model, {"first": model.first, "unused": nn.Linear(1, 1)}, (x,))
    assert set(seen) == {"first"}
    (args, out) = seen["first"]
    assert torch.equal(args[0], x) and torch.allclose(out, model.first(x))
    assert not model.first._forward_hooks


def test_seeded_runs_draw_the_same_masks_and_give_every_trainable_gradient():
    model = Noisy().eval()
    x = torch.randn(16, 4)
    first, grads = seeded_gradients(model, (x,), seed=3)
    second, again = seeded_gradients(model, (x,), seed=3)
    assert torch.equal(first, second) and not model.training
    assert set(grads) == {"first.weight", "first.bias", "last.weight", "last.bias"}
    assert all(torch.equal(grads[name], again[name]) for name in grads)
    assert not torch.equal(seeded_forward(model, (x,), seed=3), seeded_forward(model, (x,), seed=4))
