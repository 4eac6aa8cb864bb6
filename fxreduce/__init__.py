"""fxreduce: computation-reducing compiler passes on torch.fx, with a symbolic cost model and contracts."""

from .cost_models import Certificate, GraphCost, certify, graph_cost as cost
from .errors import FxReduceError
from .inspection import inspect
from .measurement import Measurement, measure
from .passes import get_pass
from .pipeline import Pipeline, PipelineResult, RewriteReport, parse_spec
from .profiling import calibrate
from .submodules import SubmoduleResult, apply
from .tracing import trace

__version__ = "0.1.0"
__all__ = ["Certificate", "FxReduceError", "GraphCost", "Measurement", "Pipeline", "PipelineResult", "RewriteReport",
           "SubmoduleResult", "apply", "calibrate", "certify", "cost", "get_pass", "inspect", "measure", "parse_spec",
           "trace"]
