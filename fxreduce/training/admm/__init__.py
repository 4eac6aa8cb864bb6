"""ADMM-NN: joint weight pruning and quantization by ADMM (Ren et al., ASPLOS 2019, arXiv 1812.11677).

Training minimises loss(W) subject to W_i in S_i per selected weight (at most k_i non-zeros; non-zeros on
the levels ±q..±nq). ADMM splits off Z_i = W_i with a scaled dual U_i:

1. W-step: a few SGD steps on loss(W) + sum (rho/2) ||W - Z + U||_F^2   (:meth:`ADMM.penalty`, squared)
2. Z = Proj_S(W + U)   (W + U, not W: NNI's PR #3110 fixed exactly that bug)
3. U = U + W - Z       (:meth:`ADMM.update`; rho may grow by a factor per update)

then the official schedule: hard prune and retrain with the mask on weights and gradients, ADMM with
the quantization set (mask frozen), progressive quantization (each round fixes the weights closest to
their level and retrains the rest) and a final snap. :func:`train` runs all of it; the pieces also plug
into a user's own loop.

One level per module: ``projections`` (the constraint sets), ``selection`` (which weights, found on the
model's own trace), ``state`` (:class:`ADMM`) and ``loop`` (:func:`train`).
"""

from .loop import EpochRecord, History, Schedule, train
from .projections import MAX_LEVELS, exact_scale, project_joint, project_quantized, project_sparse, quantization_scale
from .state import ADMM, ADMMWeight, LayerSummary

__all__ = ["ADMM", "ADMMWeight", "EpochRecord", "History", "LayerSummary", "MAX_LEVELS", "Schedule", "exact_scale",
           "project_joint", "project_quantized", "project_sparse", "quantization_scale", "train"]
