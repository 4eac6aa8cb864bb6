"""Checking that passes keep the contracts they claim, on a user's model or on generated ones.

``check_contract`` runs each pass of a pipeline on the traced model and asks the pass to check its own
contract (Pass.check) between its input and output graph, on the example inputs and on fresh random
inputs whose named dims take other sizes: a rewrite must hold for every admissible shape, not only
for the one it was traced with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from .. import meta
from ..cost_models import graph_info
from ..errors import ContractError
from ..passes import Pass
from ..pipeline import Pipeline
from ..tracing import trace


@dataclass
class PassCheck:
    pass_: Pass
    failures: list[str] = field(default_factory=list)
    inputs_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class ContractResult:
    """Per pass: its contract, how many inputs were checked, and what broke (nothing, if ok)."""

    checks: list[PassCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def lines(self) -> list[str]:
        lines = []
        for check in self.checks:
            verdict = "holds" if check.ok else "BROKEN"
            lines.append(f"{check.pass_!r}: {check.pass_.contract} -- {verdict} on {check.inputs_checked} input(s)")
            lines += [f"  {failure}" for failure in check.failures]
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def raise_if_broken(self) -> None:
        if not self.ok:
            broken = next(check for check in self.checks if not check.ok)
            raise ContractError(f"pass {broken.pass_.name} breaks its contract ({broken.pass_.contract}): "
                                f"{broken.failures[0]}", where=repr(broken.pass_),
                                fix="report this with the model; do not use the rewritten graph")


def random_inputs(gm: fx.GraphModule, trials: int, seed: int = 0) -> list[tuple]:
    """The example inputs, plus ``trials`` random inputs where each symbolic dim takes another size."""
    info = graph_info(gm)
    generator = torch.Generator().manual_seed(seed)
    examples = [info.spec.example_inputs]
    for _ in range(trials):
        sizes = {name: max(2, info.spec.hint(name) + int(torch.randint(-1, 3, (1,), generator=generator)))
                 for name in info.symbolic}
        def make(value, shape):
            if value.is_floating_point():
                return torch.randn(shape, generator=generator, dtype=value.dtype)
            high = int(value.max().item()) + 1 if value.numel() else 2
            return torch.randint(0, max(high, 1), shape, generator=generator, dtype=value.dtype)

        examples.append(info.spec.resized(sizes, make))
    return examples


def check_contract(pass_: Pass | Pipeline | str | Sequence[Pass | str], model: torch.nn.Module,
                   inputs: tuple | None = None, *, dynamic: dict[str, tuple[int, int]] | None = None,
                   trials: int = 3, seed: int = 0) -> ContractResult:
    """Run each pass on ``model`` (traced, or traced here from ``inputs``/``dynamic``) and check its contract."""
    pipeline = pass_ if isinstance(pass_, Pipeline) else Pipeline([pass_] if isinstance(pass_, (Pass, str))
                                                                  else list(pass_), seed=seed)
    gm = model if isinstance(model, fx.GraphModule) and meta.info(model) is not None else trace(model, inputs, dynamic)
    samples = random_inputs(gm, trials, seed)
    checks = []
    current = gm
    for p in pipeline.passes:
        after, _ = pipeline.run_step(p, current)
        check = PassCheck(p)
        for sample in samples:
            failure = p.check(current, after, sample)
            check.inputs_checked += 1
            if failure:
                shapes = ", ".join(str(tuple(x.shape)) for x in sample if isinstance(x, torch.Tensor))
                check.failures.append(f"on inputs of shape {shapes}: {failure}")
        checks.append(check)
        current = after
    return ContractResult(checks)


__all__ = ["ContractResult", "PassCheck", "check_contract", "random_inputs"]
