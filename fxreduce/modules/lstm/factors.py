"""The GEMM-factor protocol: how a projection module exposes its weights to the fast kernels."""

from __future__ import annotations

from torch import Tensor, nn


def gemm_factors(module: nn.Module) -> tuple[list[Tensor], Tensor | None] | None:
    """The GEMM operands of a projection, or None when it is opaque.

    Protocol (duck-typed): a module may define ``gemm_factors() -> (weights, bias)`` with weights
    ``[W1, W2, ..., Wm]`` (``Wj`` of shape ``(out_j, in_j)``, autograd-connected to its parameters) and
    ``bias`` of shape ``(out_m,)`` or None, such that ``module(x) == x @ W1^T @ W2^T ... @ Wm^T + bias``.
    A plain ``nn.Linear`` is the one-factor case.
    """
    if type(module) is nn.Linear:
        return [module.weight], module.bias
    method = getattr(module, "gemm_factors", None)
    if method is None:
        return None
    weights, bias = method()
    return list(weights), bias
