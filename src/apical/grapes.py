"""GRAPES: per-neuron modulation of the error signal by the neuron's share of incoming weight.

Dellaferrera et al., "Introducing principles of synaptic integration in the optimization of deep
neural networks", Nature Communications 13 (2022); arXiv 2104.11604. For a layer with weight
``W`` of shape ``[O, in, *kernel]``::

    I_n = sum |W[n, ...]|                        (importance of neuron / channel n)
    F_n = clip(2 * I_n / max_m I_m, lo, hi)      (default lo, hi = 1, 2: errors only grow)

"propagate" multiplies the error at the layer's output by ``F`` before it is used for the
layer's own gradient and sent to earlier layers (factors compound towards the input); "local"
scales only the layer's own parameter gradients. ``F`` is recomputed from the current weights
at every backward, under ``no_grad``.

Recurrent layers (``nn.RNNCell/GRUCell/LSTMCell`` and ``nn.RNN/GRU/LSTM``, per layer and direction):
a neuron is a hidden unit ``n``; its importance sums its incoming input and recurrent weights over
all its gates (``I_n = sum_g sum |W_ih[g H + n]| + sum |W_hh[g H + n]|``), and its gates share ``F_n``.
"propagate" scales the error at the unit's hidden output ``h_t`` at every time step (so it
compounds through time as through depth; an LSTM's cell state is not scaled), "local" scales the
rows of ``weight_ih``, ``weight_hh`` and the biases that belong to the unit. While a propagate
handle is attached, ``nn.RNN/GRU/LSTM`` run a step loop over their own parameters instead of the
fused kernel (removed with the handle).

GRAPES is patented by IBM (US 12,020,162 B2): check the licensing before commercial use.
"""

from __future__ import annotations

import contextlib
import math
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from apical.dendrites.layer import DendriticLayer
from apical.dendrites.recurrent import DendriticRecurrentCell
from apical.dendrites.selection import _OPAQUE_PARENTS

MODES = ("propagate", "local")
IMPORTANCES = ("incoming",)
OUTPUT_LAYER = "output layer"

_PLAIN_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CELL_TYPES: tuple[type[nn.Module], ...] = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)
#: exact types only: apical's DendriticRNN/GRU/LSTM (and other subclasses with code of their own) are left out
_RNN_TYPES: tuple[type[nn.Module], ...] = (nn.RNN, nn.GRU, nn.LSTM)

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
        return _normalise(imp, clip)


def recurrent_factors(weight_ih: Tensor, weight_hh: Tensor, clip: tuple[float, float] | None = (1.0, 2.0)) -> Tensor:
    """Per hidden unit factors ``[H]`` of one recurrent layer (and direction): ``I_n`` sums ``|W_ih|``
    and ``|W_hh|`` over the rows of all the unit's gates (rows ``g * H + n``, ``G = rows / H`` gates),
    then ``F = clip(2 * I / max(I), lo, hi)``; the gates of a unit share its factor."""
    with torch.no_grad():
        hidden = weight_hh.shape[1]
        dtype = torch.promote_types(weight_hh.dtype, torch.float32)
        rows = weight_ih.detach().abs().sum(1, dtype=dtype) + weight_hh.detach().abs().sum(1, dtype=dtype)
        return _normalise(rows.view(-1, hidden).sum(0), clip)


def _normalise(imp: Tensor, clip: tuple[float, float] | None) -> Tensor:
    top = imp.max()
    ratio = torch.where(top > 0, imp / top.clamp_min(torch.finfo(imp.dtype).tiny), torch.ones_like(imp))
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
    suffix: str | None = None  # recurrent: "" for a cell, "_l0", "_l0_reverse", ... for nn.RNN/GRU/LSTM
    gates: int = 1  # rows per hidden unit in a recurrent weight (1 RNN, 3 GRU, 4 LSTM)

    @property
    def weight_owner(self) -> nn.Module:
        return self.module.base if isinstance(self.module, DendriticLayer) else self.module

    def recurrent_weights(self) -> tuple[Tensor, Tensor]:
        return getattr(self.module, f"weight_ih{self.suffix}"), getattr(self.module, f"weight_hh{self.suffix}")

    def local_params(self) -> Iterator[tuple[str, Tensor, int]]:
        """(key, parameter, neuron axis) of the layer's own per-neuron parameters."""
        if self.suffix is not None:
            for attr in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = getattr(self.module, attr + self.suffix, None)
                if isinstance(p, Tensor):
                    yield attr, p, 0
            return
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
        self._stepped: list[nn.Module] = []  # nn.RNN/GRU/LSTM given a step-loop forward (propagate)
        for t in targets:
            self._hooks.append(t.module.register_forward_hook(self._forward_hook(t)))
            if mode == "local":
                self._sync_param_hooks(t)
        if mode == "propagate":
            for m in {id(t.module): t.module for t in targets if t.suffix}.values():
                by_suffix = {t.suffix: t for t in targets if t.module is m}
                m.forward = types.MethodType(self._stepwise_forward(by_suffix), m)
                self._stepped.append(m)

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
        for m in self._stepped:
            m.__dict__.pop("forward", None)  # the class's forward (the fused kernel) again
        self._stepped.clear()
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
        if t.suffix is not None:
            return recurrent_factors(*t.recurrent_weights(), self.clip)
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
                return
            if t.suffix:
                return  # nn.RNN/GRU/LSTM: the step loop hooked every step's hidden state
            if isinstance(out, tuple):  # LSTMCell: (h, c); the unit's output is h
                out = out[0]
            if isinstance(out, Tensor) and out.requires_grad and torch.is_grad_enabled():
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

    def _stepwise_forward(self, targets: dict[str, _Target]):
        def forward(module: nn.RNNBase, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):
            def on_step(suffix: str, h: Tensor) -> None:
                if suffix in targets and h.requires_grad and torch.is_grad_enabled():
                    h.register_hook(self._output_hook(targets[suffix]))

            return _rnn_step_loop(module, input, hx, on_step)

        return forward

    def _param_hook(self, t: _Target, axis: int):
        def hook(grad: Tensor) -> Tensor | None:
            if not self._active():
                return None
            f = self._factor(t).to(grad.dtype)
            if t.gates > 1:
                f = f.repeat(t.gates)  # rows are gate-major: [gate 0 units, gate 1 units, ...]
            shape = [1] * grad.dim()
            shape[axis] = -1
            return grad * f.view(shape)

        return hook


def _cell_step(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step of PyTorch's recurrent cells from the input and hidden projections ``gi``, ``gh``."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, i_n = gi.chunk(3, -1)
        hr, hz, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    return (torch.tanh(gi + gh) if mode == "RNN_TANH" else torch.relu(gi + gh)), None


def _rnn_step_loop(module: nn.RNNBase, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None, on_step) -> tuple:
    """``nn.RNN/GRU/LSTM.forward`` as a loop over time steps with the module's own parameters, calling
    ``on_step(suffix, h)`` on every step's hidden state (one matmul per step for the recurrent part; the
    input projection of all steps is one matmul). Dropout between layers as in PyTorch (its own draw)."""
    if isinstance(input, PackedSequence):
        raise ValueError("grapes(mode='propagate') on nn.RNN/GRU/LSTM needs a padded tensor, not a PackedSequence; "
                         "pad it or use mode='local'")
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if module.batch_first else input)
    lstm = module.mode == "LSTM"
    dirs = 2 if module.bidirectional else 1
    if hx is None:
        h0 = x.new_zeros(module.num_layers * dirs, x.shape[1], module.hidden_size)
        c0 = h0
    else:
        h0, c0 = hx if lstm else (hx, None)
        if unbatched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if lstm else None)
    steps = x.shape[0]
    h_last, c_last = [], []
    layer_in = x
    for k in range(module.num_layers):
        outs = []
        for d in range(dirs):
            suffix = f"_l{k}{'_reverse' if d else ''}"
            bias = [getattr(module, f"{b}{suffix}") if module.bias else None for b in ("bias_ih", "bias_hh")]
            gi_all = F.linear(layer_in, getattr(module, f"weight_ih{suffix}"), bias[0])
            w_hh = getattr(module, f"weight_hh{suffix}")
            h, c = h0[k * dirs + d], (c0[k * dirs + d] if lstm else None)
            seq: list[Tensor] = [h] * steps
            for t in (range(steps - 1, -1, -1) if d else range(steps)):
                h, c = _cell_step(module.mode, gi_all[t], F.linear(h, w_hh, bias[1]), h, c)
                on_step(suffix, h)
                seq[t] = h
            outs.append(torch.stack(seq))
            h_last.append(h)
            c_last.append(c)
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if module.dropout and module.training and k < module.num_layers - 1:
            layer_in = F.dropout(layer_in, module.dropout, training=True)
    h_n = torch.stack(h_last)
    c_n = torch.stack(c_last) if lstm else None
    if unbatched:
        layer_in, h_n = layer_in.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if lstm else None
    elif module.batch_first:
        layer_in = layer_in.transpose(0, 1)
    return layer_in, ((h_n, c_n) if lstm else h_n)


def _matches(name: str, module: nn.Module, selector: str | type) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return name == selector or re.fullmatch(selector, name) is not None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modulable layers in ``named_modules`` order: dendritic layers (never their ``.base``),
    plain Linear / ConvNd modules outside modules that read their weights directly, recurrent cells
    and ``nn.RNN/GRU/LSTM`` (exact types); apical's dendritic recurrent wrappers are left out."""
    modules = list(model.named_modules())
    bases = {id(m.base) for _, m in modules if isinstance(m, DendriticLayer)}
    opaque = {id(c) for _, m in modules if isinstance(m, _OPAQUE_PARENTS) for c in m.children()}
    found = []
    for name, m in modules:
        if isinstance(m, DendriticRecurrentCell):
            continue  # apical's dendritic recurrent cells (and DendriticRNN/GRU/LSTM's) are not modulated
        plain = isinstance(m, _PLAIN_TYPES + _CELL_TYPES) or type(m) in _RNN_TYPES
        if (isinstance(m, DendriticLayer) and id(m) not in opaque) or (
            plain and id(m) not in bases and id(m) not in opaque
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
                f"{what}: {sel!r} matches no Linear/Conv/recurrent/dendritic layer of the model; "
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


def _recurrent_targets(name: str, m: nn.Module, mode: str) -> list[_Target]:
    """One target per layer and direction of an nn.RNN/GRU/LSTM (named ``"rnn:l0"``,
    ``"rnn:l0_reverse"``, ...), one for a cell (its own name)."""
    if getattr(m, "proj_size", 0):
        raise ValueError(f"layer {name!r}: an LSTM with proj_size > 0 is not supported; pass exclude=[{name!r}]")
    if isinstance(m, _CELL_TYPES):
        suffixes = [("", name)]
    else:
        dirs = ("", "_reverse") if m.bidirectional else ("",)
        suffixes = [(f"_l{k}{r}", f"{name}:l{k}{r}" if name else f"l{k}{r}")
                    for k in range(m.num_layers) for r in dirs]
    out = []
    for suffix, tname in suffixes:
        t = _Target(tname, m, 0, suffix=suffix)
        w_ih, w_hh = t.recurrent_weights()
        if mode == "local" and not (isinstance(w_ih, nn.Parameter) and isinstance(w_hh, nn.Parameter)):
            raise ValueError(f"layer {name!r}: its weights are computed on access, so mode='local' cannot hook "
                             "their gradients; use mode='propagate'")
        if mode == "propagate" and isinstance(m, _RNN_TYPES) and "forward" in m.__dict__:
            raise ValueError(f"layer {name!r} already has a forward of its own (patched); GRAPES' propagate mode "
                             "replaces it while attached: use mode='local' or remove the patch")
        t.gates = w_hh.shape[0] // w_hh.shape[1]
        out.append(t)
    return out


def grapes(
    model: nn.Module,
    mode: str = "propagate",
    clip: tuple[float, float] | None = (1.0, 2.0),
    importance: str = "incoming",
    exclude: Sequence[str | type[nn.Module]] = (OUTPUT_LAYER,),
    layers: Sequence[str | type[nn.Module]] | None = None,
    during_dendrite_phase: bool = False,
) -> GrapesHandle:
    """Attach GRAPES error modulation to ``model``'s Linear / ConvNd / recurrent / dendritic layers.

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

    Recurrent layers (``nn.RNNCell/GRUCell/LSTMCell``, ``nn.RNN/GRU/LSTM``): see the module docstring;
    ``factors()`` has one entry per cell, or per layer and direction (``"name:l0"``, ``"name:l0_reverse"``).
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
        raise ValueError("the model has no nn.Linear / nn.Conv1d/2d/3d / recurrent / dendritic layer to modulate")
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
        if isinstance(m, _CELL_TYPES + _RNN_TYPES):
            targets.extend(_recurrent_targets(name, m, mode))
            continue
        owner = m.base if isinstance(m, DendriticLayer) else m
        if mode == "local" and not isinstance(owner.weight, nn.Parameter):
            raise ValueError(
                f"layer {name!r}: its weight is computed on access (e.g. a parametrization), so "
                "mode='local' cannot hook its gradient; use mode='propagate'"
            )
        spatial = len(owner.kernel_size) if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else 0
        targets.append(_Target(name, m, spatial))
    return GrapesHandle(model, targets, mode, clip, importance, during_dendrite_phase)
