"""Which modules a selection names, and why a module cannot be wrapped (shared by perforate and coverage)."""

from __future__ import annotations

import re

from torch import nn

from apical.dendrites.registry import layer_class_for

# containers that read their children's weights directly instead of calling them: their
# children are never wrapped on their own (the container's own registry entry handles them)
_OPAQUE_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _matches(name: str, module: nn.Module, selector: str | type) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return name == selector or re.fullmatch(selector, name) is not None


def _opaque_children(names: dict[str, nn.Module]) -> dict[str, str]:
    """Descendants of modules that read their weights directly -> that module's type name."""
    out: dict[str, str] = {}
    for pname, parent in names.items():
        if isinstance(parent, _OPAQUE_PARENTS):
            for cname, _ in parent.named_modules():
                if cname:
                    out[f"{pname}.{cname}" if pname else cname] = type(parent).__name__
    return out


def _why_not(module: nn.Module) -> str | None:
    """Why the registry cannot wrap ``module`` (None: it can)."""
    cls = layer_class_for(module)
    if cls is None:
        return f"unsupported type {type(module).__name__}"
    return cls.unsupported(module)
