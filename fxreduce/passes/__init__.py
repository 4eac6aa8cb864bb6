"""The registered passes. Importing this package registers every shipped pass."""

from . import dead_code, dynamic_resolution, folding, int8, lstm, on_device, sparse_lowrank, structured_dropout
from .base import REGISTRY, Contract, Pass, PassOutcome, Rewrite, Skipped, get_pass, option, register

__all__ = ["REGISTRY", "Contract", "Pass", "PassOutcome", "Rewrite", "Skipped", "dead_code", "dynamic_resolution",
           "folding", "get_pass", "int8", "lstm", "on_device", "option", "register", "sparse_lowrank",
           "structured_dropout"]
