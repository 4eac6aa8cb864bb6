"""oneDNN dispatch for the dense GEMMs of the torch path: big GEMMs over all steps and per-step GEMMs on a
weight packed once per sequence. Real CPU float32 tensors only; everything else takes torch.mm / addmm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from ... import native

try:  # oneDNN's linear, as torch's CPU inductor backend uses it; resolved once (an op lookup is not free).
    DNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
    _DNN_LINEAR_ADD = torch.ops.mkldnn._linear_pointwise.binary
    _DNN_PACK = torch.ops.mkldnn._reorder_linear_weight.default
except (AttributeError, RuntimeError):
    DNN_LINEAR = None

# Below this many weight elements a per-step GEMM is faster through addmm: oneDNN's call costs more per call,
# which its faster kernel wins back only on larger weights (docs/benchmarks.md, "Design measurements").
_STEP_DNN_MIN_WEIGHTS = 1 << 17

# From this many rows and (out x k) weights a window's weight gradient is faster as a oneDNN GEMM plus an add
# into the gradient's columns than as one addmm_ into them (docs/benchmarks.md, "Design measurements").
WINDOW_DNN_MIN_ROWS = 32
WINDOW_DNN_MIN_WEIGHTS = 1 << 18


def onednn_ok(tensor: Tensor) -> bool:
    """oneDNN's kernels for real CPU float32 tensors; fake tensors (costing, torch.export) take torch.mm, and
    so does a real weight met inside a fake run (the parameters stay real there), whose packing op has no
    fake kernel."""
    return (
        DNN_LINEAR is not None
        and not is_fake(tensor)
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T``. On CPU float32 through oneDNN, whose GEMMs beat MKL's sgemm on these shapes, most on the
    transposed operands of the backward (docs/benchmarks.md, "Design measurements")."""
    if onednn_ok(a):
        return DNN_LINEAR(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


class _Linear(torch.autograd.Function):
    """``x @ W^T + b`` over all time steps: the forward and input-gradient GEMMs on oneDNN, the weight gradient on
    the native kernels where they serve (else oneDNN)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = DNN_LINEAR(x.flatten(0, -2), weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.flatten(0, -2)
        dx = mm_t(dy, weight.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # dy^T x: the native weight-gradient kernel reads dy^T where it lies; oneDNN first copies both
            # transposed operands (docs/benchmarks.md, LSTM section).
            flat = x.flatten(0, -2)
            dw = (native.call("gather_matmul_weight_grad", dy[None], flat[None], None, weight.shape[0])
                  if native.serves_eagerly(dy, flat) else mm_t(dy.t(), flat.t()))
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return _Linear.apply(x, weight, bias) if onednn_ok(x) else F.linear(x, weight, bias)


class StepMatmul:
    """``z @ weight^T (+ add)`` repeated at every time step with the same weight.

    For the small batch of a recurrence, oneDNN with the weight packed once for that batch size beats
    ``addmm`` on large weights; nn.LSTM's oneDNN kernel relies on the same. Small weights stay on ``addmm``.
    """

    def __init__(self, weight: Tensor, rows: int):
        self.weight = weight
        use_dnn = onednn_ok(weight) and weight.numel() >= _STEP_DNN_MIN_WEIGHTS
        self.packed = _DNN_PACK(weight.contiguous(), rows) if use_dnn else None

    def __call__(self, z: Tensor, add: Tensor | None = None) -> Tensor:
        if self.packed is None:
            return torch.mm(z, self.weight.t()) if add is None else torch.addmm(add, z, self.weight.t())
        if add is None:
            return DNN_LINEAR(z, self.packed, None, "none", [], "")
        return _DNN_LINEAR_ADD(z, add, self.packed, None, "add")
