import copy

import pytest
import torch
from torch import nn

import apical
from apical import Controller, DendriteConfig


def _setup(mode="pb", maximize=True, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    kwargs = dict(
        mode=mode, patience=2, dendrite_patience=100, min_dendrite_epochs=1, max_dendrite_epochs=2,
        max_dendrites=2, max_tries=2, improvement_threshold=0.0, improvement_threshold_raw=0.0, seed=0,
    )
    kwargs.update(overrides)
    cfg = DendriteConfig(**kwargs)
    apical.perforate(model, cfg)
    return model, Controller(model, cfg, maximize=maximize)


def _epoch(model, ctl):
    """One tiny training epoch that really changes the weights."""
    opt = torch.optim.SGD(list(ctl.parameters()), lr=0.1)
    model.train()
    opt.zero_grad()
    model(torch.randn(16, 3)).pow(2).mean().backward()
    opt.step()


def _run(model, ctl, scores):
    steps, states = [], []
    for s in scores:
        _epoch(model, ctl)
        states.append(copy.deepcopy(model.state_dict()))
        steps.append(ctl.step(s))
    return steps, states


# arch 0 plateaus at 2; arch 1 improves to 2.5 and is kept; arch 2 fails twice and is reverted
SCRIPT = [1, 2, 2, 2,          # epochs 1-4: neuron phase, plateau at epoch 4 -> dendrite phase
          0, 0,                # epochs 5-6: dendrite phase (2 epochs) -> installed
          1.5, 2.5, 2.5, 2.5,  # epochs 7-10: plateau, 2.5 > 2 -> kept -> dendrite phase
          0, 0,                # epochs 11-12: installed (2 sets)
          2.0, 2.0, 2.0,       # epochs 13-15: plateau, 2.0 < 2.5 -> reverted, retry
          0, 0,                # epochs 16-17: installed again
          2.4, 2.4, 2.4]       # epochs 18-20: reverted again -> tries exhausted -> done
EXPECTED = {
    4: ("plateau,dendrite_phase", True, "dendrite", 0),
    6: ("installed", True, "neuron", 1),
    10: ("plateau,kept,dendrite_phase", True, "dendrite", 1),
    12: ("installed", True, "neuron", 2),
    15: ("plateau,reverted,dendrite_phase", True, "dendrite", 1),
    17: ("installed", True, "neuron", 2),
    20: ("plateau,reverted,done", True, "neuron", 1),
}


@pytest.mark.parametrize("maximize", [True, False])
def test_scripted_pb_decisions(maximize):
    model, ctl = _setup("pb", maximize)
    sign = 1 if maximize else -1
    steps, states = _run(model, ctl, [sign * s for s in SCRIPT])
    for i, step in enumerate(steps, start=1):
        if i in EXPECTED:
            event, restructured, phase, dendrites = EXPECTED[i]
            assert (step.event.replace("correlation_improved,", ""), step.restructured, step.phase,
                    step.dendrites) == (event, restructured, phase, dendrites), i
        else:
            assert not step.restructured and not step.done, i
    assert steps[-1].done and not any(s.done for s in steps[:-1])
    assert apical.dendrite_count(model) == 1
    # the model holds the weights of the best epoch of the kept architecture (epoch 8)
    best = states[7]
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    assert [h["epoch"] for h in ctl.history] == list(range(1, 21))
    assert ctl.history[4]["phase"] == "dendrite" and ctl.history[4]["correlation"] > 0
    with pytest.raises(RuntimeError, match="already done"):
        ctl.step(1.0)


def test_parameters_follow_the_phase():
    model, ctl = _setup("pb")
    names = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    # tensors of size zero (no dendrite set yet, no cascade into a first candidate) never require grad
    assert names() == {"0.base.weight", "0.base.bias", "2.base.weight", "2.base.bias"}
    assert model[0].dendrite_out.numel() == 0
    _run(model, ctl, [1, 1, 1])
    assert ctl.phase == "dendrite"
    assert names() == {f"{i}.candidate_{k}" for i in (0, 2) for k in ("weight", "bias")}
    assert model[0].candidate_cascade.numel() == 0
    assert {id(p) for p in ctl.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["pb", "gd"])
def test_freeze_base_after_install_trains_only_the_dendrites(mode):
    model, ctl = _setup(mode, freeze_base_after_install=True)
    base = {"0.base.weight", "0.base.bias", "2.base.weight", "2.base.bias"}
    own = {"0.dendrite_out", "2.dendrite_out"}
    if mode == "gd":  # gd trains the dendrites' input weights too
        own |= {f"{i}.dendrite_{k}" for i in (0, 2) for k in ("weight", "bias", "cascade")}
    names = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert names() == base  # the first neuron phase: as published (no set yet: no dendrite tensor trains)
    steps, _ = _run(model, ctl, [1, 1, 1] if mode == "gd" else [1, 1, 1, 0, 0])
    assert steps[-1].restructured and ctl.phase == "neuron" and ctl.dendrites == 1
    assert names() == own
    for p in model.parameters():
        p.grad = None
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in base}
    _epoch(model, ctl)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters() if n in base)
    assert model[2].dendrite_out.grad is not None
    ctl.finish()  # done: every original weight trainable again, for whatever the user does next
    assert base <= names()


def test_user_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    cfg = DendriteConfig(patience=1, max_dendrite_epochs=1, min_dendrite_epochs=1)
    apical.perforate(model, cfg)
    ctl = Controller(model, cfg)
    _run(model, ctl, [1, 1, 0])  # through a dendrite phase and back
    assert ctl.phase == "neuron" and ctl.dendrites == 1
    assert not model[0].base.weight.requires_grad and model[0].base.bias.requires_grad


def test_gd_adds_random_sets_until_the_cap():
    model, ctl = _setup("gd", max_dendrites=2)
    steps, _ = _run(model, ctl, [1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert [s.event for s in steps if s.restructured] == ["plateau,added", "plateau,kept,added"]
    assert steps[-1].done and ctl.dendrites == 2
    assert all(s.phase == "neuron" for s in steps)
    assert model[2].dendrite_weight.requires_grad  # gd: dendrites train jointly


def test_none_mode_is_early_stopping_with_best_weights():
    model, ctl = _setup("none", maximize=False)
    steps, states = _run(model, ctl, [3, 1, 2, 2])
    assert steps[-1].done and steps[-1].event == "plateau,done"
    assert all(torch.equal(states[1][k], v) for k, v in model.state_dict().items())
    assert apical.dendrite_count(model) == 0


def test_none_mode_on_an_unperforated_model():
    model = nn.Sequential(nn.Linear(3, 2))
    ctl = Controller(model, DendriteConfig(mode="none", patience=1))
    steps, states = _run(model, ctl, [1.0, 0.5])
    assert steps[-1].done and all(torch.equal(states[0][k], v) for k, v in model.state_dict().items())


def test_thresholds_relative_and_raw():
    model, ctl = _setup("none", patience=1, improvement_threshold=[0.1], improvement_threshold_raw=0.0)
    steps, _ = _run(model, ctl, [1.0, 1.05])  # +5% < 10%: not an improvement
    assert steps[-1].done
    model, ctl = _setup("none", patience=1, improvement_threshold=0.0, improvement_threshold_raw=0.5)
    steps, _ = _run(model, ctl, [1.0, 1.4])
    assert steps[-1].done
    model, ctl = _setup("none", patience=1, improvement_threshold=0.0, improvement_threshold_raw=0.5)
    steps, _ = _run(model, ctl, [1.0, 1.6])
    assert not steps[-1].done


def test_state_dict_round_trip_gives_identical_decisions():
    model, ctl = _setup("pb")
    _run(model, ctl, SCRIPT[:11])  # stop inside the second dendrite phase
    state = ctl.state_dict()
    torch.manual_seed(5)
    fresh_model = apical.perforate(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
                                   copy.deepcopy(ctl.config))
    fresh = Controller(fresh_model, ctl.config)
    fresh.load_state_dict(state)
    fresh_model.load_state_dict(model.state_dict())
    assert apical.structure(fresh_model) == apical.structure(model)
    assert fresh.phase == "dendrite" and fresh.history == ctl.history
    torch.manual_seed(9)
    a, _ = _run(model, ctl, SCRIPT[11:])
    torch.manual_seed(9)
    b, _ = _run(fresh_model, fresh, SCRIPT[11:])
    assert [(s.event, s.restructured, s.done) for s in a] == [(s.event, s.restructured, s.done) for s in b]
    assert all(torch.equal(v, fresh_model.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), torch.tensor([1.0, 2.0]), "high"])
def test_bad_scores_raise_and_change_nothing(bad):
    model, ctl = _setup("pb")
    _run(model, ctl, [1, 2])
    _epoch(model, ctl)
    before = copy.deepcopy(ctl.state_dict())
    with pytest.raises((ValueError, TypeError)):
        ctl.step(bad)
    after = ctl.state_dict()
    assert after["counters"] == before["counters"] and after["history"] == before["history"]
    ctl.step(3.0)  # still usable


def test_step_before_any_training_batch():
    model, ctl = _setup("pb")
    with pytest.raises(RuntimeError, match="before any training batch"):
        ctl.step(1.0)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3))  # a validation pass does not count
    with pytest.raises(RuntimeError, match="before any training batch"):
        ctl.step(1.0)
    assert ctl.epoch == 0 and not ctl.history


def test_dendrite_phase_without_backward_is_refused():
    model, ctl = _setup("pb")
    _run(model, ctl, [1, 1, 1])
    assert ctl.phase == "dendrite"
    model.train()
    model(torch.randn(4, 3))  # forward without backward: no statistics
    with pytest.raises(RuntimeError, match="no correlation statistics"):
        ctl.step(1.0)
    assert ctl.epoch == 3


def test_controller_needs_a_perforated_model_for_pb():
    with pytest.raises(ValueError, match="perforate"):
        Controller(nn.Sequential(nn.Linear(2, 2)), DendriteConfig(mode="pb"))


def test_batchnorm_statistics_frozen_in_dendrite_phase():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    cfg = DendriteConfig(patience=1, max_dendrite_epochs=1, min_dendrite_epochs=1)
    apical.perforate(model, cfg)
    ctl = Controller(model, cfg)
    _run(model, ctl, [1, 1])
    assert ctl.phase == "dendrite"
    mean = model[1].running_mean.clone()
    _epoch(model, ctl)
    assert torch.equal(mean, model[1].running_mean)
    ctl.step(1.0)
    assert ctl.phase == "neuron" and model[1].momentum == 0.1


def test_finish_mid_dendrite_phase_keeps_the_best():
    model, ctl = _setup("pb")
    _, states = _run(model, ctl, [1, 2, 2, 2, 0])
    assert ctl.phase == "dendrite"
    step = ctl.finish()
    assert step.done and ctl.dendrites == 0 and model[0].num_candidates == 0
    assert all(torch.equal(states[1][k], v) for k, v in model.state_dict().items())


def test_finish_keeps_an_improving_trial_set():
    model, ctl = _setup("pb")
    _, states = _run(model, ctl, [1, 2, 2, 2, 0, 0, 3])
    step = ctl.finish()
    assert step.event == "finish,kept,done" and ctl.dendrites == 1
    assert all(torch.equal(states[6][k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode, scores", [("pb", [1, 2, 2, 2, 0, 0]), ("gd", [1, 2, 2, 2])])
def test_finish_right_after_a_restructure_reverts_to_the_kept_network(mode, scores):
    model, ctl = _setup(mode)
    _, states = _run(model, ctl, scores)
    assert ctl.dendrites == 1 and ctl.phase == "neuron"  # the set is in, not a single epoch trained yet
    step = ctl.finish()
    assert step.done and step.restructured and ctl.dendrites == 0
    assert all(torch.equal(states[1][k], v) for k, v in model.state_dict().items())
