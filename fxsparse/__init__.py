"""fxsparse: skip-softmax attention sparsity for PyTorch and HuggingFace models via FX graph rewriting.

Public API (the heavy modules load on first use)::

    fxsparse.sparsify(model, config)            # HF / nn.Module: rewrite (and calibrate) in one call
    fxsparse.summary(model)                     # per-site table
    fxsparse.transform(exported_program, config)
    fxsparse.calibrate(model, config)
    fxsparse.export_hf(model, directory)
    torch.compile(model, backend="fxsparse")
"""

import importlib

__version__ = "0.1.0"

from .config import SKIP_SOFTMAX_CALIB, SKIP_SOFTMAX_DEFAULT, SparseAttentionConfig
from .ops import skip_softmax_attention
from .sites import SparseSite, sites_of

_LAZY = {
    "sparsify": "fxsparse.api",
    "summary": "fxsparse.api",
    "enable_sparsity": "fxsparse.api",
    "disable_sparsity": "fxsparse.api",
    "set_threshold": "fxsparse.api",
    "set_target_sparsity": "fxsparse.api",
    "get_stats": "fxsparse.api",
    "reset_stats": "fxsparse.api",
    "transform": "fxsparse.export",
    "calibrate": "fxsparse.calibration",
    "export_hf": "fxsparse.hf_checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxsparse' has no attribute {name!r}")


__all__ = [
    "SKIP_SOFTMAX_CALIB",
    "SKIP_SOFTMAX_DEFAULT",
    "SparseAttentionConfig",
    "SparseSite",
    "sites_of",
    "skip_softmax_attention",
    *_LAZY,
]
