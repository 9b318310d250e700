"""Dendrites on ``nn.MultiheadAttention``: its q, k, v projection neurons and ``out_proj``.

The attention module reads its projection weights itself (the packed ``in_proj_weight``, or
``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``), so its children cannot simply be
wrapped. :func:`apical.perforate` keeps the module object in place (the same object, the same
Parameter objects, every attribute such as ``batch_first``) and turns it into a
:class:`DendriticMultiheadAttention` (a subclass, so ``isinstance(m, nn.MultiheadAttention)``
still holds) with four dendritic layers as children:

* ``q_proj``, ``k_proj``, ``v_proj``: :class:`DendriticProjection` layers over a view of the
  attention's own projection weight and bias (``E`` neurons each);
* ``out_proj``: a :class:`~apical.DendriticLinear` around the original ``out_proj``.

Its forward computes the same function as ``nn.MultiheadAttention.forward`` (masks,
``batch_first``, ``need_weights``, ``average_attn_weights``, ``is_causal``, ``bias_k`` /
``bias_v``, ``add_zero_attn``, dropout, unbatched inputs), with each projection evaluated by its
dendritic layer. :func:`apical.unwrap` turns it back into a plain ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apical.dendrites.layer import DendriticLinear

__all__ = ["DendriticMultiheadAttention", "DendriticProjection"]

_NAMES = ("q_proj", "k_proj", "v_proj")


class _Projection(nn.Module):
    """The q (0), k (1) or v (2) projection of an attention module, read from its Parameters.

    Holds no tensor of its own; the attention is referenced, not registered as a child (no
    cycle in ``named_modules``, nothing twice in ``state_dict``)."""

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_attention", attention)
        self.index = index

    @property
    def weight(self) -> Tensor:
        a = self._attention
        if a._qkv_same_embed_dim:
            e = a.embed_dim
            return a.in_proj_weight[self.index * e:(self.index + 1) * e]
        return (a.q_proj_weight, a.k_proj_weight, a.v_proj_weight)[self.index]

    @property
    def bias(self) -> Tensor | None:
        b = self._attention.in_proj_bias
        if b is None:
            return None
        e = self._attention.embed_dim
        return b[self.index * e:(self.index + 1) * e]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{_NAMES[self.index]} of the enclosing attention"


class DendriticProjection(DendriticLinear):
    """Dendrites on the neurons of one of an attention's q / k / v projections."""


def _unsupported_attention(mha: nn.Module) -> str | None:
    if type(mha) is not nn.MultiheadAttention:
        return (f"{type(mha).__name__} subclasses nn.MultiheadAttention with code of its own: "
                "register a layer class for it (apical.register_layer)")
    reason = DendriticLinear.unsupported(mha.out_proj)
    return None if reason is None else f"its out_proj: {reason}"


class DendriticMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with dendritic layers on its q, k, v and output projections.

    Made by :meth:`wrap` from an existing module (never constructed directly); see the module
    docstring."""

    q_proj: nn.Module | None
    k_proj: nn.Module | None
    v_proj: nn.Module | None

    # ------------------------------------------------------------------ registry protocol
    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        return _unsupported_attention(module)

    @classmethod
    def wrap(cls, module: nn.MultiheadAttention, activation: str = "sigmoid") -> nn.Module:
        reason = cls.unsupported(module)
        if reason is not None:
            raise ValueError(f"cannot wrap {type(module).__name__}: {reason}")
        out_proj = DendriticLinear(module.out_proj, activation=activation)
        projections = [DendriticProjection(_Projection(module, i), activation=activation) for i in range(3)]
        module.__class__ = cls  # the same object: every Parameter and attribute is kept
        for name, layer in zip(_NAMES, projections, strict=True):
            setattr(module, name, layer)
        module.out_proj = out_proj
        return module

    @classmethod
    def planned_layers(cls, module: nn.MultiheadAttention) -> dict[str, Tensor]:
        out = {name: _Projection(module, i).weight for i, name in enumerate(_NAMES)}
        out["out_proj"] = DendriticLinear.neuron_weight_of(module.out_proj)
        return out

    def unwrapped(self) -> nn.Module:
        for name in _NAMES:
            delattr(self, name)
        out_proj = self.out_proj
        self.out_proj = out_proj.base if isinstance(out_proj, DendriticLinear) else out_proj
        self.__class__ = nn.MultiheadAttention
        return self

    # ------------------------------------------------------------------ forward
    def _project(self, index: int, x: Tensor) -> Tensor:
        layer = getattr(self, _NAMES[index])
        if layer is None:  # an export without dendrites on this projection: the packed weight itself
            return _Projection(self, index)(x)
        return layer(x)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("apical's dendritic MultiheadAttention does not take nested tensors")
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype)
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
            check_other=False)
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"expected embedding dimension {self.embed_dim}, got {embed_dim}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False
        heads, head_dim = self.num_heads, self.head_dim

        q, k, v = self._project(0, query), self._project(1, key), self._project(2, value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, key.shape[0]):
                    raise RuntimeError(f"the 2D attn_mask has shape {tuple(attn_mask.shape)}, expected "
                                       f"{(tgt_len, key.shape[0])}")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() != 3:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
            elif attn_mask.shape != (bsz * heads, tgt_len, key.shape[0]):  # torch refuses what would broadcast
                raise RuntimeError(f"the 3D attn_mask has shape {tuple(attn_mask.shape)}, expected "
                                   f"{(bsz * heads, tgt_len, key.shape[0])}")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * heads, 1, head_dim, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise RuntimeError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                                   f"{(bsz, src_len)}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1,
                                                                                                src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.shape[0] == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q, k, v = (t.view(bsz, heads, t.shape[1], head_dim) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = None
            if not is_batched:
                out = out.squeeze(1)
        if self.batch_first and is_batched:
            out = out.transpose(0, 1)
        return out, weights
