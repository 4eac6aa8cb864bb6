"""The runtime modules a generated model is made of, in both dialects a traced graph holds.

``F.linear`` / ``F.conv2d`` on a block's own parameters and named function calls give the
call_function / call_method patterns that ``nn.Linear`` alone would not. They live at module level
with plain names, so generated models pickle (the DDP runner sends them to other processes).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Functions a `Call` block may apply, by the name its repr shows; names keep the modules picklable.
# "Tensor.<name>" ops are called as methods, so the traced graph holds call_method nodes.
_CALLS = {
    "torch.relu": torch.relu,
    "F.gelu": F.gelu,
    "torch.tanh": torch.tanh,
    "torch.sigmoid": torch.sigmoid,
    "F.silu": F.silu,
    "F.max_pool2d": F.max_pool2d,
    "F.avg_pool2d": F.avg_pool2d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "torch.flatten": torch.flatten,
    "getitem": operator.getitem,
}


class Call(nn.Module):
    """Applies a named function (``_CALLS``) so the traced graph holds call_function/call_method."""

    def __init__(self, op: str, *args: Any):
        super().__init__()
        self.op, self.args = op, args

    def forward(self, x):
        if self.op.startswith("Tensor."):
            return getattr(x, self.op.removeprefix("Tensor."))(*self.args)
        return _CALLS[self.op](x, *self.args)

    def extra_repr(self) -> str:
        return f"{self.op}, args={self.args}"


class FunctionalLinear(nn.Module):
    """``F.linear`` on its own parameters: a get_attr + call_function pattern instead of call_module."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}"


class FunctionalConv2d(nn.Module):
    """``F.conv2d`` on its own parameters, the functional twin of ``nn.Conv2d``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


class FunctionalDropout(nn.Module):
    """``F.dropout(x, p, self.training)``, the form whose mode is baked in when traced."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class LSTMSequence(nn.Module):
    """Runs an ``nn.LSTM`` and keeps the output sequence, as ``out, _ = self.lstm(x)`` in user code."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        out, _ = self.lstm(x)
        return out


class Residual(nn.Module):
    """``x + body(x)``: a skip connection around a shape-preserving body."""

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Branch(nn.Module):
    """Two paths from one input, merged by ``+`` or ``torch.cat``."""

    def __init__(self, left: nn.Sequential, right: nn.Sequential, merge: str, dim: int):
        super().__init__()
        self.left, self.right, self.merge, self.dim = left, right, merge, dim

    def forward(self, x):
        a, b = self.left(x), self.right(x)
        if self.merge == "add":
            return a + b
        return torch.cat([a, b], self.dim)


class GeneratedNet(nn.Module):
    """The root of every generated model: its layers in order."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def randomise_norm(norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Give a BatchNorm statistics other than (0, 1) and some negative scales, so folding it is tested."""
    with torch.no_grad():
        norm.running_mean.normal_(0.0, 0.5)
        norm.running_var.uniform_(0.25, 2.0)
        norm.num_batches_tracked.fill_(100)
        if norm.affine:
            sign = torch.where(torch.rand(norm.num_features) < 0.2, -1.0, 1.0)
            norm.weight.uniform_(0.5, 1.5).mul_(sign)
            norm.bias.normal_(0.0, 0.2)
