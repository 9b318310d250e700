"""apical: artificial dendrites for any PyTorch network (Perforated Backpropagation), and GRAPES."""

from apical import distributed
from apical.checkpoint import CheckpointError, load, save
from apical.dendrites import (
    Controller,
    DendriteConfig,
    DendriticConv,
    DendriticLayer,
    DendriticLinear,
    PerforationError,
    Step,
    apply_structure,
    dendrite_count,
    dendritic_layers,
    parameter_count,
    perforate,
    structure,
    unwrap,
)
from apical.export import export

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Controller",
    "DendriteConfig",
    "DendriticConv",
    "DendriticLayer",
    "DendriticLinear",
    "PerforationError",
    "Step",
    "__version__",
    "apply_structure",
    "dendrite_count",
    "dendritic_layers",
    "export",
    "distributed",
    "load",
    "parameter_count",
    "perforate",
    "save",
    "structure",
    "unwrap",
]
