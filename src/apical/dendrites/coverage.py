"""Which modules of a model hold dendrites, and why the others do not: :func:`coverage`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from apical.dendrites.attention import DendriticMultiheadAttention
from apical.dendrites.config import DendriteConfig
from apical.dendrites.layer import DendriticLayer
from apical.dendrites.recurrent import _DendriticRecurrent
from apical.dendrites.registry import is_dendritic_root
from apical.dendrites.selection import _matches, _opaque_children, _why_not

__all__ = ["Coverage", "CoverageEntry", "coverage"]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CHOSEN = ("excluded by config", "not selected by config")


@dataclass(frozen=True)
class CoverageEntry:
    """One module that holds parameters of its own."""

    name: str
    """Qualified name in ``model.named_modules()`` (of the wrapped module: ``fc.base``)."""
    kind: str
    """The module's type name."""
    parameters: int
    """Elements of its own parameters (a tied parameter counts once, for the wrapped holder)."""
    layer: bool
    """Whether its parameters count as layer parameters (a weight matrix or kernel: not an
    embedding table, a norm's scale or a lone bias)."""
    wrapped: bool
    """Whether its neurons carry dendrites."""
    reason: str
    """"wrapped (...)", or why it was left out."""


@dataclass
class Coverage:
    """The modules of a model with their parameters, wrapped or not, and why."""

    entries: list[CoverageEntry]

    def __iter__(self) -> Iterator[CoverageEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def layer_parameters(self) -> int:
        return sum(e.parameters for e in self.entries if e.layer)

    @property
    def wrapped_parameters(self) -> int:
        return sum(e.parameters for e in self.entries if e.layer and e.wrapped)

    @property
    def fraction(self) -> float:
        """Share of the layer parameters that sit in wrapped modules (1.0 for a model without any)."""
        total = self.layer_parameters
        return self.wrapped_parameters / total if total else 1.0

    @property
    def unreachable_parameters(self) -> int:
        """Layer parameters left out for a reason other than the config's include / exclude."""
        return sum(e.parameters for e in self.left_out if not e.reason.startswith(_CHOSEN))

    @property
    def left_out(self) -> list[CoverageEntry]:
        """Layer modules without dendrites."""
        return [e for e in self.entries if e.layer and not e.wrapped]

    def summary(self) -> str:
        """One line: wrapped modules, share of layer parameters, what was left out."""
        wrapped = sum(1 for e in self.entries if e.wrapped)
        text = (f"dendrites on {wrapped} module(s) holding {100 * self.fraction:.1f}% of the layer parameters "
                f"({self.wrapped_parameters:,} of {self.layer_parameters:,})")
        left = self.left_out
        if left:
            reasons: dict[str, int] = {}
            for e in left:
                reasons[e.reason] = reasons.get(e.reason, 0) + e.parameters
            top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
            text += f"; left out {len(left)} layer module(s): " + "; ".join(f"{r} ({p:,})" for r, p in top)
        return text

    def table(self) -> str:
        """Every entry, one per line."""
        rows = [("name", "type", "parameters", "layer", "wrapped", "reason")]
        rows += [(e.name, e.kind, f"{e.parameters:,}", "yes" if e.layer else "-", "yes" if e.wrapped else "no",
                  e.reason) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)), r[5]]).rstrip()
                         for r in rows)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def to_rows(self) -> list[list]:
        """JSON-friendly rows (checkpoints store them; ``apical inspect`` prints them)."""
        return [[e.name, e.kind, e.parameters, e.layer, e.wrapped, e.reason] for e in self.entries]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence]) -> Coverage:
        fields = [f.name for f in dataclasses.fields(CoverageEntry)]
        return cls([CoverageEntry(**dict(zip(fields, row, strict=True))) for row in rows])


def _is_layer(module: nn.Module, own: list[nn.Parameter]) -> tuple[bool, str | None]:
    if isinstance(module, _EMBEDDINGS) or "Embedding" in type(module).__name__:
        return False, "embedding: a lookup table, no neurons"
    if not any(isinstance(p, nn.parameter.UninitializedParameter) or p.dim() >= 2 for p in own):
        return False, "no weight matrix (a norm's scale, a bias or a scalar)"
    return True, None


def coverage(model: nn.Module, config: DendriteConfig | None = None) -> Coverage:
    """Every module of ``model`` that holds parameters of its own, wrapped or not, with the reason.

    On a perforated model, the wrapped modules (the ``base`` of each dendritic layer, each
    ``nn.MultiheadAttention`` with dendrites on its projections, each ``nn.RNN/GRU/LSTM`` with
    dendritic cells) say ``wrapped``; the others say
    why not: an unsupported type, a lazy layer not yet initialised, a module inside one that reads
    its weights directly, ``exclude``/``include`` of ``config`` (when given), an embedding table or
    a module without a weight matrix (those two do not count as layer parameters). The dendrites'
    own tensors are not listed. ``coverage(model).fraction`` is the share of the layer parameters
    in wrapped modules.
    """
    names = dict(model.named_modules())
    opaque = _opaque_children(names)
    own: dict[str, list[nn.Parameter]] = {}
    holders: dict[int, list[str]] = {}
    for name, module in names.items():
        if isinstance(module, DendriticLayer):
            continue  # the dendrite tensors; the wrapped module is its child `base`
        params = [p for p in module._parameters.values() if p is not None]
        if params:
            own[name] = params
            for p in params:
                holders.setdefault(id(p), []).append(name)

    def status(name: str, module: nn.Module) -> tuple[bool, str]:
        parent_name, _, attr = name.rpartition(".")
        parent = names.get(parent_name) if name else None
        if isinstance(parent, DendriticLayer) and attr == "base":
            return True, f"wrapped ({type(parent).__name__})"
        if isinstance(module, DendriticMultiheadAttention):
            return True, "wrapped (q, k, v projections)"
        if isinstance(module, _DendriticRecurrent):
            return True, "wrapped (a dendritic cell per layer and direction)"
        if any(name.startswith(r + ".") for r in dendritic_roots):
            return False, "inside a wrapped module"
        if name in opaque:
            return False, f"inside {opaque[name]}, which reads its weights directly"
        why = _why_not(module)
        if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
            why = "lazy layer not initialised: run one forward pass first"
        if why is not None:
            return False, why
        if config is not None:
            if any(_matches(name, module, sel) for sel in config.exclude):
                return False, "excluded by config.exclude"
            if config.include is not None and not any(_matches(name, module, sel) for sel in config.include):
                return False, "not selected by config.include"
        if dendritic_roots:
            return False, "supported, left out by the include / exclude selection"
        return False, "supported, not wrapped (perforate has not run)"

    dendritic_roots = [n for n, m in names.items() if n and is_dendritic_root(m)]
    statuses = {name: status(name, names[name]) for name in own}
    counted: set[int] = set()
    entries: list[CoverageEntry] = []
    for name, params in own.items():
        module = names[name]
        wrapped, reason = statuses[name]
        layer, not_layer = _is_layer(module, params)
        if not layer and not wrapped:
            reason = not_layer
        n = 0
        for p in params:
            if id(p) in counted:
                continue
            # a tied parameter counts once: for a wrapped holder if there is one
            first_wrapped = next((h for h in holders[id(p)] if statuses[h][0]), None)
            if first_wrapped is not None and first_wrapped != name:
                continue
            counted.add(id(p))
            if not isinstance(p, nn.parameter.UninitializedParameter):
                n += p.numel()
        entries.append(CoverageEntry(name, type(module).__name__, int(n), layer or wrapped, wrapped, reason))
    return Coverage(entries)
