"""Runtime modules that rewritten graphs call. Each imports torch only and declares its own cost."""

from .error_map import ErrorMapConv2d, ErrorMapLinear
from .factorized import GroupLinear, LowRankLinear, SparseLowRankLinear
from .instance_filter import InstanceFilter, default_filter
from .int8 import Int8Conv2d, Int8Linear
from .lstm import DecomposedLSTM, KeepSet
from .sparse_int8 import SparseInt8Conv2d, SparseInt8Linear
from .structured_dropout import StructuredDropoutLinear, StructuredDropoutLSTM

__all__ = ["DecomposedLSTM", "ErrorMapConv2d", "ErrorMapLinear", "InstanceFilter", "Int8Conv2d", "Int8Linear", "KeepSet",
           "GroupLinear", "LowRankLinear", "SparseInt8Conv2d", "SparseInt8Linear", "SparseLowRankLinear",
           "StructuredDropoutLSTM", "StructuredDropoutLinear", "default_filter"]
