"""Model-level operations: wrap modules in dendritic layers, find them, count, undo."""

from __future__ import annotations

import re

from torch import nn

from apical.dendrites.config import DEFAULT_TYPES, DendriteConfig
from apical.dendrites.layer import LAYER_TYPES, DendriticLayer, layer_class_for, layer_class_for_type

# containers that read their children's weights directly instead of calling them
_OPAQUE_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


class PerforationError(ValueError):
    """The model or the include/exclude selection cannot be perforated as asked."""


def dendritic_layers(model: nn.Module) -> list[tuple[str, DendriticLayer]]:
    """Every dendritic layer of ``model`` with its qualified name, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DendriticLayer)]


def _matches(name: str, module: nn.Module, selector: str | type) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return name == selector or re.fullmatch(selector, name) is not None


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _select(model: nn.Module, config: DendriteConfig) -> list[str]:
    """Names of the modules to wrap; raises on selections that cannot be honoured."""
    names = dict(model.named_modules())
    opaque = {
        f"{pname}.{cname}" if pname else cname
        for pname, parent in names.items()
        if isinstance(parent, _OPAQUE_PARENTS)
        for cname, _ in parent.named_children()
    }
    def wrappable(name: str, module: nn.Module) -> bool:
        return (
            layer_class_for(module) is not None
            and name not in opaque
        )

    selected: list[str] = []
    if config.include is None:
        for name, module in names.items():
            if name and wrappable(name, module) and isinstance(module, DEFAULT_TYPES):
                selected.append(name)
    else:
        for sel in config.include:
            hits = [n for n, m in names.items() if n and _matches(n, m, sel)]
            exact = isinstance(sel, str) and sel in names
            if isinstance(sel, type) and layer_class_for_type(sel) is None:
                raise PerforationError(
                    f"include: apical cannot wrap {sel.__name__}; supported types are "
                    f"{sorted(t.__name__ for t in LAYER_TYPES)}"
                )
            if not hits:
                raise PerforationError(
                    f"include: {sel!r} matches no module of the model; names look like "
                    f"{[n for n in names if n][:5]}"
                )
            if exact:
                module = names[sel]
                if not wrappable(sel, module):
                    why = ("it sits inside a module that reads its weights directly"
                           if sel in opaque else "its type is not supported")
                    raise PerforationError(
                        f"include: cannot wrap {sel!r} ({type(module).__name__}): {why}; supported "
                        f"types are {sorted(t.__name__ for t in LAYER_TYPES)}"
                    )
                good = [sel]
            else:
                good = [n for n in hits if wrappable(n, names[n])]
                if not good:
                    raise PerforationError(
                        f"include: {sel!r} matches only modules apical cannot wrap: "
                        f"{[(n, type(names[n]).__name__) for n in hits][:5]}"
                    )
            selected.extend(n for n in good if n not in selected)
    selected = [
        n for n in selected if not any(_matches(n, names[n], sel) for sel in config.exclude)
    ]
    return selected


def perforate(model: nn.Module, config: DendriteConfig | None = None) -> nn.Module:
    """Wrap the selected Linear/Conv modules of ``model`` in dendritic layers, in place.

    Each original module becomes the ``base`` child of its wrapper, so its Parameter objects
    are kept (references taken before still train). Returns ``model`` itself.
    """
    config = config or DendriteConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"perforate expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DendriticLayer) or dendritic_layers(model):
        raise PerforationError("the model is already perforated; call apical.unwrap(model) first")
    if layer_class_for(model) is not None:
        raise PerforationError(
            "the model itself is a single Linear/Conv module: put it inside a container "
            "(e.g. nn.Sequential(layer)) so that it can be replaced in place"
        )
    names = _select(model, config)
    if not names:
        raise PerforationError(
            "nothing to wrap: the model has no nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d "
            "(outside excluded names), so dendrites have nowhere to go"
        )
    for name in names:
        parent, attr = _parent(model, name)
        base = getattr(parent, attr)
        wrapper = layer_class_for(base)(base, activation=config.activation)
        wrapper.normaliser = config.normaliser
        wrapper.centring = config.centring
        wrapper.candidate_scale = float(config.candidate_lr_scale)
        wrapper.set_training_mode("neuron", perforated=config.mode == "pb")
        wrapper.train(base.training)
        setattr(parent, attr, wrapper)
    return model


def unwrap(model: nn.Module, force: bool = False) -> nn.Module:
    """Put every wrapped module back in place of its dendritic layer, in place.

    Refuses when a layer still holds dendrites (they would be lost) unless ``force``.
    """
    layers = dendritic_layers(model)
    kept = [n for n, layer in layers if layer.num_dendrites or layer.num_candidates]
    if kept and not force:
        raise PerforationError(
            f"layers {kept[:5]} hold dendrites; apical.export(model) keeps them in a plain module, "
            "or pass force=True to drop them"
        )
    for name, layer in layers:
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer.base)
    return model


def dendrite_count(model: nn.Module) -> int:
    """Installed dendrite sets: the largest count over the model's dendritic layers."""
    return max((layer.num_dendrites for _, layer in dendritic_layers(model)), default=0)


def parameter_count(model: nn.Module, include_candidates: bool = False) -> int:
    """Parameters of the network as it computes (candidates excluded unless asked)."""
    skip = set()
    if not include_candidates:
        for _, layer in dendritic_layers(model):
            for p in (layer.candidate_weight, layer.candidate_bias, layer.candidate_cascade):
                if p is not None:
                    skip.add(id(p))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """The growth record: per dendritic layer, installed sets and candidates."""
    return {
        name: {"dendrites": layer.num_dendrites, "candidates": layer.num_candidates}
        for name, layer in dendritic_layers(model)
    }


def apply_structure(model: nn.Module, record: dict[str, dict[str, int]]) -> None:
    """Resize the model's dendritic layers to a growth record (zero-filled), e.g. before
    loading a state dict saved from a grown model."""
    layers = dict(dendritic_layers(model))
    missing = sorted(set(record) - set(layers))
    extra = sorted(set(layers) - set(record))
    if missing or extra:
        raise PerforationError(
            f"structure does not fit the model: layers {missing[:5]} recorded but not in the model, "
            f"{extra[:5]} in the model but not recorded"
        )
    for name, entry in record.items():
        d, c = int(entry["dendrites"]), int(entry.get("candidates", 0))
        if d < 0 or c < 0:
            raise PerforationError(f"structure: negative count for layer {name!r}")
        layer = layers[name]
        if (layer.num_dendrites, layer.num_candidates) != (d, c):  # keep Parameter objects that fit
            layer.resize(d, c)
