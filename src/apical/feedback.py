"""Feedback alignment: training without transporting weights backwards.

* ``"fa"`` (Lillicrap et al., Nature Communications 2016): the error reaches a layer's input through
  a fixed random matrix ``B`` of the weight's shape instead of through ``W`` itself
  (``dL/dx = dL/dz @ B`` for a Linear layer, a transposed convolution with ``B`` for a ConvNd); the
  layer's own parameter gradients are unchanged (error times input).
* ``"dfa"`` (Nøkland, NeurIPS 2016): the error at the input of every modulated layer but the first
  is a fixed random projection ``B_l e`` of the output layer's error ``e = dL/dz_out`` (the network's
  last modulated layer; per sample, flattened), instead of the error backpropagated from above.
  It then passes through the activation (and pooling) in between as usual, so a hidden layer's
  error is ``f'(z_l) * B_l e``.
  This assumes a chain: each modulated layer's input is computed from the previous one's output.

:func:`feedback_alignment` returns a handle that removes everything it installed (the modules get
their own ``forward`` back; no hook, buffer or attribute is left). The feedback matrices are drawn
from ``seed`` (normal, standard deviation ``1 / sqrt(fan-in of the path)``; fa's when attached,
dfa's at the first backward, top layer first) and kept on the handle, not in the model's
``state_dict``. GRAPES (:func:`apical.grapes.grapes`) can be attached on top, as in the GRAPES
paper's FA/DFA experiments.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeedbackHandle", "feedback_alignment"]

MODES = ("fa", "dfa")
_CONV_GRADS = {1: (torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
               2: (torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight),
               3: (torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight)}


class _FeedbackLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; backward sends ``g @ feedback`` to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, feedback = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = (g @ feedback) if ctx.needs_input_grad[0] else None
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _FeedbackConv(torch.autograd.Function):
    """A ConvNd (zero padding); backward sends the transposed convolution with ``feedback`` to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor, module: nn.Module) -> Tensor:
        ctx.save_for_backward(x, weight, feedback)
        ctx.module, ctx.has_bias = module, bias is not None
        return module._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, feedback = ctx.saved_tensors
        m = ctx.module
        grad_input, grad_weight = _CONV_GRADS[len(m.kernel_size)]
        args = (m.stride, m.padding, m.dilation, m.groups)
        grad_x = grad_input(x.shape, feedback, g, *args) if ctx.needs_input_grad[0] else None
        grad_w = grad_weight(x, weight.shape, g, *args) if ctx.needs_input_grad[1] else None
        grad_b = g.sum([d for d in range(g.dim()) if d != 1]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def _fa_forward(module: nn.Module, feedback: Tensor):
    if isinstance(module, nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return _FeedbackLinear.apply(x, self.weight, self.bias, feedback)
    else:
        def forward(self, x: Tensor) -> Tensor:
            return _FeedbackConv.apply(x, self.weight, self.bias, feedback, self)
    return types.MethodType(forward, module)


class FeedbackHandle:
    """What :func:`feedback_alignment` returns: the modulated layers, their feedback matrices, and
    ``remove()`` (also on leaving a ``with`` block)."""

    def __init__(self, model: nn.Module, mode: str, targets: list[tuple[str, nn.Module]], seed: int) -> None:
        self.mode = mode
        self._targets = targets
        self._generator = torch.Generator().manual_seed(seed)
        self.feedback: dict[str, Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        self._error: Tensor | None = None
        self._removed = False
        if mode == "fa":
            for name, module in targets:
                w = module.weight
                fan_in = w[0].numel()
                b = torch.randn(w.shape, generator=self._generator) / math.sqrt(fan_in)
                self.feedback[name] = b.to(w.device, w.dtype)
                module.forward = _fa_forward(module, self.feedback[name])
        else:
            out_name, out_module = targets[-1]
            self._hooks.append(out_module.register_forward_hook(self._capture_error))
            for name, module in targets[1:]:
                self._hooks.append(module.register_forward_pre_hook(self._direct_error(name)))

    @property
    def layers(self) -> list[str]:
        return [name for name, _ in self._targets]

    @property
    def removed(self) -> bool:
        return self._removed

    # ------------------------------------------------------------------ dfa
    def _capture_error(self, module: nn.Module, args, output: Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            def keep(g: Tensor) -> None:
                self._error = g.detach()

            output.register_hook(keep)

    def _direct_error(self, name: str):
        def pre_hook(module: nn.Module, args) -> None:
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad):
                return

            def direct(g: Tensor) -> Tensor:
                e = self._error
                if e is None:
                    raise RuntimeError("apical.feedback_alignment(dfa): the output layer's error was not seen "
                                       "before this layer's; is the last modulated layer the output layer?")
                e = e.reshape(e.shape[0], -1)
                if name not in self.feedback:  # [per-sample input size, per-sample error size], drawn once
                    b = torch.randn(g[0].numel(), e.shape[1], generator=self._generator) / math.sqrt(e.shape[1])
                    self.feedback[name] = b.to(g.device, g.dtype)
                return (e @ self.feedback[name].t()).reshape(g.shape).to(g.dtype)

            x.register_hook(direct)

        return pre_hook

    # ------------------------------------------------------------------ removal
    def remove(self) -> None:
        """Give every module its own forward back and detach every hook (idempotent)."""
        if self._removed:
            return
        for _, module in self._targets:
            if "forward" in module.__dict__:
                del module.forward
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._error = None
        self._removed = True

    def __enter__(self) -> FeedbackHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeedbackHandle(mode={self.mode!r}, layers={self.layers}, {'removed' if self._removed else 'attached'})"


def feedback_alignment(model: nn.Module, mode: str = "fa", seed: int = 0,
                       layers: Sequence[str] | None = None) -> FeedbackHandle:
    """Train ``model``'s Linear / ConvNd layers with feedback alignment (``"fa"``) or direct feedback
    alignment (``"dfa"``); see the module docstring. ``layers``: names from ``named_modules()``
    (default: every Linear and ConvNd, in order; for dfa the last one is the output layer)."""
    if mode not in MODES:
        raise ValueError(f"feedback_alignment: mode must be one of {MODES}, got {mode!r}")
    names = dict(model.named_modules())
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if layers is None:
        targets = [(n, m) for n, m in names.items() if isinstance(m, kinds)]
    else:
        missing = [n for n in layers if n not in names]
        if missing:
            raise ValueError(f"feedback_alignment: no module named {missing}; names look like {list(names)[1:6]}")
        targets = [(n, names[n]) for n in layers]
    for n, m in targets:
        if not isinstance(m, kinds):
            raise TypeError(f"feedback_alignment: {n!r} is a {type(m).__name__}, not a Linear or ConvNd")
        if "forward" in m.__dict__:
            raise ValueError(f"feedback_alignment: {n!r} already has a forward of its own (feedback alignment "
                             "attached twice?); remove the first handle")
        if not isinstance(m, nn.Linear) and m.padding_mode != "zeros":
            raise ValueError(f"feedback_alignment: {n!r} pads with {m.padding_mode!r}; only zero padding is supported")
    if not targets or (mode == "dfa" and len(targets) < 2):
        raise ValueError(f"feedback_alignment({mode}): the model needs {'two' if mode == 'dfa' else 'one'} or more "
                         "Linear / ConvNd layers")
    return FeedbackHandle(model, mode, targets, seed)
