"""The ``fxsparse::skip_softmax_attention`` op, its exact PyTorch reference and threshold state."""

from .op import skip_softmax_attention, skip_softmax_attention_op
from .reference import reference_attention
from .threshold import DECODE, PREFILL, log_threshold, make_threshold_state

__all__ = [
    "skip_softmax_attention",
    "skip_softmax_attention_op",
    "reference_attention",
    "make_threshold_state",
    "log_threshold",
    "PREFILL",
    "DECODE",
]
