"""Errors a user can cause. Each message says what went wrong, where, and how to fix it."""

from __future__ import annotations


class FxReduceError(Exception):
    """Base of every error fxreduce raises for bad input.

    ``what`` is the problem, ``where`` the node / module / file it concerns, ``fix`` what to do.
    ``str(error)`` is one line, which the CLI prints before exiting with status 2.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"at {where}")
        message = " ".join(parts)
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class TraceError(FxReduceError):
    """The model could not be captured as a graph."""


class InputError(FxReduceError):
    """Example inputs, dims or a model reference do not fit the model."""


class PassNotFoundError(FxReduceError):
    """A pipeline names a pass that is not registered."""


class OptionError(FxReduceError):
    """A pass option is unknown, of the wrong type or out of range."""


class PassError(FxReduceError):
    """A pass failed on a graph, or passes were composed in an order that cannot work."""


class UnsupportedError(FxReduceError):
    """The model uses a feature a pass or runtime module does not support."""


class CostError(FxReduceError):
    """The cost model cannot state a cost (e.g. unknown dim names)."""


class LoadError(FxReduceError):
    """A saved model is missing, corrupt, or would run code when loaded."""


class ProfileError(FxReduceError):
    """A latency profile is missing, unreadable, or was measured on another machine or setup."""


class ContractError(FxReduceError):
    """A rewritten graph breaks the contract its pass claims."""


class RenderError(FxReduceError):
    """An inspection cannot be rendered or written in the requested format."""


class UsageError(FxReduceError):
    """The command line itself is wrong (unknown flag, missing argument)."""
