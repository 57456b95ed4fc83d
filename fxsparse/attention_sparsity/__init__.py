"""Model Optimizer-compatible import path: ``import fxsparse.attention_sparsity as mtsa``.

    import fxsparse.attention_sparsity as mtsa
    from fxsparse.attention_sparsity.config import SKIP_SOFTMAX_DEFAULT, SKIP_SOFTMAX_CALIB
    model = mtsa.sparsify(model, config=SKIP_SOFTMAX_CALIB)
"""

from ..api import (
    disable_sparsity,
    enable_sparsity,
    get_stats,
    reset_stats,
    set_target_sparsity,
    set_threshold,
    sparsify,
    summary,
)
from .config import SKIP_SOFTMAX_CALIB, SKIP_SOFTMAX_DEFAULT

__all__ = [
    "SKIP_SOFTMAX_CALIB",
    "SKIP_SOFTMAX_DEFAULT",
    "disable_sparsity",
    "enable_sparsity",
    "get_stats",
    "reset_stats",
    "set_target_sparsity",
    "set_threshold",
    "sparsify",
    "summary",
]
