"""Dendritic layers trained by Perforated Backpropagation ("pb") or gradient descent ("gd")."""

from apical.dendrites.attention import DendriticMultiheadAttention, DendriticProjection
from apical.dendrites.config import DendriteConfig
from apical.dendrites.controller import Controller, Step
from apical.dendrites.coverage import Coverage, CoverageEntry, coverage
from apical.dendrites.layer import DendriticConv, DendriticLayer, DendriticLinear, DendriticTransposedLinear
from apical.dendrites.model import (
    PerforationError,
    apply_structure,
    dendrite_count,
    dendritic_layers,
    parameter_count,
    perforate,
    structure,
    unwrap,
)
from apical.dendrites.recurrent import (
    DendriticGRU,
    DendriticGRUOnHidden,
    DendriticLSTM,
    DendriticLSTMOnHidden,
    DendriticRecurrentCell,
    DendriticRecurrentCellOnHidden,
    DendriticRNN,
    DendriticRNNOnHidden,
)
from apical.dendrites.registry import LayerRegistry, layer_registry, register_layer, unregister_layer

__all__ = [
    "Controller",
    "Coverage",
    "CoverageEntry",
    "DendriteConfig",
    "DendriticConv",
    "DendriticGRU",
    "DendriticGRUOnHidden",
    "DendriticLSTM",
    "DendriticLSTMOnHidden",
    "DendriticLayer",
    "DendriticLinear",
    "DendriticMultiheadAttention",
    "DendriticProjection",
    "DendriticRNN",
    "DendriticRNNOnHidden",
    "DendriticRecurrentCell",
    "DendriticRecurrentCellOnHidden",
    "DendriticTransposedLinear",
    "LayerRegistry",
    "PerforationError",
    "Step",
    "apply_structure",
    "coverage",
    "dendrite_count",
    "dendritic_layers",
    "parameter_count",
    "perforate",
    "layer_registry",
    "register_layer",
    "structure",
    "unregister_layer",
    "unwrap",
]
