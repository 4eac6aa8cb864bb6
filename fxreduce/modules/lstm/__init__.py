"""A decomposed ``torch.nn.LSTM``: nn.LSTM's numbers, replaceable projections, keep sets, fast CPU kernels.

Why it exists: nn.LSTM is one opaque fused op, so a compression pass cannot swap its gate matrices for
low-rank or grouped modules (AntMan), and structured dropout cannot skip the dropped columns of its
GEMMs. This package keeps nn.LSTM's constructor, forward, results and (while dense) parameter names, but
computes every layer and direction as

1. one big GEMM for the input projections of all time steps (autograd gives its backward as big GEMMs);
2. a recurrence over the whole sequence as one autograd Function: per step one small GEMM with the
   recurrent weights and the fused cell; the recurrent weight gradient is one big GEMM at the end.

On CPU float32/float64 with fxreduce's native kernels built (fxreduce.native), the recurrence is one
C++ time loop per layer and direction (the per-step GEMM on W_hh^T packed once per call, over the kept
units of a hidden keep set), and per-step input keep sets run the indirect-K GEMMs: each kept unit is one
contiguous row of W^T, so a step's kept columns cost no gather of the weight. Elsewhere (other devices
and dtypes, no extension, tracing) the torch path below serves and is the reference: oneDNN GEMMs in
float32 on CPU, the per-step ones on weights packed once per sequence; ``addmm`` otherwise.

Keep sets: per-sequence sets gather k weight columns once and keep every GEMM whole. Per-step sets on
the torch path run the input projection as T GEMMs of N rows over each step's kept columns; uniform sets
gather those columns per step, window sets (:meth:`KeepSet.windows`) read them as slices of the weight
permuted once per sequence.

Files: ``keep_sets`` (KeepSet), ``factors`` (the GEMM-factor protocol), ``onednn`` (oneDNN dispatch),
``step_projection`` (per-step keep sets on a projection), ``recurrence`` (the recurrence's autograd
Function), ``module`` (the LSTM).
"""

from .factors import gemm_factors
from .keep_sets import KeepSet
from .module import PROJECTIONS, DecomposedLSTM, TORCH_KERNEL_MAX_HIDDEN
from .recurrence import autograd_recurrence, fast_recurrence
from .step_projection import input_projection

__all__ = ["PROJECTIONS", "DecomposedLSTM", "TORCH_KERNEL_MAX_HIDDEN", "KeepSet", "autograd_recurrence", "fast_recurrence",
           "gemm_factors", "input_projection"]
