"""Dendritic layers: a wrapped Linear or ConvNd plus stacks of dendrites per output neuron.

Layout. A layer with ``O`` neurons (output features / channels) holds ``D`` installed dendrite
sets and, during a dendrite phase, ``C`` candidate sets. Per-set tensors are stacked on a
leading axis: input weights ``[K, O, *w]`` (``*w`` = the wrapped weight's shape after its
output axis), biases ``[K, O]``. All K sets of a layer are evaluated by ONE matmul or
convolution over their concatenated weights; the result is viewed as a "stack" tensor with a
set axis just before the neuron axis: ``[..., K, O]`` for Linear, ``[N, K, O, *spatial]`` for
ConvNd. Only the per-channel cascade between a neuron's own dendrites is sequential.

    a_k = f(D_k(x) + sum_{e<k} u[k, e] * a_e)        z = M(x) + sum_k v[k] * a_k

Low-rank sets (``rank`` r, :meth:`DendriticLayer.set_rank`): ``D_k(x) = Q_k (P_k x) + b_k``, where
the projection ``P_k`` (``dendrite_proj`` ``[K, g * r, *w]``, ``g`` the convolution's groups) maps
the input to r features per group by the wrapped module's own op, and each neuron mixes its
group's r features with weights of its own (``dendrite_weight`` ``[K, O, r]``). The candidates of
a dendrite phase share one projection (``candidate_proj`` ``[1, g * r, *w]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apical.dendrites.correlation import CorrelationStats, correlation_tap

ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}


class DendriticLayer(nn.Module):
    """Base class of a wrapped module with dendrites. ``self.base`` is the original module.

    Subclasses say how a stack of K weight copies is applied to an input (``_stack_forward``)
    and where the set and neuron axes live (``_chan``).
    """

    #: axis of the set dimension in a stack tensor (negative for Linear, 1 for conv)
    set_axis: int = 1

    def __init__(self, base: nn.Module, activation: str = "sigmoid") -> None:
        reason = type(self).unsupported(base)
        if reason is not None:
            raise ValueError(f"cannot wrap {type(base).__name__}: {reason}")
        super().__init__()
        self.base = base
        weight = type(self).neuron_weight_of(base)
        self.out_channels = int(weight.shape[0])
        self.weight_tail = tuple(int(s) for s in weight.shape[1:])
        self.activation = activation
        self.perforated = True  # pb: dendrites read x.detach() and are frozen in the neuron phase
        self.normaliser = "error"
        self.centring = "batch"
        self.candidate_scale = 1.0  # candidates are stored divided by this: a learning-rate multiplier
        factory = {"device": weight.device, "dtype": weight.dtype}
        o = self.out_channels
        self.dendrite_weight = nn.Parameter(torch.empty(0, o, *self.weight_tail, **factory), False)
        self.dendrite_bias = nn.Parameter(torch.empty(0, o, **factory), False)
        self.dendrite_cascade = nn.Parameter(torch.empty(0, 0, o, **factory), False)
        # zero-size tensors never require grad: plain DistributedDataParallel would wait for their gradients
        self.dendrite_out = nn.Parameter(torch.empty(0, o, **factory), False)
        self.register_parameter("candidate_weight", None)
        self.register_parameter("candidate_bias", None)
        self.register_parameter("candidate_cascade", None)
        self.register_parameter("dendrite_proj", None)
        self.register_parameter("candidate_proj", None)
        self.rank: int | None = None
        self.stats: CorrelationStats | None = None

    # ------------------------------------------------------------------ the wrapped module
    @classmethod
    def neuron_weight_of(cls, base: nn.Module) -> Tensor:
        """``base``'s weight with the neuron axis first, ``[O, *tail]`` (a view, never a copy).

        The default reads ``base.weight`` as stored (``nn.Linear``, ``nn.ConvNd``); subclasses for
        modules that store their weight otherwise (e.g. ``[in, out]``) override this."""
        return base.weight

    @classmethod
    def unsupported(cls, base: nn.Module) -> str | None:
        """Why ``base`` cannot be wrapped by this class right now, or None."""
        weight = getattr(base, "weight", None)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            return "it is a lazy layer that has not been initialised yet: run one forward pass through the model first"
        if not isinstance(weight, Tensor):
            return "it has no weight tensor"
        return None

    @classmethod
    def wrap(cls, base: nn.Module, activation: str = "sigmoid") -> nn.Module:
        """The module that replaces ``base`` in its parent (registry protocol)."""
        return cls(base, activation=activation)

    @classmethod
    def planned_layers(cls, base: nn.Module) -> dict[str, Tensor]:
        """The dendritic layers :meth:`wrap` creates, by name relative to ``base`` ("": the
        replacement itself), each with its neuron-major weight (registry protocol)."""
        return {"": cls.neuron_weight_of(base)}

    def unwrapped(self) -> nn.Module:
        """The module to put back in place of this one (:func:`apical.unwrap`)."""
        return self.base

    def neuron_weight(self) -> Tensor:
        """The wrapped weight, neuron axis first: ``[O, *tail]``."""
        return type(self).neuron_weight_of(self.base)

    # code that reads (or ties) the wrapped module's weight keeps working on the wrapper
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias") and "base" in self._modules:
            setattr(self.base, name, value)  # e.g. weight tying by another library
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ structure
    @property
    def num_dendrites(self) -> int:
        """Installed dendrite sets."""
        return int(self.dendrite_weight.shape[0])

    @property
    def num_candidates(self) -> int:
        """Candidate sets being trained (0 outside a dendrite phase)."""
        return 0 if self.candidate_weight is None else int(self.candidate_weight.shape[0])

    @property
    def fan_in(self) -> int:
        return int(math.prod(self.weight_tail))

    @property
    def projection_groups(self) -> int:
        """Groups of the wrapped op (a grouped convolution's); a low-rank set projects each
        group's inputs to ``rank`` features of its own."""
        return 1

    def set_rank(self, rank: int | None) -> None:
        """Make this layer's dendrite sets full copies (``None``) or low-rank (``rank`` features per
        group); only while it holds no set and no candidate."""
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"dendrite rank must be an integer >= 1 or None, got {rank!r}")
        if rank == self.rank:
            return
        if self.num_dendrites or self.num_candidates:
            raise RuntimeError("the rank of a layer's dendrite sets can change only while it holds none")
        self.rank = rank
        self.resize(0)

    def _set_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        """Shapes of ``k`` sets' input weights (``weight``) and, when low-rank, projection."""
        if self.rank is None:
            return {"weight": (k, self.out_channels, *self.weight_tail)}
        return {"weight": (k, self.out_channels, self.rank),
                "proj": (k, self.projection_groups * self.rank, *self.weight_tail)}

    def set_parameters(self) -> int:
        """Parameters of one set of this layer: input weights (low-rank: mix and projection), bias
        and ``v``; the cascade between a neuron's sets is stored besides, as a ``[D, D, O]`` square."""
        o = self.out_channels
        return sum(math.prod(s) for s in self._set_shapes(1).values()) + 2 * o

    def _factory(self) -> dict:
        w = self.neuron_weight()
        return {"device": w.device, "dtype": w.dtype}

    def _random_sets(self, k: int, scale: float, generator: torch.Generator | None,
                     projections: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Fresh input weights, biases and (low-rank) ``projections`` projections (default k) for
        k sets: a full set's weights are ``randn * scale / sqrt(fan_in)``; a low-rank set's factors
        share the scale, ``P ~ randn * sqrt(scale / fan_in)``, ``Q ~ randn * sqrt(scale / r)``, so that
        its pre-activation has a full set's variance."""
        o, f = self.out_channels, self._factory()
        std = scale / math.sqrt(max(self.fan_in, 1))
        shapes = self._set_shapes(k)
        if self.rank is None:
            w = torch.randn(shapes["weight"], generator=generator) * std
            proj = None
        else:
            w = torch.randn(shapes["weight"], generator=generator) * math.sqrt(scale / self.rank)
            rows = shapes["proj"][1:]
            proj = torch.randn(k if projections is None else projections, *rows, generator=generator)
            proj = (proj * math.sqrt(scale / max(self.fan_in, 1))).to(**f)
        b = torch.randn(k, o, generator=generator) * std
        return w.to(**f), b.to(**f), proj

    def resize(self, dendrites: int, candidates: int = 0) -> None:
        """Set the structure to ``dendrites`` installed sets and ``candidates`` candidate sets,
        with zero-filled values: used to replay a recorded structure before loading weights."""
        o, f = self.out_channels, self._factory()
        d = dendrites
        shapes = self._set_shapes(d)
        self.dendrite_weight = nn.Parameter(torch.zeros(shapes["weight"], **f), False)
        self.dendrite_bias = nn.Parameter(torch.zeros(d, o, **f), False)
        self.dendrite_cascade = nn.Parameter(torch.zeros(d, d, o, **f), False)
        self.dendrite_out = nn.Parameter(torch.zeros(d, o, **f), d > 0)
        self.dendrite_proj = None if self.rank is None else nn.Parameter(torch.zeros(shapes["proj"], **f), False)
        if candidates:
            cshapes = self._set_shapes(candidates)
            proj = None if self.rank is None else torch.zeros(1, *cshapes["proj"][1:], **f)
            self._set_candidates(torch.zeros(cshapes["weight"], **f), torch.zeros(candidates, o, **f),
                                 torch.zeros(candidates, d, o, **f), proj)
        else:
            self.drop_candidates()

    def add_candidates(self, count: int, init_scale: float, generator: torch.Generator | None = None) -> None:
        """Create ``count`` fresh candidate sets (dendrite phase) and empty statistics."""
        w, b, proj = self._random_sets(count, init_scale, generator, projections=1)
        u = torch.zeros(count, self.num_dendrites, self.out_channels, **self._factory())
        s = self.candidate_scale
        self._set_candidates(w / s, b / s, u, None if proj is None else proj / s)

    def _set_candidates(self, w: Tensor, b: Tensor, u: Tensor, proj: Tensor | None = None) -> None:
        """Install stored candidate tensors (already divided by the scale) and fresh statistics."""
        self.candidate_weight = nn.Parameter(w)
        self.candidate_bias = nn.Parameter(b)
        self.candidate_cascade = nn.Parameter(u, u.numel() > 0)
        self.candidate_proj = None if proj is None else nn.Parameter(proj)
        for p in self.candidate_parameters():
            p._apical_candidate = True  # lets optimiser builders give candidates their own group
        self.stats = CorrelationStats(int(w.shape[0]), self.out_channels)

    def candidate_parameters(self) -> list[nn.Parameter]:
        """The candidates' own tensors (empty outside a dendrite phase)."""
        return [p for p in (self.candidate_weight, self.candidate_bias, self.candidate_cascade, self.candidate_proj)
                if p is not None]

    def dendrite_parameters(self) -> list[nn.Parameter]:
        """The installed sets' tensors: input weights, biases, cascade, ``v`` and (low-rank) projections."""
        return [p for p in (self.dendrite_weight, self.dendrite_bias, self.dendrite_cascade, self.dendrite_out,
                            self.dendrite_proj) if p is not None]

    def drop_candidates(self) -> None:
        self.candidate_weight = None
        self.candidate_bias = None
        self.candidate_cascade = None
        self.candidate_proj = None
        self.stats = None

    def _append_set(self, w: Tensor, b: Tensor, u: Tensor, v: Tensor, proj: Tensor | None = None) -> None:
        """Append one set: w [O, *w] (low-rank: [O, r] and its projection ``proj`` [g * r, *w]),
        b [O], u [D, O] cascade from the installed sets, v [O]."""
        d, o = self.num_dendrites, self.out_channels
        if (proj is None) != (self.rank is None):
            raise ValueError("a low-rank layer's set needs its projection, and a full set none")
        casc = torch.zeros(d + 1, d + 1, o, **self._factory())
        casc[:d, :d] = self.dendrite_cascade.detach()
        casc[d, :d] = u.detach()
        self.dendrite_weight = nn.Parameter(torch.cat([self.dendrite_weight.detach(), w.detach()[None]]), False)
        self.dendrite_bias = nn.Parameter(torch.cat([self.dendrite_bias.detach(), b.detach()[None]]), False)
        self.dendrite_cascade = nn.Parameter(casc, False)
        self.dendrite_out = nn.Parameter(torch.cat([self.dendrite_out.detach(), v.detach()[None]]))
        if proj is not None:
            self.dendrite_proj = nn.Parameter(torch.cat([self.dendrite_proj.detach(), proj.detach()[None]]), False)

    def install_random(self, init_scale: float, generator: torch.Generator | None = None) -> None:
        """Append a randomly initialised set with v = 0 ("gd" mode): the function is unchanged."""
        w, b, proj = self._random_sets(1, init_scale, generator)
        zeros = torch.zeros(self.num_dendrites, self.out_channels, **self._factory())
        self._append_set(w[0], b[0], zeros, torch.zeros(self.out_channels, **self._factory()),
                         None if proj is None else proj[0])

    def candidate_scores(self) -> Tensor:
        """Per candidate and neuron correlation score of the epoch so far, ``[C, O]`` float64."""
        if self.stats is None:
            raise RuntimeError("this layer has no candidates: it is not in a dendrite phase")
        return self.stats.scores(self.normaliser)

    def install_best(self, scores: Tensor, output_init: float = 0.0, signs: Tensor | None = None) -> Tensor:
        """Install, for each neuron, the candidate with the highest score; drop the others.

        Returns the chosen candidate index per neuron. With ``output_init > 0`` the new
        dendrite-to-neuron weight starts at ``-sign(cov) * output_init``, the signs ``[C, O]`` given
        or, by default, those of this epoch's statistics.
        """
        if self.candidate_weight is None:
            raise RuntimeError("this layer has no candidates to install")
        o = self.out_channels
        best = scores.argmax(dim=0).to(self.candidate_weight.device)  # [O]
        cols = torch.arange(o, device=best.device)
        cw, cb, cu = (t.detach() for t in self.candidate_tensors())
        w, b = cw[best, cols], cb[best, cols]
        u = cu[best, :, cols].transpose(0, 1)  # [D, O]
        v = torch.zeros(o, **self._factory())
        if output_init > 0:
            signs = self.stats.signs() if signs is None else signs
            v = -signs.to(v)[best.cpu(), cols.cpu()].to(v.device) * output_init
        proj = self.candidate_projection()
        self._append_set(w, b, u, v, None if proj is None else proj.detach()[0])
        self.drop_candidates()
        return best

    def candidate_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """Effective candidate weight, bias and cascade (stored values times the scale)."""
        s = self.candidate_scale
        tensors = (self.candidate_weight, self.candidate_bias, self.candidate_cascade)
        return tensors if s == 1.0 else tuple(t * s for t in tensors)

    def candidate_projection(self) -> Tensor | None:
        """Effective shared projection of the candidates ``[1, g * r, *w]`` (low-rank only)."""
        p = self.candidate_proj
        return p if p is None or self.candidate_scale == 1.0 else p * self.candidate_scale

    def remove_last(self) -> None:
        """Remove the most recently installed set (keep-or-revert)."""
        d = self.num_dendrites
        if d == 0:
            raise RuntimeError("no dendrite set to remove")
        self.dendrite_weight = nn.Parameter(self.dendrite_weight.detach()[: d - 1].clone(), False)
        self.dendrite_bias = nn.Parameter(self.dendrite_bias.detach()[: d - 1].clone(), False)
        self.dendrite_cascade = nn.Parameter(self.dendrite_cascade.detach()[: d - 1, : d - 1].clone(), False)
        self.dendrite_out = nn.Parameter(self.dendrite_out.detach()[: d - 1].clone(), d > 1)
        if self.dendrite_proj is not None:
            self.dendrite_proj = nn.Parameter(self.dendrite_proj.detach()[: d - 1].clone(), False)

    def set_training_mode(self, phase: str, perforated: bool) -> None:
        """Set which of this layer's own dendrite tensors train in ``phase`` ("neuron" or "dendrite")."""
        if phase not in ("neuron", "dendrite"):
            raise ValueError(f"phase must be 'neuron' or 'dendrite', got {phase!r}")
        self.perforated = perforated
        inputs_train = phase == "neuron" and not perforated
        # a tensor of size zero (no set installed yet, no cascade into a first candidate) never
        # requires grad: it takes no part in the forward pass, and plain DistributedDataParallel
        # would wait for its gradient
        for p in (self.dendrite_weight, self.dendrite_bias, self.dendrite_cascade, self.dendrite_proj):
            if p is not None:
                p.requires_grad_(inputs_train and p.numel() > 0)
        self.dendrite_out.requires_grad_(phase == "neuron" and self.dendrite_out.numel() > 0)
        for p in self.candidate_parameters():
            p.requires_grad_(phase == "dendrite" and p.numel() > 0)

    # ------------------------------------------------------------------ forward
    def _stack_forward(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        raise NotImplementedError

    def _project(self, x: Tensor, proj: Tensor) -> Tensor:
        """Low-rank sets' projected inputs: ``proj`` ``[P, g * r, *w]`` applied to ``x`` by the
        wrapped op in one call, in stack layout with a group axis: ``[..., P, g, r]`` (Linear) or
        ``[N, P, g, r, *spatial]`` (conv)."""
        raise NotImplementedError

    def _mix(self, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Pre-activations in stack layout from projected inputs ``y`` (one projection shared by
        every set when its set axis has size 1) and per-neuron weights ``[K, O, r]``."""
        raise NotImplementedError

    def _sets_forward(self, x: Tensor, weight: Tensor, bias: Tensor, proj: Tensor | None) -> Tensor:
        """Pre-activations of K sets in stack layout: full copies, or low-rank with ``proj``."""
        if proj is None:
            return self._stack_forward(x, weight, bias)
        return self._mix(self._project(x, proj), weight, bias)

    def candidate_pre(self, x: Tensor) -> Tensor:
        """The candidates' pre-activations (before the cascade from installed sets) on ``x``."""
        cw, cb, _ = self.candidate_tensors()
        return self._sets_forward(x, cw, cb, self.candidate_projection())

    def _chan(self, p: Tensor) -> Tensor:
        """View a per-channel tensor ``[..., O]`` so it broadcasts against a stack tensor."""
        raise NotImplementedError

    def _cascade(self, pre: Tensor, cascade: Tensor) -> Tensor:
        """Installed dendrites' activations from their pre-activations (stack layout).

        The per-channel cascade is the only sequential part (D small steps). Without autograd
        (pb, eval) it runs in place on ``pre``.
        """
        ax, d = self.set_axis, pre.shape[self.set_axis]
        if not (torch.is_grad_enabled() and (pre.requires_grad or cascade.requires_grad)):
            act_ = getattr(torch, f"{self.activation}_")
            for k in range(d):
                h = pre.select(ax, k)
                for e in range(k):
                    h.addcmul_(self._chan(cascade[k, e]), pre.select(ax, e))
                act_(h)
            return pre
        act = ACTIVATION_FNS[self.activation]
        outs: list[Tensor] = []
        for k in range(d):
            h = pre.select(ax, k)
            for e in range(k):
                h = torch.addcmul(h, self._chan(cascade[k, e]), outs[e])
            outs.append(act(h))
        return torch.stack(outs, ax)

    def dendrite_activations(self, x: Tensor) -> Tensor:
        """Installed dendrites' outputs ``a`` in stack layout (with or without grad, per mode)."""
        xin = x.detach() if self.perforated else x
        grad = torch.is_grad_enabled() and not self.perforated
        with torch.set_grad_enabled(grad):
            pre = self._sets_forward(xin, self.dendrite_weight, self.dendrite_bias, self.dendrite_proj)
            return self._cascade(pre, self.dendrite_cascade)

    def forward(self, x: Tensor) -> Tensor:
        z = self.base(x)
        training = self.training and torch.is_grad_enabled()
        d, c = self.num_dendrites, self.num_candidates
        if d == 0 and c == 0:
            return z
        a = None
        if d:
            a = self.dendrite_activations(x)
            v = self.dendrite_out
            for k in range(d):  # z += v_k * a_k, per channel
                z = torch.addcmul(z, self._chan(v[k]), a.select(self.set_axis, k))
        if c and training:
            cu = self.candidate_tensors()[2]
            pre = self.candidate_pre(x.detach())
            if d:  # candidate c gets sum_e u[c, e] * a_e from the installed dendrites, per neuron
                ax = self.set_axis % pre.dim()
                a_const = a.detach()
                for e in range(d):
                    pre = torch.addcmul(pre, self._chan(cu[:, e]), a_const.select(ax, e).unsqueeze(ax))
            a_c = ACTIVATION_FNS[self.activation](pre)
            z = correlation_tap(z, a_c, self)
        return z

    # ------------------------------------------------------------------ statistics hooks
    def observation_dims(self, stacked: bool, ndim: int) -> tuple[int, ...]:
        """Dims of a stack (``stacked``) or output tensor that index observations."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        rank = "" if self.rank is None else f", rank={self.rank}"
        return (f"dendrites={self.num_dendrites}, candidates={self.num_candidates}{rank}, "
                f"activation={self.activation}, perforated={self.perforated}")


class DendriticLinear(DendriticLayer):
    """Dendrites for ``nn.Linear``; inputs of any shape ``[..., in_features]``."""

    set_axis = -2

    def _stack_forward(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        k, o = weight.shape[0], weight.shape[1]
        y = F.linear(x, weight.reshape(k * o, -1), bias.reshape(k * o))
        return y.unflatten(-1, (k, o))

    def _chan(self, p: Tensor) -> Tensor:
        return p

    def _project(self, x: Tensor, proj: Tensor) -> Tensor:
        k, r = proj.shape[0], proj.shape[1]
        return F.linear(x, proj.reshape(k * r, -1)).unflatten(-1, (k, 1, r))

    def _mix(self, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        y = y.squeeze(-2)  # [..., P, r]: no groups
        if y.shape[-2] == 1:  # one shared projection: a single matmul for every set
            k, o, r = weight.shape
            return F.linear(y.squeeze(-2), weight.reshape(k * o, r), bias.reshape(k * o)).unflatten(-1, (k, o))
        return torch.einsum("...kr,kor->...ko", y, weight) + bias

    def observation_dims(self, stacked: bool, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim - (2 if stacked else 1)))


class DendriticTransposedLinear(DendriticLinear):
    """Dendrites for a linear layer that stores its weight as ``[in_features, out_features]``
    (``x @ weight + bias``), e.g. ``transformers.pytorch_utils.Conv1D`` of GPT-2: the neurons are
    the weight's columns. The dendrite tensors are neuron-major, as for ``nn.Linear``."""

    @classmethod
    def neuron_weight_of(cls, base: nn.Module) -> Tensor:
        return base.weight.t()


class DendriticConv(DendriticLayer):
    """Dendrites for ``nn.Conv1d/2d/3d`` (grouped and depthwise included); the set axis is 1."""

    set_axis = 1

    def __init__(self, base: nn.Module, activation: str = "sigmoid") -> None:
        super().__init__(base, activation)
        self.spatial = len(base.kernel_size)
        self.groups = int(base.groups)

    def _stack_forward(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        k, o, g = weight.shape[0], weight.shape[1], self.groups
        # the conv assigns output channels to groups in contiguous blocks: interleave sets per group
        w = weight.unflatten(1, (g, o // g)).transpose(0, 1).reshape(k * o, *weight.shape[2:])
        b = bias.unflatten(1, (g, o // g)).transpose(0, 1).reshape(k * o)
        y = self.base._conv_forward(x, w, b)
        n, sp = y.shape[0], y.shape[2:]
        return y.unflatten(1, (g, k, o // g)).transpose(1, 2).reshape(n, k, o, *sp)

    def _chan(self, p: Tensor) -> Tensor:
        return p.reshape(*p.shape, *([1] * self.spatial))

    @property
    def projection_groups(self) -> int:
        return self.groups

    def _project(self, x: Tensor, proj: Tensor) -> Tensor:
        k, g = proj.shape[0], self.groups
        r = proj.shape[1] // g
        # each set's g * r rows are r per group; the conv wants each group's rows contiguous
        w = proj.unflatten(1, (g, r)).transpose(0, 1).reshape(g * k * r, *proj.shape[2:])
        y = self.base._conv_forward(x, w, None)
        return y.unflatten(1, (g, k, r)).transpose(1, 2)  # [N, P, g, r, *spatial]

    def _mix(self, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        k, o, r = weight.shape
        g = self.groups
        q = weight.unflatten(1, (g, o // g))  # [K, g, O/g, r]: a neuron reads its group's features
        if y.shape[1] == 1:
            pre = torch.einsum("ngr...,kgor->nkgo...", y.squeeze(1), q)
        else:
            pre = torch.einsum("nkgr...,kgor->nkgo...", y, q)
        pre = pre.flatten(2, 3)  # [N, K, O, *spatial]
        return pre + self._chan(bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == self.spatial + 1:  # unbatched input
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def observation_dims(self, stacked: bool, ndim: int) -> tuple[int, ...]:
        first = 3 if stacked else 2
        return (0, *range(first, ndim))
