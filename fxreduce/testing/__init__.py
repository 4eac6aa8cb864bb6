"""Public property-testing tools: model strategies, contract checks, and a 2-process DDP runner.

Users check passes on their own kinds of model with these, as fxreduce's own tests do.
"""

from .contracts import ContractResult, PassCheck, check_contract, random_inputs
from .distributed import RankError, RankTimeoutError, run_distributed
from .strategies import (KINDS, GeneratedModel, ModelSpec, cnn_models, linear_shapes, lstm_models, mlp_models,
                         model_specs, models)

__all__ = ["KINDS", "ContractResult", "GeneratedModel", "ModelSpec", "PassCheck", "RankError", "RankTimeoutError",
           "check_contract", "cnn_models", "linear_shapes", "lstm_models", "mlp_models", "model_specs", "models",
           "random_inputs", "run_distributed"]
