"""The registered passes, one file each, named after the pass. Importing this package registers them all."""

from . import (decompose_lstm, dynamic_resolution, eliminate_dead_code, error_map_pruning, fold_batchnorm,
               instance_filter, lower_int8, remove_dropout, sparse_lowrank, structured_dropout)
from .base import (EVAL_EXACT, REGISTRY, Contract, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, get_pass,
                   option, register)

__all__ = ["EVAL_EXACT", "REGISTRY", "Contract", "LayerSelection", "Pass", "PassOutcome", "Rewrite", "Skipped",
           "decompose_lstm", "dynamic_resolution", "eliminate_dead_code", "error_map_pruning", "fold_batchnorm",
           "get_pass", "instance_filter", "lower_int8", "option", "register", "remove_dropout", "sparse_lowrank",
           "structured_dropout"]
