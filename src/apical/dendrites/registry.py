"""Which module types apical can give dendrites to: one explicit registry.

An entry maps a module type to a *layer class*: a :class:`~apical.DendriticLayer` subclass (or
any class with the same classmethods ``unsupported``, ``wrap`` and ``planned_layers``, such as
:class:`~apical.dendrites.attention.DendriticMultiheadAttention`). A module is looked up along its
type's MRO, so a subclass of a registered type is wrapped by the same class unless it has an
entry of its own.

Built-in entries: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.MultiheadAttention``, ``nn.RNNCell``,
``nn.GRUCell``, ``nn.LSTMCell``, ``nn.RNN``, ``nn.GRU``, ``nn.LSTM``, and, by
qualified name so that the packages stay optional and are never imported by apical,
``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers, weight stored ``[in, out]``) and
``torch_geometric.nn.Linear``. A user adds a kind with :func:`register_layer` (for a module that
computes ``F.linear(x, self.weight, self.bias)`` that is ``register_layer(MyLinear,
apical.DendriticLinear)``) and removes it with :func:`unregister_layer`, or for a scope with
``with apical.layer_registry.registered(MyLinear, apical.DendriticLinear): ...``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import nn

from apical.dendrites.attention import DendriticMultiheadAttention
from apical.dendrites.layer import DendriticConv, DendriticLayer, DendriticLinear, DendriticTransposedLinear
from apical.dendrites.recurrent import (
    DendriticGRU,
    DendriticLSTM,
    DendriticRecurrentCell,
    DendriticRNN,
    _DendriticRecurrent,
)

__all__ = ["LayerRegistry", "layer_class_for", "layer_registry", "register_layer", "unregister_layer"]

_PROTOCOL = ("unsupported", "wrap", "planned_layers")


class LayerRegistry:
    """Module type -> layer class, plus entries by qualified name for optional packages."""

    def __init__(self) -> None:
        self._types: dict[type, type] = {}
        self._by_name: dict[tuple[str, str], type] = {}  # (defining module, qualname) -> layer class

    def register(self, module_type: type, layer_class: type) -> type | None:
        """Wrap modules of ``module_type`` (and its subclasses) with ``layer_class``; returns the
        entry it replaces, if any."""
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_layer: module_type must be an nn.Module subclass, got {module_type!r}")
        if not isinstance(layer_class, type) or not all(callable(getattr(layer_class, a, None)) for a in _PROTOCOL):
            raise TypeError(
                f"register_layer: layer_class must be a DendriticLayer subclass (e.g. apical.DendriticLinear), "
                f"got {layer_class!r}"
            )
        old = self._types.get(module_type)
        self._types[module_type] = layer_class
        return old

    def register_by_name(self, qualified_name: str, layer_class: type) -> None:
        """An entry for a type named ``"package.module.Class"`` (where it is defined), active only
        once that module has been imported by someone else; apical never imports it."""
        module, _, qual = qualified_name.rpartition(".")
        self._by_name[(module, qual)] = layer_class

    def unregister(self, module_type: type) -> type:
        """Remove ``module_type``'s entry (KeyError if it has none); returns it."""
        if module_type not in self._types:
            raise KeyError(f"{getattr(module_type, '__name__', module_type)} has no entry in apical's layer registry")
        return self._types.pop(module_type)

    @contextlib.contextmanager
    def registered(self, module_type: type, layer_class: type) -> Iterator[None]:
        """Register for the duration of a ``with`` block, then restore the previous entry."""
        old = self.register(module_type, layer_class)
        try:
            yield
        finally:
            if old is None:
                self._types.pop(module_type, None)
            else:
                self._types[module_type] = old

    def lookup(self, cls: type) -> type | None:
        """The layer class for modules of type ``cls`` (found along its MRO), or None."""
        for base in cls.__mro__:
            found = self._types.get(base)
            if found is not None:
                return found
            found = self._by_name.get((base.__module__, base.__qualname__))
            if found is not None:
                mod = sys.modules.get(base.__module__)
                if mod is not None and getattr(mod, base.__qualname__, None) is base:
                    return found
        return None

    def kinds(self) -> list[str]:
        """Every supported kind, by name (for messages and the docs)."""
        names = [t.__name__ for t in self._types]
        names += [f"{m.split('.')[0]}:{q}" for m, q in self._by_name]
        return names


layer_registry = LayerRegistry()
for _type, _cls in ((nn.Linear, DendriticLinear), (nn.Conv1d, DendriticConv), (nn.Conv2d, DendriticConv),
                    (nn.Conv3d, DendriticConv), (nn.MultiheadAttention, DendriticMultiheadAttention),
                    (nn.RNNCell, DendriticRecurrentCell), (nn.GRUCell, DendriticRecurrentCell),
                    (nn.LSTMCell, DendriticRecurrentCell), (nn.RNN, DendriticRNN), (nn.GRU, DendriticGRU),
                    (nn.LSTM, DendriticLSTM)):
    layer_registry.register(_type, _cls)
layer_registry.register_by_name("transformers.pytorch_utils.Conv1D", DendriticTransposedLinear)
layer_registry.register_by_name("torch_geometric.nn.dense.linear.Linear", DendriticLinear)


def register_layer(module_type: type, layer_class: type) -> type | None:
    """Let :func:`apical.perforate` wrap modules of ``module_type`` with ``layer_class``.

    ``layer_class`` is a :class:`~apical.DendriticLayer` subclass: :class:`~apical.DendriticLinear`
    for any module computing ``F.linear(x, self.weight, self.bias)`` over inputs ``[..., in]``,
    :class:`~apical.DendriticConv` for ``nn.ConvNd``-like modules, or a subclass of your own
    (override ``neuron_weight_of`` when the weight is not stored neuron-major). Returns the entry
    it replaces, if any."""
    return layer_registry.register(module_type, layer_class)


def unregister_layer(module_type: type) -> type:
    """Remove ``module_type``'s entry from the registry; returns it."""
    return layer_registry.unregister(module_type)


def layer_class_for(module: nn.Module) -> type | None:
    """The layer class that can wrap ``module`` (by type), or None."""
    return layer_registry.lookup(type(module))


def is_dendritic_root(module: nn.Module) -> bool:
    """True for a module that perforate put in place of an original one."""
    return isinstance(module, (DendriticLayer, DendriticMultiheadAttention, _DendriticRecurrent))
