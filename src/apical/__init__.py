"""apical: artificial dendrites for any PyTorch network (Perforated Backpropagation), and GRAPES."""

from apical import distributed
from apical.checkpoint import CheckpointError, load, save
from apical.dendrites import (
    Controller,
    Coverage,
    DendriteConfig,
    DendriticConv,
    DendriticLayer,
    DendriticLinear,
    DendriticMultiheadAttention,
    DendriticTransposedLinear,
    PerforationError,
    Step,
    apply_structure,
    coverage,
    dendrite_count,
    dendritic_layers,
    layer_registry,
    parameter_count,
    perforate,
    register_layer,
    structure,
    unregister_layer,
    unwrap,
)
from apical.export import export
from apical.trials import Task, TrialResult, trial

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Controller",
    "Coverage",
    "DendriteConfig",
    "DendriticConv",
    "DendriticLayer",
    "DendriticLinear",
    "DendriticMultiheadAttention",
    "DendriticTransposedLinear",
    "PerforationError",
    "Step",
    "Task",
    "TrialResult",
    "__version__",
    "apply_structure",
    "coverage",
    "dendrite_count",
    "dendritic_layers",
    "export",
    "distributed",
    "layer_registry",
    "load",
    "parameter_count",
    "perforate",
    "register_layer",
    "save",
    "structure",
    "trial",
    "unregister_layer",
    "unwrap",
]
