"""Export a model with dendrites as a plain PyTorch module for inference.

:func:`export` returns a deep copy of the model in which every dendritic layer is replaced by a
fused module that evaluates the wrapped layer and all of its installed dendrite sets with ONE
matrix multiplication or convolution over their concatenated weights (the layer's ``O``
outputs and the ``D * O`` dendrite pre-activations in a single op), followed by the cheap
per-channel part: the cascade between a neuron's own dendrites and the ``v``-weighted sum::

    y = W_all x + b_all                          # [base; set 1; ...; set D], one op
    a_k = f(y_k + sum_{e<k} u[k, e] * a_e)       # per channel, k = 1..D
    z = y_0 + sum_k v[k] * a_k

A layer without installed dendrites becomes its wrapped module again. In eager inference
(autograd off, not tracing / compiling / exporting) the per-channel part works in place on the
fused output, with no temporaries; otherwise it is functional, so graph capture and
backpropagation see ordinary out-of-place operations.

What the export drops: everything used only to train or grow dendrites. Candidate dendrites
(of a dendrite phase in progress) and their correlation statistics, the per-layer training
flags and counters (perforation, phase, forward counts), and every forward / backward hook
registered on the model's modules, the :class:`~apical.Controller`'s included (the hooks that
``torch.nn.utils.weight_norm`` / ``spectral_norm`` need to compute a weight are kept). The
result holds no reference to the original model, its controller or its optimiser; it is
returned in eval mode, and contains only standard ``torch.nn`` modules and the two fused
modules below, which use only ``torch`` operations with shapes fixed at export time, so it can
be run under ``torch.compile(fullgraph=True)``, traced with ``torch.jit.trace`` and exported
with ``torch.onnx.export``. One exception: an ``nn.MultiheadAttention`` that carried dendrites
stays a :class:`~apical.dendrites.attention.DendriticMultiheadAttention` (its projections fused
as above; one without installed sets reads the attention's own weights), whose forward is
apical's re-statement of the attention's; graph capture of it is not tested yet. Likewise a
recurrent layer or cell with installed dendrites stays apical's (its step loop with the installed
sets, candidates dropped); one without becomes the plain ``nn.GRU`` (etc.) with its fused kernel.

Gradient flow is not preserved: a fused layer's parameters are ordinary trainable Parameters, so
fine-tuning the export trains the dendrites' input weights like the base weights (no
perforation). Export again from the dendritic model to continue Perforated Backpropagation.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from apical.dendrites.attention import DendriticProjection
from apical.dendrites.layer import ACTIVATION_FNS, DendriticConv, DendriticLayer, DendriticLinear
from apical.dendrites.recurrent import DendriticRecurrentCell, _CellWeights, _DendriticRecurrent

__all__ = ["FusedDendriticConv", "FusedDendriticLinear", "export", "fuse_layer"]

_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# hook dictionaries of nn.Module; the *_with_kwargs / *_always_called ones are keyed like the
# hooks they qualify and are filtered alongside them
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_KEPT_HOOK_TYPES = (WeightNorm, SpectralNorm)
_IN_PLACE = {"sigmoid": torch.sigmoid_, "tanh": torch.tanh_, "relu": torch.relu_}


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())


def _eager_inference() -> bool:
    """True in plain eager inference (no autograd, no tracing, compiling or ONNX export): the
    fused modules may then work in place; graph capture always sees the functional form."""
    return not (
        torch.is_grad_enabled()
        or torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or _compiling()
    )


class _FusedDendrites(nn.Module):
    """Shared per-channel part of the fused modules: the cascade and the v-weighted sum.

    ``dendrite_out`` (v, ``[D, *chan]``) and ``dendrite_cascade`` (u, ``[D, D, *chan]``, only
    ``u[k, e]`` with ``e < k`` is read) are stored already shaped to broadcast against one
    dendrite's slice of the fused output.
    """

    activation: str
    dendrites: int
    cascaded: bool

    def _init_dendrites(self, layer: DendriticLayer, chan: tuple[int, ...]) -> None:
        d = layer.num_dendrites
        self.activation = layer.activation
        self.dendrites = d
        v = layer.dendrite_out.detach().reshape(d, *chan)
        u = layer.dendrite_cascade.detach().reshape(d, d, *chan)
        lower = torch.tril(torch.ones(d, d, dtype=torch.bool, device=u.device), -1)
        u = u * lower.reshape(d, d, *([1] * len(chan)))  # only e < k is ever read
        # a cascade of all zeros is skipped (static, decided at export time)
        self.cascaded = bool(u.ne(0).any())
        self.dendrite_out = nn.Parameter(v.clone())
        self.dendrite_cascade = nn.Parameter(u.clone())

    def _combine(self, y: Tensor, axis: int) -> Tensor:
        """``z + sum_k v_k a_k`` from the fused output ``y``, whose ``axis`` indexes the
        wrapped layer's part (0) and the dendrite sets' pre-activations (1..D)."""
        if _eager_inference():
            return self._combine_in_place(y, axis)
        act = ACTIVATION_FNS[self.activation]
        v, u = self.dendrite_out, self.dendrite_cascade
        slices = y.unbind(axis)
        z = slices[0]
        outs: list[Tensor] = []
        for k in range(self.dendrites):
            h = slices[k + 1]
            if self.cascaded:
                for e in range(k):
                    h = torch.addcmul(h, u[k, e], outs[e])
            a = act(h)
            outs.append(a)
            z = torch.addcmul(z, v[k], a)
        return z

    def _combine_in_place(self, y: Tensor, axis: int) -> Tensor:
        """The same without autograd: the cascade and the activations overwrite ``y``'s dendrite
        slices (no temporaries), and the sum is accumulated into one new tensor."""
        act_ = _IN_PLACE[self.activation]
        v, u = self.dendrite_out, self.dendrite_cascade
        z = y.select(axis, 0)
        for k in range(self.dendrites):
            h = y.select(axis, k + 1)
            if self.cascaded:
                for e in range(k):
                    h.addcmul_(u[k, e], y.select(axis, e + 1))
            act_(h)
            z = torch.addcmul(z, v[k], h) if k == 0 else z.addcmul_(v[k], h)
        return z

    def extra_repr(self) -> str:
        return f"dendrites={self.dendrites}, activation={self.activation}, cascaded={self.cascaded}"


class FusedDendriticLinear(_FusedDendrites):
    """A Linear layer with ``D`` dendrite sets, evaluated as one ``(1 + D) * O``-output Linear.

    ``self.linear`` holds the concatenated weights: rows ``[0, O)`` are the wrapped layer's,
    rows ``[(k + 1) * O, (k + 2) * O)`` dendrite set ``k``'s. Inputs ``[..., in_features]``.
    """

    def __init__(self, layer: DendriticLinear) -> None:
        super().__init__()
        o = layer.out_channels
        self.out_features = o
        self.rank = layer.rank
        if layer.rank is None:
            weight = torch.cat([layer.neuron_weight().detach()[None], layer.dendrite_weight.detach()])
            bias = torch.cat([_base_bias(layer)[None], layer.dendrite_bias.detach()])
        else:  # the wrapped layer's rows, then each set's r projection rows; the sets' biases go with the mix
            proj = layer.dendrite_proj.detach()
            weight = torch.cat([layer.neuron_weight().detach(), proj.reshape(-1, proj.shape[-1])])
            bias = torch.cat([_base_bias(layer), proj.new_zeros(proj.shape[0] * proj.shape[1])])
            self.mix = nn.Parameter(layer.dendrite_weight.detach().clone())  # [D, O, r]
            self.mix_bias = nn.Parameter(layer.dendrite_bias.detach().clone())  # [D, O]
        weight = weight.reshape(-1, weight.shape[-1])
        f = {"device": weight.device, "dtype": weight.dtype}
        self.linear = nn.Linear(weight.shape[-1], weight.shape[0], **f)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias.reshape(-1))
        self._init_dendrites(layer, (o,))

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        if self.rank is None:
            y = y.unflatten(-1, (1 + self.dendrites, self.out_features))
        else:  # low-rank sets: each neuron mixes its sets' projected features
            o = self.out_features
            proj = y[..., o:].unflatten(-1, (self.dendrites, self.rank))
            pre = torch.einsum("...kr,kor->...ko", proj, self.mix) + self.mix_bias
            y = torch.cat([y[..., :o].unsqueeze(-2), pre], -2)
        return self._combine(y, y.dim() - 2)


class FusedDendriticConv(_FusedDendrites):
    """A ConvNd layer with ``D`` dendrite sets, evaluated as one ``(1 + D) * O``-channel ConvNd.

    A convolution with ``g`` groups assigns its output channels to groups in contiguous
    blocks, so the concatenated channels are interleaved per group: group ``i``'s block holds
    the wrapped layer's ``O / g`` channels of that group, then each dendrite set's.
    """

    def __init__(self, layer: DendriticConv) -> None:
        super().__init__()
        base = layer.base
        o, d, g = layer.out_channels, layer.num_dendrites, layer.groups
        self.out_channels, self.groups, self.spatial = o, g, layer.spatial
        self.rank = layer.rank
        if layer.rank is None:
            weight = torch.cat([base.weight.detach()[None], layer.dendrite_weight.detach()])  # [1+D, O, *w]
            bias = torch.cat([_base_bias(layer)[None], layer.dendrite_bias.detach()])  # [1+D, O]
            weight = weight.unflatten(1, (g, o // g)).transpose(0, 1).reshape((1 + d) * o, *weight.shape[2:])
            bias = bias.unflatten(1, (g, o // g)).transpose(0, 1).reshape((1 + d) * o)
        else:  # per group: its O/g channels of the wrapped layer, then each set's r projection channels
            r, tail = layer.rank, base.weight.shape[1:]
            proj = layer.dendrite_proj.detach().unflatten(1, (g, r)).transpose(0, 1).reshape(g, d * r, *tail)
            weight = torch.cat([base.weight.detach().unflatten(0, (g, o // g)), proj], 1).flatten(0, 1)
            bias = torch.cat([_base_bias(layer).unflatten(0, (g, o // g)), proj.new_zeros(g, d * r)], 1).flatten()
            # [D, g, O/g, r] and [D, g, O/g]: a neuron reads its group's features
            self.mix = nn.Parameter(layer.dendrite_weight.detach().unflatten(1, (g, o // g)).clone())
            self.mix_bias = nn.Parameter(layer.dendrite_bias.detach().unflatten(1, (g, o // g)).clone())
        f = {"device": weight.device, "dtype": weight.dtype}
        self.conv = _CONV_TYPES[layer.spatial](
            base.in_channels, weight.shape[0], base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, groups=g, bias=True, padding_mode=base.padding_mode, **f,
        )
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias)
        # per-channel values broadcast against one set's slice [N, g, O/g, *spatial]
        self._init_dendrites(layer, (g, o // g, *([1] * layer.spatial)))

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == self.spatial + 1
        if unbatched:
            x = x.unsqueeze(0)
        y = self.conv(x)
        n, sp = y.shape[0], y.shape[2:]
        g, per = self.groups, self.out_channels // self.groups
        if self.rank is None:
            # [N, g * (1+D) * O/g, *sp] -> [N, g, 1+D, O/g, *sp]: a view, no copy
            y = y.unflatten(1, (g, 1 + self.dendrites, per))
        else:  # [N, g, O/g + D * r, *sp]; each neuron mixes its sets' projected features
            y = y.unflatten(1, (g, per + self.dendrites * self.rank))
            proj = y[:, :, per:].unflatten(2, (self.dendrites, self.rank))  # [N, g, D, r, *sp]
            pre = torch.einsum("ngkr...,kgor->ngko...", proj, self.mix)
            pre = pre + self.mix_bias.transpose(0, 1).reshape(g, self.dendrites, per, *([1] * self.spatial))
            y = torch.cat([y[:, :, :per].unsqueeze(2), pre], 2)
        z = self._combine(y, 2)  # [N, g, O/g, *sp]
        z = z.reshape(n, self.out_channels, *sp)
        return z.squeeze(0) if unbatched else z


def _base_bias(layer: DendriticLayer) -> Tensor:
    w, b = layer.neuron_weight(), layer.bias
    if b is None:
        return torch.zeros(layer.out_channels, device=w.device, dtype=w.dtype)
    return b.detach()


def fuse_layer(layer: DendriticLayer) -> nn.Module:
    """The inference module for one dendritic layer: its fused form, or a copy of its wrapped
    module when it has no installed dendrites (candidates are ignored)."""
    if layer.num_dendrites == 0:
        return _plain_copy(layer.base).eval()
    if isinstance(layer, DendriticRecurrentCell):  # the step with its installed sets: no fused form
        dup = copy.deepcopy(layer)
        dup.drop_candidates()
        return dup.eval()
    if isinstance(layer, DendriticLinear):
        fused: nn.Module = FusedDendriticLinear(layer)
    elif isinstance(layer, DendriticConv):
        fused = FusedDendriticConv(layer)
    else:
        raise TypeError(f"apical.export: no fused form for {type(layer).__name__}")
    return fused.eval()


def _kept_hooks(module: nn.Module) -> dict[str, OrderedDict]:
    """Each hook dict of ``module`` filtered to the hooks that survive the export."""
    keep: set = set()
    for name in ("_forward_pre_hooks", "_forward_hooks"):
        for key, hook in getattr(module, name, {}).items():
            if isinstance(hook, _KEPT_HOOK_TYPES):
                keep.add(key)
    out = {}
    for name in _HOOK_DICTS:
        hooks = getattr(module, name, None)
        if hooks is not None:
            out[name] = OrderedDict((k, h) for k, h in hooks.items() if k in keep)
    return out


def _plain_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` with dendritic layers fused and hooks filtered.

    The memo is pre-seeded: each dendritic layer is "copied" as its fused module and each hook
    dict as its filtered version, so neither candidates nor a controller (reachable through
    its bound-method hook) are ever copied.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, DendriticProjection) and module.num_dendrites == 0:
            memo[id(module)] = None  # the attention computes the projection from its own weights
            continue
        if isinstance(module, DendriticRecurrentCell) and isinstance(module.base, _CellWeights):
            continue  # one layer and direction of an nn.RNN/GRU/LSTM: copied with it, tidied below
        if isinstance(module, DendriticLayer):
            memo[id(module)] = fuse_layer(module)
            continue
        for name, hooks in _kept_hooks(module).items():
            memo[id(getattr(module, name))] = hooks
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            # weight_norm / spectral_norm leave the weight they computed on the module: not a
            # graph leaf, so it cannot be deep-copied; the kept hook recomputes it anyway
            computed = getattr(module, hook.name, None) if isinstance(hook, _KEPT_HOOK_TYPES) else None
            if isinstance(computed, Tensor) and not computed.is_leaf:
                memo[id(computed)] = computed.detach().clone()
    dup = copy.deepcopy(model, memo)
    for module in list(dup.modules()):
        if isinstance(module, _DendriticRecurrent):
            for cell in module.cells():
                cell.drop_candidates()
            if not any(cell.num_dendrites for cell in module.cells()):
                module.unwrapped()  # back to the plain module and its fused kernel
    return dup


def export(model: nn.Module) -> nn.Module:
    """A plain PyTorch copy of ``model`` for inference, with every dendritic layer fused.

    Each :class:`~apical.DendriticLinear` / :class:`~apical.DendriticConv` with installed
    dendrites becomes a :class:`FusedDendriticLinear` / :class:`FusedDendriticConv` (one
    matmul or convolution for the wrapped layer and all its dendrites, then the per-channel
    cascade and v-weighted sum); one without becomes its wrapped module. Candidates, training
    state and hooks are dropped (see the module docstring). The original model is not changed;
    the copy shares no tensor with it and is returned in eval mode. Its outputs equal the
    original's in eval mode up to floating-point rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apical.export expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DendriticLayer):
        return fuse_layer(model)
    return _plain_copy(model).eval()
