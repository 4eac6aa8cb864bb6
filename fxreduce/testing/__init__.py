"""Public property-testing tools: the contract kit, model strategies, contract checks, a 2-process DDP runner.

Users check passes on their own kinds of model with these, as fxreduce's own tests do. Names load on
first use: passes import :mod:`fxreduce.testing.kit` while the strategies and checks import the passes.
"""

import importlib

_HOMES = {
    "capture_calls": "kit", "compare_outputs": "kit", "run_eval": "kit", "seeded_forward": "kit",
    "seeded_gradients": "kit",
    "ContractResult": "contracts", "PassCheck": "contracts", "check_contract": "contracts",
    "random_inputs": "contracts",
    "RankError": "distributed", "RankTimeoutError": "distributed", "run_distributed": "distributed",
    "GeneratedModel": "specs", "ModelSpec": "specs",
    "MODEL_FAMILIES": "strategies", "cnn_models": "strategies", "linear_shapes": "strategies",
    "lstm_models": "strategies", "mlp_models": "strategies", "model_specs": "strategies", "models": "strategies",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'fxreduce.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
