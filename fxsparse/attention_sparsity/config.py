"""The presets under Model Optimizer's module path (``...attention_sparsity.config``)."""

from ..config import SKIP_SOFTMAX_CALIB, SKIP_SOFTMAX_DEFAULT, SparseAttentionConfig

__all__ = ["SKIP_SOFTMAX_CALIB", "SKIP_SOFTMAX_DEFAULT", "SparseAttentionConfig"]
