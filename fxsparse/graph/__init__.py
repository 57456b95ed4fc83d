"""Attention matching (``match``) and graph surgery (``rewrite``) over FX graphs."""

from .match import AttentionMatch, LeftDense, find_attention
from .rewrite import RewriteReport, SiteInputs, rewrite_attention

__all__ = ["AttentionMatch", "LeftDense", "find_attention", "RewriteReport", "SiteInputs", "rewrite_attention"]
