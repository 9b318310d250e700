"""The training cycle, driven from the user's own loop by one ``step(score)`` per epoch."""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from apical.dendrites import _dist
from apical.dendrites.config import DendriteConfig
from apical.dendrites.layer import DendriticLayer
from apical.dendrites.model import apply_structure, dendritic_layers, parameter_count, structure

log = logging.getLogger("apical")

STATE_VERSION = 1
_COUNTERS = (
    "phase", "epoch", "dendrites", "tries", "best", "best_epoch", "since", "accepted_score",
    "accepted_dendrites", "done", "dp_epochs", "dp_best", "dp_since",
)


@dataclass(frozen=True)
class Step:
    """What one call of :meth:`Controller.step` decided."""

    restructured: bool
    """The set of trainable parameters changed: rebuild the optimiser (and its schedule)."""
    done: bool
    """Training is over; the model holds the best network found."""
    phase: str
    """Phase of the next epoch: "neuron" or "dendrite"."""
    dendrites: int
    """Dendrite sets installed now."""
    epoch: int
    """Epochs seen so far (this one included)."""
    event: str
    """Comma-separated events of this step ("improved", "dendrite_phase", "installed", ...)."""
    score: float
    best_score: float | None
    """Best score of the current architecture (None right after a restructure)."""


class Controller:
    """Runs the Perforated Backpropagation cycle (or "gd", or plain early stopping).

    Call :meth:`step` once per epoch with the validation score. Train what
    :meth:`parameters` yields, and rebuild the optimiser whenever ``step`` says
    ``restructured``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DendriteConfig | None = None,
        maximize: bool = True,
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.config = config or DendriteConfig()
        self.maximize = bool(maximize)
        self.layers: list[tuple[str, DendriticLayer]] = dendritic_layers(model)
        if self.config.mode != "none" and not self.layers:
            raise ValueError(
                f'mode "{self.config.mode}" needs dendritic layers: call apical.perforate(model, config) '
                "before creating the Controller"
            )
        mismatch = [n for n, layer in self.layers if layer.activation != self.config.activation]
        if mismatch:
            raise ValueError(
                f"layers {mismatch[:3]} were perforated with another activation than the config's "
                f"{self.config.activation!r}: use the same DendriteConfig for perforate and Controller"
            )
        ranks = [n for n, layer in self.layers if layer.rank != self.config.dendrite_rank]
        if ranks:
            raise ValueError(
                f"layers {ranks[:3]} were perforated with another dendrite_rank than the config's "
                f"{self.config.dendrite_rank!r}: use the same DendriteConfig for perforate and Controller"
            )
        # a private generator, so that the controller's state alone resumes candidate draws
        seed = self.config.seed if self.config.seed is not None else int(torch.randint(2**62, ()))
        self._generator = torch.Generator().manual_seed(seed)
        own = self._dendrite_param_ids()
        self._base_flags = {n: p.requires_grad for n, p in model.named_parameters() if id(p) not in own}
        self._bn_momentum: dict[str, float | None] = {}
        self._forwards = 0
        self._correlation: float | None = None
        self._hook = model.register_forward_pre_hook(self._count_forward)
        self.history: list[dict[str, Any]] = []
        self.phase = "neuron"
        self.epoch = 0
        self.dendrites = max((layer.num_dendrites for _, layer in self.layers), default=0)
        self.tries = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.since = 0
        self.accepted_score: float | None = None
        self.accepted_dendrites = self.dendrites
        self.done = False
        self.dp_epochs = 0
        self.dp_best: float | None = None
        self.dp_since = 0
        self._best_state: dict[str, Tensor] | None = None
        self._accepted_state: dict[str, Tensor] | None = None
        self._dp_snapshot: dict[str, dict[str, Tensor]] | None = None
        self._apply_phase()
        self._record = None
        if run_dir is not None:  # opt-in run record: history.csv and summary.json, nothing else
            from apical.record import RunRecord

            self._record = RunRecord(run_dir)

    # ------------------------------------------------------------------ public API
    def parameters(self):
        """The parameters that train in the current phase (build the optimiser from these)."""
        return (p for p in self.model.parameters() if p.requires_grad)

    def close(self) -> None:
        """Detach the controller's forward hook from the model."""
        self._hook.remove()

    def step(self, score: float | Tensor) -> Step:
        """Record one epoch's validation score and take the cycle's decisions."""
        if self.done:
            raise RuntimeError("training is already done: the model holds the best network; stop calling step()")
        score = self._check_score(self._synchronise(score))
        if self._forwards == 0:
            raise RuntimeError(
                "step() was called before any training batch this epoch: run the epoch's training "
                "forward/backward passes with model.train() first"
            )
        candidate_scores = None
        if self.phase == "dendrite":  # read (and validate) the statistics before changing anything
            candidate_scores = {name: layer.candidate_scores() for name, layer in self.layers}
        self._forwards = 0
        self.epoch += 1
        trained_phase = self.phase
        events: list[str] = []
        self._correlation = None
        if trained_phase == "neuron":
            restructured = self._neuron_step(score, events)
        else:
            restructured = self._dendrite_step(candidate_scores, events)
        self.history.append({
            "epoch": self.epoch,
            "phase": trained_phase,
            "score": score,
            "best_score": self.best,
            "dendrites": self.dendrites,
            "parameters": parameter_count(self.model),
            "event": ",".join(events),
            "correlation": self._correlation,
        })
        if self._record is not None:
            self._record.on_step(self)
        for event in events:
            if event not in ("improved", "correlation_improved"):
                log.info("epoch %d: %s (dendrites=%d, score=%.6g)", self.epoch, event, self.dendrites, score)
        return Step(restructured, self.done, self.phase, self.dendrites, self.epoch, ",".join(events),
                    score, self.best)

    def finish(self) -> Step:
        """End training now (an epoch budget ran out): keep the current architecture if it
        beat the previous one, else revert it, and load the best weights."""
        if self.done:
            raise RuntimeError("training is already done")
        events: list[str] = ["finish"]
        restructured = False
        if self.phase == "dendrite":
            for _, layer in self.layers:
                layer.drop_candidates()
            restructured = True
        # _finish loads the accepted architecture's best weights (after the keep-or-revert decision)
        if self.dendrites > self.accepted_dendrites:
            restructured = not self._keep_or_revert(events) or restructured
        elif self._accepted_state is None:
            self._accept()
        self._finish(events)
        if self._record is not None:
            self._record.on_finish(self)
        score = self.accepted_score if self.accepted_score is not None else float("nan")
        return Step(restructured, True, self.phase, self.dendrites, self.epoch, ",".join(events), score,
                    self.best)

    # ------------------------------------------------------------------ decisions
    def _improved(self, new: float, old: float | None, dendrites: int) -> bool:
        if old is None:
            return True
        gain = new - old if self.maximize else old - new
        needed = max(self.config.threshold_for(dendrites) * abs(old), self.config.improvement_threshold_raw)
        return gain > needed

    def _neuron_step(self, score: float, events: list[str]) -> bool:
        cfg = self.config
        if self._improved(score, self.best, self.dendrites):
            self.best, self.best_epoch, self.since = score, self.epoch, 0
            self._best_state = self._snapshot()
            events.append("improved")
        else:
            self.since += 1
        if self.since == 0 or self.since < cfg.patience:
            return False
        # plateau: reload this architecture's best weights, then keep or revert
        self._load(self._best_state)
        events.append("plateau")
        if cfg.mode == "none":
            self._accept()
            return self._finish(events)
        if self.dendrites > self.accepted_dendrites:
            if not self._keep_or_revert(events):
                self.tries += 1
                if self.tries >= cfg.max_tries:
                    self._finish(events)
                    return True
        else:
            self._accept()
        if self.dendrites >= cfg.max_dendrites:
            return self._finish(events)
        self._start_next_set(events)
        return True

    def _keep_or_revert(self, events: list[str]) -> bool:
        """Decide on the set on trial: keep it if its architecture beat the previous one, else
        remove it and reload the previous architecture's best weights. True when kept."""
        if self.best is not None and self._improved(self.best, self.accepted_score, self.dendrites):
            self._accept()
            events.append("kept")
            return True
        for _, layer in self.layers:
            layer.remove_last()
        self.dendrites -= 1
        self._load(self._accepted_state)
        self.best, self._best_state = self.accepted_score, self._accepted_state
        events.append("reverted")
        return False

    def _accept(self) -> None:
        if self.dendrites > self.accepted_dendrites:
            self.tries = 0
        self.accepted_score, self._accepted_state = self.best, self._best_state
        self.accepted_dendrites = self.dendrites

    def _finish(self, events: list[str]) -> bool:
        self._load(self._accepted_state)
        self.done = True
        self.phase = "neuron"
        self._apply_phase()
        events.append("done")
        return False

    def _start_next_set(self, events: list[str]) -> None:
        cfg = self.config
        self.best, self._best_state, self.since = None, None, 0  # a new architecture: no best yet
        if cfg.mode == "gd":
            for _, layer in self.layers:
                layer.install_random(cfg.init_scale, self._generator)
            self.dendrites += 1
            events.append("added")
        else:
            for _, layer in self.layers:
                layer.add_candidates(cfg.candidates, cfg.init_scale, self._generator)
            self.phase = "dendrite"
            self.dp_epochs, self.dp_best, self.dp_since, self._dp_snapshot = 0, None, 0, None
            events.append("dendrite_phase")
        self._apply_phase()

    def _dendrite_step(self, candidate_scores: dict[str, Tensor], events: list[str]) -> bool:
        cfg = self.config
        neurons = sum(s.shape[1] for s in candidate_scores.values())
        total = float(sum(s.max(dim=0).values.sum() for s in candidate_scores.values())) / max(neurons, 1)
        self._correlation = total
        self.dp_epochs += 1
        if self.dp_best is None or total > self.dp_best * (1 + cfg.dendrite_improvement):
            self.dp_best, self.dp_since = total, 0
            self._dp_snapshot = {
                name: {
                    "weight": layer.candidate_weight.detach().clone(),
                    "bias": layer.candidate_bias.detach().clone(),
                    "cascade": layer.candidate_cascade.detach().clone(),
                    "scores": candidate_scores[name].clone(),
                    "signs": layer.stats.signs(),
                    **({} if layer.candidate_proj is None else {"proj": layer.candidate_proj.detach().clone()}),
                }
                for name, layer in self.layers
            }
            events.append("correlation_improved")
        else:
            self.dp_since += 1
        for _, layer in self.layers:
            layer.stats.reset()
        finished = self.dp_epochs >= cfg.max_dendrite_epochs or self.dp_since >= cfg.dendrite_patience
        if self.dp_epochs < cfg.min_dendrite_epochs or not finished:
            return False
        for name, layer in self.layers:
            snap = self._dp_snapshot[name]
            with torch.no_grad():
                layer.candidate_weight.copy_(snap["weight"])
                layer.candidate_bias.copy_(snap["bias"])
                layer.candidate_cascade.copy_(snap["cascade"])
                if layer.candidate_proj is not None:
                    layer.candidate_proj.copy_(snap["proj"])
            layer.install_best(snap["scores"], cfg.output_init, snap["signs"])
        self._dp_snapshot = None
        self.dendrites += 1
        self.phase = "neuron"
        self.best, self._best_state, self.since = None, None, 0  # a new architecture: no best yet
        self._apply_phase()
        events.append("installed")
        return True

    # ------------------------------------------------------------------ helpers
    def _check_score(self, score: float | Tensor) -> float:
        if isinstance(score, Tensor):
            if score.numel() != 1:
                raise ValueError(f"step() needs one scalar score, got a tensor of shape {tuple(score.shape)}")
            score = score.item()
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise TypeError(f"step() needs a number, got {type(score).__name__}") from None
        if not math.isfinite(value):
            raise ValueError(
                f"step() got a non-finite validation score ({value}); check the loss for divergence "
                "(learning rate, NaN inputs) before continuing"
            )
        return value

    def _synchronise(self, score: float | Tensor) -> float | Tensor:
        """Under torch.distributed (world > 1): the mean of every rank's score, so that every rank
        takes the same decisions; also checks that the ranks agree on the cycle's state and on the
        dendrite phase's statistics (identical by construction). One small all-gather per epoch."""
        world = _dist.world_size()
        if world == 1:
            return score
        try:
            value, error = self._check_score(score), None
        except (TypeError, ValueError) as err:  # still take part in the gather: no rank may hang
            value, error = math.nan, err
        stats = [layer.stats for _, layer in self.layers if layer.stats is not None and not layer.stats.empty]
        mine = [value, self.epoch, self.dendrites, float(self.phase == "dendrite"),
                sum(s.n for s in stats), math.fsum(float(s.flat().sum()) for s in stats)]
        rows = _dist.all_gather(torch.tensor(mine, dtype=torch.float64)).tolist()
        if error is not None:
            raise error
        ref = rows[0]
        for rank, row in enumerate(rows):
            if row[1:5] != ref[1:5] or abs(row[5] - ref[5]) > 1e-9 * max(abs(ref[5]), 1.0):
                raise RuntimeError(
                    f"apical: rank {rank} disagrees with rank 0 at step() (epoch, dendrites, dendrite phase, "
                    f"observations, statistics checksum: {row[1:]} vs {ref[1:]}); every rank must train the "
                    "same number of batches per epoch and call step() once per epoch"
                )
        return math.fsum(r[0] for r in rows) / world

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._forwards += 1

    def _dendrite_param_ids(self) -> set[int]:
        ids: set[int] = set()
        for _, layer in self.layers:
            for p in (*layer.dendrite_parameters(), *layer.candidate_parameters()):
                ids.add(id(p))
        return ids

    def _apply_phase(self) -> None:
        """Set requires_grad and BatchNorm momentum for the current phase."""
        neuron = self.phase == "neuron"
        base_trains = neuron and not (self.config.freeze_base_after_install and self.dendrites > 0 and not self.done)
        for _, layer in self.layers:
            layer.set_training_mode(self.phase, perforated=self.config.mode == "pb")
        own = self._dendrite_param_ids()
        for name, p in self.model.named_parameters():
            if id(p) not in own:
                p.requires_grad_(self._base_flags.get(name, True) and base_trains)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not neuron and name not in self._bn_momentum:
                    self._bn_momentum[name] = module.momentum
                    module.momentum = 0.0  # running statistics stay frozen in the dendrite phase
                elif neuron and name in self._bn_momentum:
                    module.momentum = self._bn_momentum.pop(name)

    def _snapshot(self) -> dict[str, Any]:
        # a module's extra state (get_extra_state) may be any picklable value, not a tensor
        return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in self.model.state_dict().items()}

    def _load(self, state: dict[str, Tensor] | None) -> None:
        if state is not None:
            self.model.load_state_dict(state)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: counters, history, structure, best-weight snapshots."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "maximize": self.maximize,
            "counters": {k: getattr(self, k) for k in _COUNTERS},
            "history": [dict(h) for h in self.history],
            "structure": structure(self.model),
            "best_state": self._best_state,
            "accepted_state": self._accepted_state,
            "dp_snapshot": self._dp_snapshot,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a controller saved by :meth:`state_dict`.

        The model's dendritic layers are resized to the recorded structure (zero-filled): load
        the model's own weights afterwards (``apical.load`` does both).
        """
        required = {"version", "config", "maximize", "counters", "history", "structure"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"controller state is missing {sorted(missing)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"controller state version {state['version']!r} is not supported (this apical reads "
                f"version {STATE_VERSION})"
            )
        saved_config = {k: v for k, v in state["config"].items() if k not in ("include", "exclude")}
        saved = DendriteConfig.from_dict(saved_config)  # include/exclude only matter to perforate
        if saved.mode != self.config.mode:
            raise ValueError(f"controller state is for mode {saved.mode!r}, this controller runs {self.config.mode!r}")
        counters = state["counters"]
        unknown = set(counters) ^ set(_COUNTERS)
        if unknown:
            raise ValueError(f"controller state counters do not match: {sorted(unknown)}")
        if counters["phase"] not in ("neuron", "dendrite"):
            raise ValueError(f"controller state has an unknown phase {counters['phase']!r}")
        layers = dict(self.layers)
        if set(state["structure"]) != set(layers):
            raise ValueError(
                f"controller state structure names layers {sorted(state['structure'])[:5]}, the model has "
                f"{sorted(layers)[:5]}"
            )
        apply_structure(self.model, state["structure"])
        for k in _COUNTERS:
            setattr(self, k, counters[k])
        self.maximize = bool(state["maximize"])
        self.history = [dict(h) for h in state["history"]]
        self._best_state = state.get("best_state")
        self._accepted_state = state.get("accepted_state")
        self._dp_snapshot = state.get("dp_snapshot")
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])
        self._forwards = 0
        self._apply_phase()
