"""Site names: the module path of the attention, from a node's ``nn_module_stack``.

Dynamo decorates paths with the frame's locals (``L['self']``, ``L['args'][0]``) and, depending on
how a module was reached, ``._modules['x']``, ``[3]`` or ``getattr(m, '3')``; torch.export writes
plain paths. Both become ``model.layers.3.self_attn``. A node of the graph's own module has the
empty path: the root of an export, or the module of a Dynamo frame, whose own nodes carry no stack
(a frame resumed after a graph break inside an attention module's forward is one).
"""

from __future__ import annotations

import re

from torch.fx import Node

FRAME_ROOT = re.compile(r"^L\[['\"]\w+['\"]\](\[\d+\])*")
_DECORATION = (
    (re.compile(r"\.?_modules\[['\"]([^'\"]+)['\"]\]"), r".\1"),
    (re.compile(r"\[['\"]([^'\"]+)['\"]\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
)
_GETATTR = re.compile(r"getattr\(([^,()]+), ['\"]([^'\"]+)['\"]\)")


def module_path(dynamo_path: str) -> str:
    """``L['self']._modules['model'].layers[3]`` → ``model.layers.3`` (export paths pass through)."""
    path = dynamo_path
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = FRAME_ROOT.sub("", path)
    for pattern, replacement in _DECORATION:
        path = pattern.sub(replacement, path)
    return path.strip(".")


ROOT_SITE = "attention"  # the full name of a site in the graph's own module when no path names it


def site_name(node: Node) -> str:
    """The innermost module around ``node`` (its ``nn_module_stack``) as a plain module path, relative
    to the graph's own module ("" for that module itself)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return module_path(path)


def full_site_name(prefix: str, relative: str) -> str:
    """A site's name: its path ``relative`` to the graph's module, under that module's path ``prefix``."""
    return ".".join(p for p in (prefix, relative) if p) or ROOT_SITE
