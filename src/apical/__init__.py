"""apical: artificial dendrites for any PyTorch network (Perforated Backpropagation), and GRAPES."""

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

__version__ = "0.1.0"

__all__ = [
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
    "parameter_count",
    "perforate",
    "structure",
    "unwrap",
]
