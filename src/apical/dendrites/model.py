"""Model-level operations: wrap modules in dendritic layers, find them, count, undo."""

from __future__ import annotations

import logging
import warnings

from torch import Tensor, nn

from apical.dendrites.config import DendriteConfig
from apical.dendrites.coverage import coverage
from apical.dendrites.layer import DendriticLayer
from apical.dendrites.registry import is_dendritic_root, layer_class_for, layer_registry
from apical.dendrites.selection import _matches, _opaque_children, _why_not

__all__ = ["PerforationError", "apply_structure", "dendrite_count", "dendritic_layers", "parameter_count",
           "perforate", "planned_layers", "roots_for", "structure", "unwrap"]

log = logging.getLogger("apical")

class PerforationError(ValueError):
    """The model or the include/exclude selection cannot be perforated as asked."""


def dendritic_layers(model: nn.Module) -> list[tuple[str, DendriticLayer]]:
    """Every dendritic layer of ``model`` with its qualified name, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DendriticLayer)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _lazy_error(name: str, module: nn.Module) -> PerforationError | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter) and layer_class_for(module) is not None:
        return PerforationError(
            f"{name!r} ({type(module).__name__}) is a lazy layer that is not initialised yet: run one forward "
            "pass through the model first (so that it knows its input size), then perforate"
        )
    return None


def _supported_text() -> str:
    return f"supported kinds are {layer_registry.kinds()} (apical.register_layer adds one)"


def _select(model: nn.Module, config: DendriteConfig) -> list[str]:
    """Names of the modules to wrap; raises on selections that cannot be honoured."""
    names = dict(model.named_modules())
    opaque = _opaque_children(names)

    def wrappable(name: str, module: nn.Module) -> bool:
        return name not in opaque and not is_dendritic_root(module) and _why_not(module) is None

    selected: list[str] = []
    if config.include is None:
        for name, module in names.items():
            if not name or name in opaque:
                continue
            err = _lazy_error(name, module)
            if err is not None:
                raise err
            if wrappable(name, module):
                selected.append(name)
    else:
        for sel in config.include:
            hits = [n for n, m in names.items() if n and _matches(n, m, sel)]
            exact = isinstance(sel, str) and sel in names
            if isinstance(sel, type) and layer_registry.lookup(sel) is None:
                raise PerforationError(f"include: apical cannot wrap {sel.__name__}; {_supported_text()}")
            if not hits:
                raise PerforationError(
                    f"include: {sel!r} matches no module of the model; names look like "
                    f"{[n for n in names if n][:5]}"
                )
            for n in hits:
                err = _lazy_error(n, names[n])
                if err is not None and n not in opaque:
                    raise err
            if exact:
                module = names[sel]
                if not wrappable(sel, module):
                    why = (f"it sits inside {opaque[sel]}, which reads its weights directly (wrap that module "
                           "instead)" if sel in opaque else _why_not(module) or "it is already wrapped")
                    raise PerforationError(f"include: cannot wrap {sel!r} ({type(module).__name__}): {why}; "
                                           f"{_supported_text()}")
                good = [sel]
            else:
                good = [n for n in hits if wrappable(n, names[n])]
                if not good:
                    raise PerforationError(
                        f"include: {sel!r} matches only modules apical cannot wrap: "
                        f"{[(n, type(names[n]).__name__) for n in hits][:5]}"
                    )
            selected.extend(n for n in good if n not in selected)
    for sel in config.exclude:  # an exclusion that cannot take effect is an error, as a bad include is
        if isinstance(sel, type):
            continue
        hits = [n for n, m in names.items() if n and _matches(n, m, sel)]
        parent, _, leaf = sel.rpartition(".")
        if not hits and not (leaf in ("q_proj", "k_proj", "v_proj")
                             and isinstance(names.get(parent), nn.MultiheadAttention)):
            raise PerforationError(f"exclude: {sel!r} matches no module of the model; names look like "
                                   f"{[n for n in names if n][:5]}")
        inner = [n for n in hits if n in opaque] or ([] if hits else [sel])
        for n in inner:
            root = next((r for r in selected if n.startswith(r + ".")), None)
            if root is not None and not any(_matches(root, names[root], s) for s in config.exclude):
                raise PerforationError(
                    f"exclude: {n!r} sits inside {root!r} ({type(names[root]).__name__}), which reads its "
                    f"weights directly and is wrapped as a whole; exclude {root!r} to leave it without dendrites")
    selected = [
        n for n in selected if not any(_matches(n, names[n], sel) for sel in config.exclude)
    ]
    # a module inside another selected one is handled by that one's wrapper (or not at all)
    roots: list[str] = []
    for n in sorted(selected, key=lambda n: (n.count("."), n)):
        if not any(n.startswith(r + ".") for r in roots):
            roots.append(n)
    keep = set(roots)
    return [n for n in selected if n in keep]


def planned_layers(model: nn.Module, config: DendriteConfig) -> dict[str, tuple[str, Tensor]]:
    """Each dendritic layer that ``perforate(model, config)`` would create, by qualified name:
    the name of the module it replaces or enters, and its neuron-major weight ``[O, *tail]``."""
    out: dict[str, tuple[str, Tensor]] = {}
    for root in _select(model, config):
        module = model.get_submodule(root)
        for rel, weight in layer_class_for(module).planned_layers(module).items():
            out[f"{root}.{rel}" if rel else root] = (root, weight)
    return out


def roots_for(model: nn.Module, layer_names) -> list[str]:
    """The module names to ``include`` so that perforating the un-perforated ``model`` creates the
    dendritic layers ``layer_names`` (e.g. ``attn.q_proj`` comes from the attention ``attn``)."""
    names = dict(model.named_modules())
    opaque = _opaque_children(names)
    roots: list[str] = []
    for name in layer_names:
        parts = name.split(".")
        found = name  # not found: let _select report it
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            module = names.get(prefix)
            if module is None or prefix in opaque or _why_not(module) is not None:
                continue
            rel = ".".join(parts[i:])
            if rel in layer_class_for(module).planned_layers(module):
                found = prefix
                break
        if found not in roots:
            roots.append(found)
    return roots


def _set_fast_paths(model: nn.Module, enabled: bool) -> None:
    """Turn off (and back on) torch's fused inference paths of Transformer encoder layers that
    hold dendrites: they read the layers' weights directly and would skip the dendrites."""
    for module in model.modules():
        saved = module.__dict__.get("_apical_fast_path")
        if enabled:
            if saved is not None:
                attr, value = saved
                setattr(module, attr, value)
                del module.__dict__["_apical_fast_path"]
            continue
        if saved is not None:
            continue
        attr = ("activation_relu_or_gelu" if isinstance(module, nn.TransformerEncoderLayer)
                else "use_nested_tensor" if isinstance(module, nn.TransformerEncoder) else None)
        if attr is None or not hasattr(module, attr):
            continue
        if any(isinstance(m, DendriticLayer) for m in module.modules()):
            module.__dict__["_apical_fast_path"] = (attr, getattr(module, attr))
            setattr(module, attr, False)  # torch reads both flags by their truth value


def perforate(model: nn.Module, config: DendriteConfig | None = None) -> nn.Module:
    """Wrap every supported module of ``model`` (or the ``include`` / ``exclude`` selection) in
    dendritic layers, in place.

    Each original module becomes the ``base`` child of its wrapper (an ``nn.MultiheadAttention``
    stays the same object and gains dendritic children), so its Parameter objects are kept
    (references taken before still train). Modules apical cannot wrap are left alone:
    :func:`apical.coverage` lists them with the reason. Logs a one-line coverage summary on the
    ``apical`` logger and warns when most layer parameters sit in modules left out.
    Returns ``model`` itself.
    """
    config = config or DendriteConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"perforate expects an nn.Module, got {type(model).__name__}")
    if is_dendritic_root(model) or dendritic_layers(model):
        raise PerforationError("the model is already perforated; call apical.unwrap(model) first")
    if layer_class_for(model) is not None:
        raise PerforationError(
            "the model itself is a single layer: put it inside a container "
            "(e.g. nn.Sequential(layer)) so that it can be replaced in place"
        )
    names = _select(model, config)
    if not names:
        raise PerforationError(
            "nothing to wrap: the model has no module apical supports (outside excluded names), so "
            f"dendrites have nowhere to go; {_supported_text()}. apical.coverage(model) lists every module"
        )
    for name in names:
        parent, attr = _parent(model, name)
        base = getattr(parent, attr)
        training = base.training
        wrapper = layer_class_for(base).wrap(base, activation=config.activation)
        for _, layer in dendritic_layers(wrapper):
            layer.normaliser = config.normaliser
            layer.centring = config.centring
            layer.candidate_scale = float(config.candidate_lr_scale)
            layer.set_rank(config.dendrite_rank)
            layer.set_training_mode("neuron", perforated=config.mode == "pb")
        wrapper.train(training)
        if wrapper is not base:
            setattr(parent, attr, wrapper)
    _set_fast_paths(model, enabled=False)

    report = coverage(model, config)
    log.info("perforate: %s", report.summary())
    if 2 * report.unreachable_parameters > report.layer_parameters:  # not by the user's own include/exclude
        warnings.warn(
            f"apical.perforate: {report.summary()}. Most layer parameters sit in modules left out; "
            "apical.coverage(model) says why for each", stacklevel=2,
        )
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
    roots: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and is_dendritic_root(module) and not any(name.startswith(r + ".") for r, _ in roots):
            roots.append((name, module))
    for name, module in roots:
        original = module.unwrapped()
        if original is not module:
            parent, attr = _parent(model, name)
            setattr(parent, attr, original)
    _set_fast_paths(model, enabled=True)
    return model


def dendrite_count(model: nn.Module) -> int:
    """Installed dendrite sets: the largest count over the model's dendritic layers."""
    return max((layer.num_dendrites for _, layer in dendritic_layers(model)), default=0)


def parameter_count(model: nn.Module, include_candidates: bool = False) -> int:
    """Parameters of the network as it computes (candidates excluded unless asked)."""
    skip = set()
    if not include_candidates:
        for _, layer in dendritic_layers(model):
            skip.update(id(p) for p in layer.candidate_parameters())
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
