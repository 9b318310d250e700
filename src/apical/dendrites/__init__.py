"""Dendritic layers trained by Perforated Backpropagation ("pb") or gradient descent ("gd")."""

from apical.dendrites.config import DendriteConfig
from apical.dendrites.controller import Controller, Step
from apical.dendrites.layer import DendriticConv, DendriticLayer, DendriticLinear
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

__all__ = [
    "Controller",
    "DendriteConfig",
    "DendriticConv",
    "DendriticLayer",
    "DendriticLinear",
    "PerforationError",
    "Step",
    "apply_structure",
    "dendrite_count",
    "dendritic_layers",
    "parameter_count",
    "perforate",
    "structure",
    "unwrap",
]
