"""GRAPES: per-neuron modulation of the error signal by the neuron's share of incoming weight.

Dellaferrera et al., "Introducing principles of synaptic integration in the optimization of deep
neural networks", Nature Communications 13 (2022); arXiv 2104.11604. For a layer with weight
``W`` of shape ``[O, in, *kernel]``::

    I_n = sum |W[n, ...]|                        (importance of neuron / channel n)
    F_n = clip(2 * I_n / max_m I_m, lo, hi)      (default lo, hi = 1, 2: errors only grow)

"propagate" multiplies the error at the layer's output by ``F`` before it is used for the
layer's own gradient and sent to earlier layers (factors compound towards the input); "local"
scales only the layer's own parameter gradients. ``F`` is recomputed from the current weights
at every backward, under ``no_grad``. GRAPES is patented by IBM (US 12,020,162 B2): check the
licensing before commercial use.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from apical.dendrites.layer import DendriticLayer
from apical.dendrites.recurrent import DendriticRecurrentCell
from apical.dendrites.selection import _OPAQUE_PARENTS

MODES = ("propagate", "local")
IMPORTANCES = ("incoming",)
OUTPUT_LAYER = "output layer"

_PLAIN_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: per-neuron parameters of a dendritic layer (besides ``base``) and their neuron axis
_DENDRITE_AXES = {"dendrite_out": 1, "dendrite_weight": 1, "dendrite_bias": 1, "dendrite_cascade": 2}


def _attached(module: nn.Module) -> bool:
    """Whether a live GRAPES hook sits on ``module`` (a second one would modulate twice)."""
    return any(getattr(h, "_apical_grapes", False) for h in module._forward_hooks.values())


def grapes_factors(weight: Tensor, clip: tuple[float, float] | None = (1.0, 2.0)) -> Tensor:
    """``F = clip(2 * I / max(I), lo, hi)`` with ``I_n = sum |weight[n, ...]|``, shape ``[O]``.

    Computed without gradient in at least float32. All-zero weights give ``I / max(I) = 1``.
    """
    with torch.no_grad():
        w = weight.detach()
        dtype = torch.promote_types(w.dtype, torch.float32)
        imp = w.abs().sum(dim=tuple(range(1, w.dim())), dtype=dtype) if w.dim() > 1 else w.abs().to(dtype)
        top = imp.max()
        ratio = torch.where(top > 0, imp / top.clamp_min(torch.finfo(dtype).tiny), torch.ones_like(imp))
        factor = 2.0 * ratio
        if clip is not None:
            factor = factor.clamp(clip[0], clip[1])
        return factor


@dataclass(eq=False)
class _Target:
    """One modulated layer: the hooked module and where its importance comes from."""

    name: str
    module: nn.Module
    spatial: int  # trailing axes after the neuron axis in the output: 0 for Linear
    memo: Tensor | None = None  # factor of the current backward (cleared at each forward)
    latest: Tensor | None = None  # last factor used, for inspection
    param_hooks: dict[str, tuple[Tensor, RemovableHandle]] = field(default_factory=dict)

    @property
    def weight_owner(self) -> nn.Module:
        return self.module.base if isinstance(self.module, DendriticLayer) else self.module

    def local_params(self) -> Iterator[tuple[str, Tensor, int]]:
        """(key, parameter, neuron axis) of the layer's own per-neuron parameters."""
        owner = self.weight_owner
        for attr in ("weight", "bias"):
            p = getattr(owner, attr, None)
            if isinstance(p, Tensor):
                yield attr, p, 0
        if isinstance(self.module, DendriticLayer):
            for attr, axis in _DENDRITE_AXES.items():
                p = getattr(self.module, attr, None)
                if isinstance(p, Tensor):
                    yield attr, p, axis


class GrapesHandle:
    """What :func:`grapes` returns: the attached hooks, their switches and the latest factors.

    ``enabled`` switches modulation off without detaching (``pause()`` does it for a block);
    ``remove()`` detaches everything. Usable as a context manager that removes on exit.
    """

    def __init__(self, model: nn.Module, targets: list[_Target], mode: str,
                 clip: tuple[float, float] | None, importance: str, during_dendrite_phase: bool) -> None:
        self.mode = mode
        self.clip = clip
        self.importance = importance
        self.during_dendrite_phase = during_dendrite_phase
        self.enabled = True
        self._targets = targets
        self._dendritic = [m for m in model.modules() if isinstance(m, DendriticLayer)]
        self._removed = False
        self._hooks: list[RemovableHandle] = []
        for t in targets:
            self._hooks.append(t.module.register_forward_hook(self._forward_hook(t)))
            if mode == "local":
                self._sync_param_hooks(t)

    # ------------------------------------------------------------------ public
    @property
    def layers(self) -> list[str]:
        """Names of the modulated layers, in ``named_modules`` order."""
        return [t.name for t in self._targets]

    @property
    def removed(self) -> bool:
        return self._removed

    def factors(self) -> dict[str, Tensor]:
        """Per layer, the factor used at the latest backward (``[O]``, float32 or wider).

        A layer that has not seen a backward yet gets its factor from the current weights.
        """
        return {
            t.name: (t.latest if t.latest is not None else self._compute(t)).clone()
            for t in self._targets
        }

    @contextlib.contextmanager
    def pause(self) -> Iterator[GrapesHandle]:
        """Switch modulation off inside the ``with`` block (forward and backward both inside)."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def remove(self) -> None:
        """Detach every hook; graphs built before still run their backward unmodulated."""
        self._removed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for t in self._targets:
            for _, h in t.param_hooks.values():
                h.remove()
            t.param_hooks.clear()
            t.memo = None

    def __enter__(self) -> GrapesHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("enabled" if self.enabled else "paused")
        return f"GrapesHandle(mode={self.mode!r}, clip={self.clip}, layers={self.layers}, {state})"

    # ------------------------------------------------------------------ internals
    def _active(self) -> bool:
        """Whether a hook firing now modulates (checked at backward time)."""
        if self._removed or not self.enabled:
            return False
        if not self.during_dendrite_phase and any(m.num_candidates > 0 for m in self._dendritic):
            return False  # a dendrite phase: leave every error as the correlation taps expect it
        return True

    def _compute(self, t: _Target) -> Tensor:
        return grapes_factors(t.weight_owner.weight, self.clip)

    def _factor(self, t: _Target) -> Tensor:
        """The factor of the current backward: one pass over |W|, shared by all hooks of t."""
        if t.memo is None:
            t.memo = self._compute(t)
            t.latest = t.memo
        return t.memo

    def _forward_hook(self, t: _Target):
        def hook(module: nn.Module, args: object, out: object) -> None:
            t.memo = None  # weights may have changed since the last backward
            if self.mode == "local":
                self._sync_param_hooks(t)
            elif isinstance(out, Tensor) and out.requires_grad and torch.is_grad_enabled():
                # registered before any in-place op downstream (e.g. ReLU(inplace=True)), so it
                # receives the error at this value of the output, as autograd documents
                out.register_hook(self._output_hook(t))

        hook._apical_grapes = True  # type: ignore[attr-defined]
        return hook

    def _output_hook(self, t: _Target):
        def hook(grad: Tensor) -> Tensor | None:
            if not self._active():
                return None
            f = self._factor(t).to(grad.dtype)
            return grad * f.view(-1, *([1] * t.spatial))

        return hook

    def _sync_param_hooks(self, t: _Target) -> None:
        """Hook the current per-neuron parameters (a dendritic layer replaces its Parameter
        objects when a set is installed; frozen ones are hooked once they train)."""
        for key, p, axis in t.local_params():
            old = t.param_hooks.get(key)
            if old is not None and old[0] is p:
                continue
            if not p.requires_grad:
                continue
            if old is not None:
                old[1].remove()
            t.param_hooks[key] = (p, p.register_hook(self._param_hook(t, axis)))

    def _param_hook(self, t: _Target, axis: int):
        def hook(grad: Tensor) -> Tensor | None:
            if not self._active():
                return None
            f = self._factor(t).to(grad.dtype)
            shape = [1] * grad.dim()
            shape[axis] = -1
            return grad * f.view(shape)

        return hook


def _matches(name: str, module: nn.Module, selector: str | type) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return name == selector or re.fullmatch(selector, name) is not None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modulable layers in ``named_modules`` order: dendritic layers (never their ``.base``)
    and plain Linear / ConvNd modules outside modules that read their weights directly;
    recurrent cells are left out."""
    modules = list(model.named_modules())
    bases = {id(m.base) for _, m in modules if isinstance(m, DendriticLayer)}
    opaque = {id(c) for _, m in modules if isinstance(m, _OPAQUE_PARENTS) for c in m.children()}
    found = []
    for name, m in modules:
        if isinstance(m, DendriticRecurrentCell):
            continue  # recurrent layers are not modulated (yet): their gates are not one output
        if (isinstance(m, DendriticLayer) and id(m) not in opaque) or (
            isinstance(m, _PLAIN_TYPES) and id(m) not in bases and id(m) not in opaque
        ):
            found.append((name, m))
    return found


def _resolve(selectors: Sequence[str | type], found: list[tuple[str, nn.Module]], what: str) -> set[str]:
    """Names among ``found`` picked by ``selectors``; a selector picking nothing is an error.

    ``"output layer"`` is the last of ``found``; ``"x.base"`` of a dendritic layer means ``x``.
    """
    if isinstance(selectors, (str, type)):
        raise ValueError(f"{what} must be a sequence of names/regexes/types, e.g. [{selectors!r}]")
    picked: set[str] = set()
    for sel in selectors:
        if not isinstance(sel, (str, type)):
            raise ValueError(f"{what}: {sel!r} is neither a name, a regex nor a module type")
        if sel == OUTPUT_LAYER:
            hits = [found[-1][0]] if found else []
        else:
            hits = [
                n for n, m in found
                if _matches(n, m, sel)
                or (isinstance(m, DendriticLayer) and _matches(f"{n}.base" if n else "base", m.base, sel))
            ]
        if not hits:
            raise ValueError(
                f"{what}: {sel!r} matches no Linear/Conv/dendritic layer of the model; "
                f"its layers are {[n for n, _ in found][:8]}"
            )
        picked.update(hits)
    return picked


def _check_clip(clip: object) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        lo, hi = (float(c) for c in clip)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"clip must be None or a pair (lo, hi) of numbers, got {clip!r}") from None
    if not (math.isfinite(lo) and lo > 0):
        raise ValueError(f"clip: lo must be a finite number > 0, got {lo}")
    if math.isnan(hi) or hi < lo:
        raise ValueError(f"clip: need lo <= hi, got ({lo}, {hi})")
    return lo, hi


def grapes(
    model: nn.Module,
    mode: str = "propagate",
    clip: tuple[float, float] | None = (1.0, 2.0),
    importance: str = "incoming",
    exclude: Sequence[str | type[nn.Module]] = (OUTPUT_LAYER,),
    layers: Sequence[str | type[nn.Module]] | None = None,
    during_dendrite_phase: bool = False,
) -> GrapesHandle:
    """Attach GRAPES error modulation to ``model``'s Linear / ConvNd / dendritic layers.

    Args:
        mode: "propagate" scales the error at each layer's output by ``F`` (per neuron: last
            axis for Linear, axis 1 for ConvNd) before it reaches the layer's gradient and the
            earlier layers; "local" scales only the layer's own per-neuron parameter gradients.
        clip: ``(lo, hi)`` bounds of ``F = 2 I / max I``; ``None`` keeps the raw ``(0, 2]``.
        importance: "incoming": ``I_n = sum |W[n, ...]|`` over the neuron's input weights.
        exclude: names, regexes (full match over ``named_modules`` names) or module types left
            alone. ``"output layer"`` means the last modulable layer in ``named_modules`` order
            (registration order, which is usually, not always, the order of the forward).
        layers: restrict to these names/regexes/types (``None``: every modulable layer).
        during_dendrite_phase: while any dendritic layer holds candidates (apical's dendrite
            phase), hooks pass errors through unchanged unless this is True, so that the
            candidates' correlation taps see the true errors.

    A dendritic layer is modulated once, as a unit (never its ``.base`` separately); its
    importance comes from ``base.weight`` only: the dendrite-to-neuron weights ``v`` are not
    counted (they start at zero, weigh activations of another scale, and are D numbers against
    the ``fan_in`` synapses GRAPES compares), so ``F`` stays the factor of the original layer.
    Call it after ``apical.perforate``: a handle attached before sits on what became ``.base``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    clip = _check_clip(clip)
    if not isinstance(model, nn.Module):
        raise TypeError(f"grapes expects an nn.Module, got {type(model).__name__}")
    found = _candidates(model)
    if not found:
        raise ValueError("the model has no nn.Linear / nn.Conv1d/2d/3d / dendritic layer to modulate")
    chosen = _resolve(layers, found, "layers") if layers is not None else {n for n, _ in found}
    chosen -= _resolve(exclude, found, "exclude")
    if not chosen:
        raise ValueError(
            f"nothing left to modulate after layers={layers!r}, exclude={exclude!r} "
            f"(layers: {[n for n, _ in found][:8]})"
        )
    targets: list[_Target] = []
    for name, m in found:
        if name not in chosen:
            continue
        if _attached(m):
            raise ValueError(f"layer {name!r} already has a GRAPES handle: remove() it first")
        owner = m.base if isinstance(m, DendriticLayer) else m
        if mode == "local" and not isinstance(owner.weight, nn.Parameter):
            raise ValueError(
                f"layer {name!r}: its weight is computed on access (e.g. a parametrization), so "
                "mode='local' cannot hook its gradient; use mode='propagate'"
            )
        spatial = len(owner.kernel_size) if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else 0
        targets.append(_Target(name, m, spatial))
    return GrapesHandle(model, targets, mode, clip, importance, during_dendrite_phase)
