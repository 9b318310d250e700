"""Dendrites on recurrent layers: ``nn.RNNCell`` / ``GRUCell`` / ``LSTMCell`` and ``nn.RNN`` / ``GRU`` / ``LSTM``.

A neuron is a gate unit: the pre-activation of one gate of one hidden unit (``G * H`` neurons
per layer and direction, ``G`` = 1 for RNN, 3 for GRU, 4 for LSTM). Its dendrites read the
step's input and previous hidden state ``u_t = [x_t, h_{t-1}]`` (detached in pb: no error flows
back through them into the inputs or earlier time steps) and add ``sum_k v_k a_k`` to the gate's
pre-activation, as a dendritic Linear layer over ``u_t`` would::

    RNN:   h' = tanh(W_ih x + W_hh h + b + sum_k v_k a_k)
    LSTM:  [i, f, g, o] = W_ih x + W_hh h + b + sum_k v_k a_k;  c' = f c + i g;  h' = o tanh(c')
    GRU:   [r, z] = sigma(W_i[r,z] x + W_h[r,z] h + b + dend[r,z])
           n = tanh(W_in x + b_in + dend_n + r * (W_hn h + b_hn));  h' = (1 - z) n + z h

(for GRU's ``n`` gate the dendrites enter beside the input part, outside the reset gate). The
correlation statistics take every time step of every sequence as an observation (batch x time).

``nn.RNN/GRU/LSTM`` keep their object and Parameters (like an attention module): the module
becomes a subclass (:class:`DendriticRNN`, :class:`DendriticGRU`, :class:`DendriticLSTM`) with one
:class:`DendriticRecurrentCell` per layer and direction (``cell_l0``, ``cell_l0_reverse``, ...)
over views of its own weights. While no cell has dendrites or candidates, the module runs
PyTorch's fused kernel; otherwise a step loop (one small matmul per step and cell, no loop over
units or candidates). Packed sequences are supported (the loop masks each sequence at its
length); ``proj_size > 0`` LSTMs are not (a clear error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from apical.dendrites.correlation import correlation_tap
from apical.dendrites.layer import ACTIVATION_FNS, DendriticLayer, DendriticLinear

__all__ = ["DendriticGRU", "DendriticGRUOnHidden", "DendriticLSTM", "DendriticLSTMOnHidden", "DendriticRNN",
           "DendriticRNNOnHidden", "DendriticRecurrentCell", "DendriticRecurrentCellOnHidden"]

GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


def _cell_mode(module: nn.Module) -> str | None:
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    if isinstance(module, nn.RNNCell):
        return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
    return getattr(module, "mode", None)


class _CellWeights(nn.Module):
    """One layer and direction of an ``nn.RNN/GRU/LSTM``, read from the module's own Parameters.

    Holds no tensor; the recurrent module is referenced, not registered (no cycle in
    ``named_modules``, nothing twice in ``state_dict``)."""

    def __init__(self, rnn: nn.RNNBase, layer: int, reverse: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_rnn", rnn)
        self.suffix = f"_l{layer}{'_reverse' if reverse else ''}"
        self.mode = rnn.mode

    def _get(self, name: str) -> Tensor | None:
        return getattr(self._rnn, name + self.suffix, None)  # a module without biases has no bias_* attributes

    @property
    def weight_ih(self) -> Tensor:
        return self._get("weight_ih")

    @property
    def weight_hh(self) -> Tensor:
        return self._get("weight_hh")

    @property
    def bias_ih(self) -> Tensor | None:
        return self._get("bias_ih")

    @property
    def bias_hh(self) -> Tensor | None:
        return self._get("bias_hh")

    def extra_repr(self) -> str:
        return f"the {self.mode} weights *{self.suffix} of the enclosing module"


class DendriticRecurrentCell(DendriticLayer):
    """Dendrites on the gate units of one recurrent cell: an ``nn.RNNCell``, ``GRUCell`` or
    ``LSTMCell`` (then ``base`` is the cell, and the forward is the cell's), or one layer and
    direction of an ``nn.RNN/GRU/LSTM`` (then the enclosing module runs :meth:`step`).

    The neuron-major weight is ``[W_ih, W_hh]``, ``[G * H, I + H]``: a dendrite set reads the step's
    input and previous hidden state."""

    set_axis = -2
    _stack_forward = DendriticLinear._stack_forward
    _project = DendriticLinear._project
    _mix = DendriticLinear._mix
    _chan = DendriticLinear._chan
    observation_dims = DendriticLinear.observation_dims

    def __init__(self, base: nn.Module, activation: str = "sigmoid") -> None:
        super().__init__(base, activation)
        self.mode = _cell_mode(base)
        self.hidden_size = int(base.weight_hh.shape[1])
        self.input_size = int(base.weight_ih.shape[1])

    @classmethod
    def neuron_weight_of(cls, base: nn.Module) -> Tensor:
        # a new tensor (the two matrices side by side), read for its shape, dtype and device
        return torch.cat([base.weight_ih, base.weight_hh], 1)

    @classmethod
    def unsupported(cls, base: nn.Module) -> str | None:
        w = getattr(base, "weight_ih", None)
        if isinstance(w, nn.parameter.UninitializedParameter):
            return "it is a lazy layer that has not been initialised yet: run one forward pass through the model first"
        if not isinstance(w, Tensor) or not isinstance(getattr(base, "weight_hh", None), Tensor):
            return "it has no weight_ih / weight_hh tensors"
        if _cell_mode(base) not in GATES:
            return f"unknown recurrent mode {_cell_mode(base)!r}"
        return None

    @property
    def weight(self) -> Tensor:
        return self.neuron_weight()

    @property
    def bias(self) -> Tensor | None:
        return None  # a GRU's two biases do not add up to one (b_hn sits inside the reset gate)

    # ------------------------------------------------------------------ one time step
    def _with_dendrites(self, s: Tensor, x: Tensor, h: Tensor) -> Tensor:
        """The gate pre-activations ``s`` ``[B, G*H]`` plus the installed dendrites' ``v * a``, and
        through the correlation tap when candidates train."""
        d, c = self.num_dendrites, self.num_candidates
        training = c and self.training and torch.is_grad_enabled()
        if d == 0 and not training:
            return s
        u = torch.cat([x, h], -1)
        if d:
            a = self.dendrite_activations(u)  # [B, D, G*H]
            s = s + (a * self.dendrite_out).sum(-2)  # sum_k v_k a_k: one product (2x a loop of addcmul)
        if training:
            cu = self.candidate_tensors()[2]  # [C, D, G*H]
            pre = self.candidate_pre(u.detach())  # [B, C, G*H]
            if d:  # the installed sets' outputs feed every candidate (cascade), as constants: D
                a_const = a.detach()  # multiply-adds, measured faster here than one broadcast product
                for e in range(d):
                    pre = torch.addcmul(pre, cu[:, e], a_const[..., e, :].unsqueeze(-2))
            s = correlation_tap(s, ACTIVATION_FNS[self.activation](pre), self)
        return s

    def _on_gates(self, s: Tensor, x: Tensor, h: Tensor) -> Tensor:
        """The gate pre-activations with this placement's dendrites (here: all of them)."""
        return self._with_dendrites(s, x, h)

    def step(self, x: Tensor, state: Tensor | tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        """One time step on a batch ``x`` ``[B, I]``: the new hidden state (LSTM: ``(h, c)``)."""
        base = self.base
        h = state[0] if self.mode == "LSTM" else state
        gi = F.linear(x, base.weight_ih, base.bias_ih)
        gh = F.linear(h, base.weight_hh, base.bias_hh)
        if self.mode == "GRU":
            n = self.hidden_size
            s = self._on_gates(torch.cat([gi[..., : 2 * n] + gh[..., : 2 * n], gi[..., 2 * n:]], -1), x, h)
            r, z = torch.sigmoid(s[..., : 2 * n]).chunk(2, -1)
            cand = torch.tanh(torch.addcmul(s[..., 2 * n:], r, gh[..., 2 * n:]))
            return torch.addcmul(cand, z, h - cand)  # (1 - z) n + z h
        s = self._on_gates(gi + gh, x, h)
        if self.mode == "LSTM":
            i, f, g, o = s.chunk(4, -1)
            c = torch.addcmul(torch.sigmoid(f) * state[1], torch.sigmoid(i), torch.tanh(g))
            return torch.sigmoid(o) * torch.tanh(c), c
        return torch.tanh(s) if self.mode == "RNN_TANH" else torch.relu(s)

    @property
    def active(self) -> bool:
        """Whether the step loop is needed (installed dendrites, or candidates training)."""
        return self.num_dendrites > 0 or (self.num_candidates > 0 and self.training and torch.is_grad_enabled())

    # ------------------------------------------------------------------ a cell module's forward
    def forward(self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):
        if not self.active:
            return self.base(input, hx)
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        n = self.hidden_size
        if hx is None:
            zeros = x.new_zeros(x.shape[0], n)
            hx = (zeros, zeros) if self.mode == "LSTM" else zeros
        elif unbatched:
            hx = tuple(t.unsqueeze(0) for t in hx) if self.mode == "LSTM" else hx.unsqueeze(0)
        out = self.step(x, hx)
        if unbatched:
            out = tuple(t.squeeze(0) for t in out) if self.mode == "LSTM" else out.squeeze(0)
        return out


class DendriticRecurrentCellOnHidden(DendriticRecurrentCell):
    """The other placement: a neuron is a hidden unit (``H`` neurons), and its dendrites, reading
    ``[x_t, h_{t-1}]`` like the gates' do, add ``sum_k v_k a_k`` to the new hidden state (an LSTM's
    ``h``, not its cell state). Not the default (see ``docs/method.md`` for the measurement); choose
    it with ``apical.layer_registry.registered(nn.GRU, apical.DendriticGRUOnHidden)`` (or
    ``register_layer``), and likewise for the other recurrent types."""

    @classmethod
    def neuron_weight_of(cls, base: nn.Module) -> Tensor:
        # the last gate's rows ([H, I + H]: a GRU's n, an LSTM's o, an RNN's only one), for the
        # layer's geometry: H neurons reading I + H inputs
        n = base.weight_hh.shape[1]
        return torch.cat([base.weight_ih[-n:], base.weight_hh[-n:]], 1)

    def _on_gates(self, s: Tensor, x: Tensor, h: Tensor) -> Tensor:
        return s  # the gates stay plain

    def step(self, x: Tensor, state: Tensor | tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        h = state[0] if self.mode == "LSTM" else state
        new = super().step(x, state)
        if self.mode == "LSTM":
            return self._with_dendrites(new[0], x, h), new[1]
        return self._with_dendrites(new, x, h)


def _unsupported_rnn(module: nn.Module) -> str | None:
    if type(module) not in (nn.RNN, nn.GRU, nn.LSTM) and not isinstance(module, _DendriticRecurrent):
        return (f"{type(module).__name__} subclasses {type(module).__mro__[1].__name__} with code of its own: "
                "register a layer class for it (apical.register_layer)")
    if getattr(module, "proj_size", 0):
        return "an LSTM with proj_size > 0 (projected hidden states) is not supported"
    return None


class _DendriticRecurrent:
    """What :class:`DendriticRNN`, :class:`DendriticGRU` and :class:`DendriticLSTM` share."""

    _plain: type[nn.RNNBase]
    cell_class: type[DendriticRecurrentCell] = DendriticRecurrentCell

    @classmethod
    def _names(cls, module: nn.RNNBase) -> list[tuple[str, int, bool]]:
        dirs = 2 if module.bidirectional else 1
        return [(f"cell_l{k}{'_reverse' if r else ''}", k, bool(r)) for k in range(module.num_layers)
                for r in range(dirs)]

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        reason = _unsupported_rnn(module)
        if reason is None and not isinstance(module, cls._plain):
            reason = f"{cls.__name__} wraps {cls._plain.__name__}, not {type(module).__name__}"
        return reason

    @classmethod
    def wrap(cls, module: nn.RNNBase, activation: str = "sigmoid") -> nn.Module:
        reason = cls.unsupported(module)
        if reason is not None:
            raise ValueError(f"cannot wrap {type(module).__name__}: {reason}")
        cells = [(name, cls.cell_class(_CellWeights(module, k, r), activation=activation))
                 for name, k, r in cls._names(module)]
        module.__class__ = cls  # the same object: every Parameter and attribute is kept
        for name, cell in cells:
            setattr(module, name, cell)
        return module

    @classmethod
    def planned_layers(cls, module: nn.RNNBase) -> dict[str, Tensor]:
        return {name: cls.cell_class.neuron_weight_of(_CellWeights(module, k, r))
                for name, k, r in cls._names(module)}

    def unwrapped(self) -> nn.Module:
        for name, _, _ in type(self)._names(self):
            delattr(self, name)
        self.__class__ = type(self)._plain
        return self

    def cells(self) -> list[DendriticRecurrentCell]:
        return [getattr(self, name) for name, _, _ in type(self)._names(self)]

    def forward(self, input, hx=None):
        if not any(cell.active for cell in self.cells()):
            return self._plain.forward(self, input, hx)  # PyTorch's fused kernel
        return self._loop(input, hx)

    def _loop(self, input, hx):
        lengths = None
        packed = isinstance(input, PackedSequence)
        unbatched = not packed and input.dim() == 2
        if packed:  # padded in the caller's batch order, as hx is
            input, lengths = pad_packed_sequence(input, batch_first=False)
        elif unbatched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        steps, batch = input.shape[0], input.shape[1]
        lstm = self.mode == "LSTM"
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            zeros = input.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = hx if lstm else (hx, None)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if lstm else None)
        mask = None
        if lengths is not None:
            mask = (torch.arange(steps)[:, None] < lengths[None, :]).to(input.device)[..., None]  # [T, B, 1]
        layer_input, h_n, c_n = input, [], []
        for k in range(self.num_layers):
            outputs = []
            for r in range(dirs):
                cell = getattr(self, f"cell_l{k}{'_reverse' if r else ''}")
                i = k * dirs + r
                state = (h0[i], c0[i]) if lstm else h0[i]
                seq = layer_input if not r else _flip(layer_input, lengths)
                ys = []
                for t in range(steps):
                    new = cell.step(seq[t], state)
                    if mask is not None:  # past a sequence's end its state stays
                        keep = mask[t]
                        new = tuple(torch.where(keep, a, b) for a, b in zip(new, state, strict=True)) if lstm \
                            else torch.where(keep, new, state)
                    state = new
                    ys.append(state[0] if lstm else state)
                out = torch.stack(ys)
                if mask is not None:
                    out = out * mask
                outputs.append(out if not r else _flip(out, lengths))
                h_n.append(state[0] if lstm else state)
                if lstm:
                    c_n.append(state[1])
            layer_input = torch.cat(outputs, -1) if dirs == 2 else outputs[0]
            if self.dropout and self.training and k < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        output, h_out = layer_input, torch.stack(h_n)
        hidden = (h_out, torch.stack(c_n)) if lstm else h_out
        if packed:
            output = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=False)
        elif unbatched:
            output = output.squeeze(1)
            hidden = tuple(t.squeeze(1) for t in hidden) if lstm else hidden.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, hidden


def _flip(seq: Tensor, lengths: Tensor | None) -> Tensor:
    """Time-reverse each sequence of ``seq`` ``[T, B, F]`` within its own length (all of it without lengths)."""
    if lengths is None:
        return seq.flip(0)
    steps = seq.shape[0]
    t = torch.arange(steps, device=seq.device)[:, None]
    lens = lengths.to(seq.device)[None, :]
    idx = torch.where(t < lens, lens - 1 - t, t)  # [T, B]
    return seq.gather(0, idx[..., None].expand_as(seq))


class DendriticRNN(_DendriticRecurrent, nn.RNN):
    """``nn.RNN`` with a :class:`DendriticRecurrentCell` per layer and direction (made by ``wrap``)."""

    _plain = nn.RNN


class DendriticGRU(_DendriticRecurrent, nn.GRU):
    """``nn.GRU`` with a :class:`DendriticRecurrentCell` per layer and direction (made by ``wrap``)."""

    _plain = nn.GRU


class DendriticLSTM(_DendriticRecurrent, nn.LSTM):
    """``nn.LSTM`` with a :class:`DendriticRecurrentCell` per layer and direction (made by ``wrap``)."""

    _plain = nn.LSTM


class DendriticRNNOnHidden(DendriticRNN):
    """:class:`DendriticRNN` with the dendrites on the hidden state (:class:`DendriticRecurrentCellOnHidden`)."""

    cell_class = DendriticRecurrentCellOnHidden


class DendriticGRUOnHidden(DendriticGRU):
    """:class:`DendriticGRU` with the dendrites on the hidden state (:class:`DendriticRecurrentCellOnHidden`)."""

    cell_class = DendriticRecurrentCellOnHidden


class DendriticLSTMOnHidden(DendriticLSTM):
    """:class:`DendriticLSTM` with the dendrites on the hidden state (:class:`DendriticRecurrentCellOnHidden`)."""

    cell_class = DendriticRecurrentCellOnHidden
