"""Configuration of dendritic training: one validated, immutable-by-convention dataclass."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

MODES = ("pb", "gd", "none")
ACTIVATIONS = ("sigmoid", "tanh", "relu")
NORMALISERS = ("error", "pearson")
CENTRING = ("batch", "epoch")


@dataclass
class DendriteConfig:
    """Everything that decides how dendrites are added and trained.

    Every field has a default; values are checked when the object is created, and a wrong
    value raises ``ValueError`` naming the field and what it accepts.
    """

    mode: str = "pb"
    """"pb": correlation-trained, perforated dendrites; "gd": dendrites trained jointly by
    gradient descent (the reference library's open variant); "none": no dendrites, the
    controller acts as plain early stopping."""

    activation: str = "sigmoid"
    """Dendrite non-linearity: "sigmoid", "tanh" or "relu"."""

    candidates: int = 4
    """Candidate dendrites trained per neuron per cycle ("pb"); the best-correlated one per
    neuron is installed."""

    dendrite_rank: int | None = None
    """Input weights of a dendrite set: ``None``, a full copy of the layer's weights (the paper's;
    ``O * F`` per set for ``O`` neurons of fan-in ``F``); an integer ``r``, a low-rank set: the
    input is projected to ``r`` features (for a convolution, an ``r``-channel convolution with
    the layer's kernel, ``r`` channels per group), which each neuron's dendrite reads through ``r``
    weights of its own, about ``r * (F + O)`` per set. The candidates of a dendrite phase share one
    projection per layer; each neuron installs its best candidate's ``r`` weights with it."""

    max_dendrites: int = 3
    """Most dendrite sets installed in a layer; training ends when this many are kept."""

    patience: int = 10
    """Neuron phase: epochs without improvement of the validation score before switching."""

    dendrite_patience: int = 4
    """Dendrite phase: epochs without a relative ``dendrite_improvement`` gain of the
    candidates' correlation score before they are installed."""

    dendrite_improvement: float = 0.02
    """Dendrite phase: relative gain of the summed best-candidate correlation that counts as
    progress."""

    max_dendrite_epochs: int = 30
    """Dendrite phase: hard cap on its length in epochs."""

    min_dendrite_epochs: int = 2
    """Dendrite phase: shortest length in epochs (the statistics of the first epoch are
    gathered while the candidates move fastest)."""

    improvement_threshold: float | Sequence[float] = (1e-3, 1e-4, 0.0)
    """Relative improvement of the validation score that counts as progress; a sequence is
    indexed by the number of installed dendrite sets (the last entry repeats)."""

    improvement_threshold_raw: float = 1e-5
    """Absolute floor: an improvement must also exceed this amount."""

    max_tries: int = 2
    """Tries per dendrite set: a set that does not beat the previous architecture is removed
    and fresh candidates are trained, at most this many times in all."""

    init_scale: float = 3.0
    """Candidate input weights start as ``randn * init_scale / sqrt(fan_in)``."""

    candidate_lr_scale: float = 10.0
    """Candidates learn this many times faster than the optimiser's learning rate (they are
    stored divided by it, for Adam-like and SGD optimisers alike), without a second optimiser."""

    output_init: float = 0.0
    """Initial dendrite-to-neuron weight of a new set. 0 keeps the network's function
    exactly at insertion; a positive value starts ``v = -sign(corr) * output_init``
    (Cascade-Correlation's signed start, "pb" only)."""

    freeze_base_after_install: bool = False
    """Once a dendrite set is installed, neuron phases train only the dendrites' own trainable
    tensors (v; in "gd" also the dendrites' input weights) and leave every original weight
    frozen, as Cascade-Correlation trains only the output weights after adding a unit. For
    networks that overfit as soon as training continues (measured on Tox21). Default False: the
    method as published, where neuron phases train every original weight."""

    normaliser: str = "error"
    """Correlation normaliser: "error" divides the covariance by the error's standard
    deviation (Cascade-Correlation); "pearson" also by the candidate's (a true correlation)."""

    centring: str = "batch"
    """How the error is centred in the candidates' gradient: by the mean of the current
    mini-batch ("batch") or the running mean of the epoch so far ("epoch")."""

    include: Sequence[str | type[nn.Module]] | None = None
    """Which modules get dendrites: module types, exact names, or regular expressions over
    ``model.named_modules()`` names. ``None`` wraps every module of a kind apical supports
    (``apical.layer_registry``: Linear, Conv1d/2d/3d, MultiheadAttention, and the registered
    kinds of other libraries); ``apical.coverage(model)`` lists what was left out and why."""

    exclude: Sequence[str | type[nn.Module]] = field(default_factory=tuple)
    """Modules never wrapped, in the same forms as ``include``."""

    seed: int | None = None
    """Seed for candidate and dendrite initialisation (a private generator); ``None`` draws
    from torch's global generator."""

    def __post_init__(self) -> None:
        self._check_choice("mode", MODES)
        self._check_choice("activation", ACTIVATIONS)
        self._check_choice("normaliser", NORMALISERS)
        self._check_choice("centring", CENTRING)
        for name in ("candidates", "max_tries", "max_dendrite_epochs", "min_dendrite_epochs"):
            self._check_int(name, minimum=1)
        for name in ("max_dendrites", "patience", "dendrite_patience"):
            self._check_int(name, minimum=0)
        if self.dendrite_rank is not None:
            self._check_int("dendrite_rank", minimum=1)
        if self.min_dendrite_epochs > self.max_dendrite_epochs:
            raise ValueError(
                f"DendriteConfig.min_dendrite_epochs ({self.min_dendrite_epochs}) exceeds "
                f"max_dendrite_epochs ({self.max_dendrite_epochs})"
            )
        if not isinstance(self.freeze_base_after_install, bool):
            raise ValueError("DendriteConfig.freeze_base_after_install must be True or False, "
                             f"got {self.freeze_base_after_install!r}")
        for name in ("init_scale", "candidate_lr_scale"):
            self._check_float(name, positive=True)
        for name in ("output_init", "improvement_threshold_raw", "dendrite_improvement"):
            self._check_float(name, positive=False)
        thr = self.improvement_threshold
        values = [thr] if isinstance(thr, (int, float)) else list(thr)
        if not values or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) for v in values
        ):
            raise ValueError(
                "DendriteConfig.improvement_threshold must be a non-negative number or a non-empty "
                f"sequence of them, got {thr!r}"
            )
        if not isinstance(thr, (int, float)):
            self.improvement_threshold = tuple(float(v) for v in values)
        if self.include is not None:
            if isinstance(self.include, (str, type)):
                raise ValueError(
                    "DendriteConfig.include must be a sequence, e.g. include=['fc1'] or [nn.Linear]"
                )
            self.include = tuple(self.include)
            if not self.include:
                raise ValueError("DendriteConfig.include is empty: pass None to wrap the default types")
            self._check_selectors("include")
        if isinstance(self.exclude, (str, type)):
            raise ValueError("DendriteConfig.exclude must be a sequence, e.g. exclude=['head']")
        self.exclude = tuple(self.exclude)
        self._check_selectors("exclude")

    # validation helpers -----------------------------------------------------------------
    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"DendriteConfig.{name} must be one of {choices}, got {value!r}")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"DendriteConfig.{name} must be an integer >= {minimum}, got {value!r}")

    def _check_float(self, name: str, positive: bool) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        ok = ok and (value > 0 if positive else value >= 0) and value != float("inf")
        if not ok:
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"DendriteConfig.{name} must be a finite number {bound}, got {value!r}")

    def _check_selectors(self, name: str) -> None:
        for sel in getattr(self, name):
            if isinstance(sel, type) and issubclass(sel, nn.Module):
                continue
            if isinstance(sel, str):
                try:
                    re.compile(sel)
                except re.error as err:
                    raise ValueError(f"DendriteConfig.{name}: {sel!r} is not a valid regex ({err})") from None
                continue
            raise ValueError(
                f"DendriteConfig.{name} entries must be nn.Module types or strings, got {sel!r}"
            )

    # derived values -----------------------------------------------------------------------
    def threshold_for(self, dendrites: int) -> float:
        """The relative improvement threshold in force with ``dendrites`` sets installed."""
        thr = self.improvement_threshold
        if isinstance(thr, (int, float)):
            return float(thr)
        values = list(thr)
        return float(values[min(dendrites, len(values) - 1)])

    def to_dict(self) -> dict:
        """A JSON-friendly copy (module types are written by qualified name)."""
        out = dataclasses.asdict(self)
        for key in ("include", "exclude"):
            if out[key] is not None:
                out[key] = [s if isinstance(s, str) else f"type:{s.__module__}.{s.__qualname__}"
                            for s in out[key]]
        if not isinstance(out["improvement_threshold"], (int, float)):
            out["improvement_threshold"] = list(out["improvement_threshold"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DendriteConfig:
        """Inverse of :meth:`to_dict` for types from ``torch.nn``; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"DendriteConfig: unknown field(s) {sorted(unknown)}")
        data = dict(data)
        for key in ("include", "exclude"):
            if data.get(key) is not None:
                data[key] = [_resolve_type(s) if s.startswith("type:") else s for s in data[key]]
        return cls(**data)


def _resolve_type(spec: str) -> type[nn.Module]:
    path = spec[len("type:"):]
    module_name, _, qual = path.rpartition(".")
    if not module_name.startswith("torch.nn"):
        raise ValueError(f"DendriteConfig: cannot restore module type {path!r}; only torch.nn types")
    obj = getattr(nn, qual, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"DendriteConfig: unknown module type {path!r}")
    return obj


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in this file's source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(DendriteConfig)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_reference() -> str:
    """The Markdown configuration reference (docs/config.md), generated from the docstrings."""
    docs = field_docs()
    lines = [
        "# DendriteConfig reference",
        "",
        "Generated from the field docstrings of `apical.DendriteConfig` by",
        "`python -m apical.dendrites.config > docs/config.md`; a test keeps it current.",
        "",
        "| field | default | meaning |",
        "| --- | --- | --- |",
    ]
    for f in dataclasses.fields(DendriteConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"| `{f.name}` | `{default!r}` | {docs[f.name]} |")  # every field has a docstring
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
