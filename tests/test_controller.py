import copy
import logging
import math

import numpy as np
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
    with pytest.raises(RuntimeError, match="^training is already done: the model holds the best network; stop "
                       r"calling step\(\)$"):
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


NON_FINITE = ("step() got a non-finite validation score ({}); check the loss for divergence (learning rate, NaN "
              "inputs) before continuing")


@pytest.mark.parametrize("bad, error, message", [
    (float("nan"), ValueError, NON_FINITE.format("nan")),
    (float("inf"), ValueError, NON_FINITE.format("inf")),
    (-float("inf"), ValueError, NON_FINITE.format("-inf")),
    (torch.tensor([1.0, 2.0]), ValueError, "step() needs one scalar score, got a tensor of shape (2,)"),
    ("high", TypeError, "step() needs a number, got str"),
], ids=["nan", "inf", "-inf", "two-values", "text"])
def test_bad_scores_raise_and_change_nothing(bad, error, message):
    model, ctl = _setup("pb")
    _run(model, ctl, [1, 2])
    _epoch(model, ctl)
    before = copy.deepcopy(ctl.state_dict())
    with pytest.raises(error) as err:
        ctl.step(bad)
    assert str(err.value) == message
    after = ctl.state_dict()
    assert after["counters"] == before["counters"] and after["history"] == before["history"]
    ctl.step(3.0)  # still usable


def test_step_before_any_training_batch():
    model, ctl = _setup("pb")
    with pytest.raises(RuntimeError, match=r"^step\(\) was called before any training batch this epoch: run the "
                       r"epoch's training forward/backward passes with model.train\(\) first$"):
        ctl.step(1.0)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3))  # a validation pass does not count
    model(torch.randn(2, 3))  # nor one in eval mode with gradients on
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3))  # nor one in train mode without gradients
    with pytest.raises(RuntimeError, match="before any training batch"):
        ctl.step(1.0)
    assert ctl.epoch == 0 and not ctl.history
    model.train()
    _epoch(model, ctl)
    ctl.step(1.0)
    with pytest.raises(RuntimeError, match="before any training batch"):  # each epoch needs its own batches
        ctl.step(1.0)
    assert ctl.epoch == 1


def test_restructures_are_logged_and_routine_improvements_are_not(caplog):
    model, ctl = _setup("pb", patience=1, min_dendrite_epochs=1, max_dendrite_epochs=1)
    events = []
    with caplog.at_level(logging.INFO, logger="apical"):
        for score in (1.0, 2.0, 2.0, 2.0):
            _epoch(model, ctl)
            events.append(ctl.step(score).event)
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("apical")]
    quiet = {"improved", "correlation_improved"}
    expected = [e for ev in events for e in ev.split(",") if e and e not in quiet]
    assert "improved" in events[1].split(",") and expected  # the script has both kinds
    assert logged == ["epoch 3: plateau (dendrites=0, score=2)", "epoch 3: dendrite_phase (dendrites=0, score=2)",
                      "epoch 4: installed (dendrites=1, score=2)"]
    assert [m.split(": ", 1)[1].split(" (")[0] for m in logged] == expected


def test_each_step_reports_its_epoch_score_and_the_best_score():
    model, ctl = _setup("pb", patience=2, min_dendrite_epochs=1, max_dendrite_epochs=1)
    got = []
    for score in (1.0, 3.0, 2.0, 2.0, 2.5):
        _epoch(model, ctl)
        s = ctl.step(score)
        got.append((s.epoch, s.score, s.best_score, s.dendrites, s.event))
    # the best of the current architecture; None once it changes (candidates added at 4, a set installed at 5)
    assert got == [(1, 1.0, 1.0, 0, "improved"), (2, 3.0, 3.0, 0, "improved"), (3, 2.0, 3.0, 0, ""),
                   (4, 2.0, None, 0, "plateau,dendrite_phase"), (5, 2.5, None, 1, "correlation_improved,installed")]
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
    assert model[1].momentum == 0.1
    mean = model[1].running_mean.clone()
    _run(model, ctl, [1, 1])
    assert ctl.phase == "dendrite" and not torch.equal(mean, model[1].running_mean)  # the neuron phase updates
    mean = model[1].running_mean.clone()
    _epoch(model, ctl)
    assert torch.equal(mean, model[1].running_mean) and model[1].momentum == 0.0
    ctl.step(1.0)
    assert ctl.phase == "neuron" and model[1].momentum == 0.1
    _epoch(model, ctl)
    assert not torch.equal(mean, model[1].running_mean)


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


# ---------------------------------------------------------------------------------- which weights, against references
def test_weights_after_a_plateau_or_a_revert_are_the_best_snapshots():
    """Right after a plateau (and before any further epoch) the model holds the best epoch's weights of
    its architecture; right after a revert, the accepted architecture's best weights. The references are
    copies of the state taken in this loop at the epochs the script makes best."""
    model, ctl = _setup("pb")
    trained, after = [], []
    for s in SCRIPT:
        _epoch(model, ctl)
        trained.append(copy.deepcopy(model.state_dict()))
        ctl.step(s)
        after.append(copy.deepcopy(model.state_dict()))

    def assert_holds(epoch, best_epoch):
        ref, got = trained[best_epoch - 1], after[epoch - 1]
        assert {k for k in got if "candidate_" not in k} == set(ref), epoch
        for k, v in ref.items():
            assert torch.equal(got[k], v), (epoch, k)
        # the weights the plateau left behind differ from the best ones (else the check proves nothing)
        assert any(not torch.equal(trained[epoch - 1][k], v) for k, v in ref.items() if k in trained[epoch - 1])

    assert ctl.history[3]["event"] == "plateau,dendrite_phase"
    assert_holds(4, 2)  # plateau of architecture 0 (scores 1, 2, 2, 2): epoch 2's weights
    assert ctl.history[9]["event"] == "plateau,kept,dendrite_phase"
    assert_holds(10, 8)  # plateau of architecture 1, kept: epoch 8's weights
    assert ctl.history[14]["event"] == "plateau,reverted,dendrite_phase"
    assert_holds(15, 8)  # architecture 2 reverted: the accepted architecture's best (epoch 8), not epoch 13's


def _capture_layers(layers, store):
    """Forward hooks: per layer, each training batch's input and (after backward) output error."""
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, inputs, out, i=i):
            entry = {"x": inputs[0].detach().clone()}
            store[i].append(entry)
            out.register_hook(lambda g: entry.__setitem__("d", g.detach().clone()))
        handles.append(layer.register_forward_hook(hook))
    return handles


def _sig(t):
    return 1.0 / (1.0 + np.exp(-t))


def _numpy_cov_scores(layer_ref, batches):
    """Covariance [C, O] of each candidate with the neuron's error over an epoch, and the error-normalised
    score, in float64 numpy from the layer's inputs and errors and the tensors set by the test."""
    acts, errs = [], []
    for b in batches:
        x = b["x"].double().numpy()
        a_inst = _sig(x @ layer_ref["D"].T + layer_ref["bd"])  # [N, O], the installed set
        pre = np.einsum("ni,coi->nco", x, layer_ref["W"]) + layer_ref["b"] + layer_ref["u"][:, 0] * a_inst[:, None]
        acts.append(_sig(pre))
        errs.append(b["d"].double().numpy())
    a, d = np.concatenate(acts), np.concatenate(errs)
    ac, dc = a - a.mean(0), d - d.mean(0)
    cov = (ac * dc[:, None, :]).mean(0)
    return cov, np.abs(cov) / dc.std(0)


@pytest.mark.parametrize("improvement, totals, events", [
    # an epoch improves when its total beats the best by more than the relative margin: a tie does not
    (0.0, [1.0, 1.0, 1.2, 1.2, 1.1, 1.0], ["correlation_improved", "", "correlation_improved", "", "", "installed"]),
    # +10% is not the +50% asked; +60% is; then three epochs short of +50% (patience 3) end the phase
    (0.5, [1.0, 1.1, 1.6, 1.7, 2.0, 2.3], ["correlation_improved", "", "correlation_improved", "", "", "installed"]),
])
def test_a_dendrite_epoch_improves_only_past_the_relative_margin(improvement, totals, events):
    """Scripted candidate scores (the layer's statistics replaced by known numbers): the controller's
    correlation is the mean over neurons of each neuron's best candidate score, and an epoch counts as
    an improvement only when that mean exceeds the best so far times (1 + dendrite_improvement)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1))  # one neuron: the mean over neurons is its best score
    cfg = DendriteConfig(mode="pb", candidates=2, patience=0, dendrite_patience=3, dendrite_improvement=improvement,
                         min_dendrite_epochs=1, max_dendrite_epochs=20, improvement_threshold=0.0,
                         improvement_threshold_raw=0.0, seed=0)
    apical.perforate(model, cfg)
    ctl = Controller(model, cfg)
    _run(model, ctl, [1.0, 1.0])
    assert ctl.phase == "dendrite"
    layer = model[0]
    got = []
    for total in totals:
        _epoch(model, ctl)
        scores = torch.tensor([[total / 3], [total]], dtype=torch.float64)  # candidate 1 is the best
        layer.candidate_scores = lambda scores=scores: scores
        got.append(ctl.step(0.0))
    assert [s.event for s in got] == events
    assert [h["correlation"] for h in ctl.history[-len(totals):]] == pytest.approx(totals)
    assert ctl.phase == "neuron" and ctl.dendrites == 1


@pytest.mark.parametrize("maximize, scores, events", [
    # relative threshold 0.1 of |best|: from 4.0, +0.3 is short of 0.4 and +0.5 is enough
    (True, [4.0, 4.3, 4.5, 4.9], ["improved", "", "improved", ""]),
    # minimising, from -4.0 (the threshold scales with |best|): -4.3 is short, -4.5 enough
    (False, [-4.0, -4.3, -4.5, -4.9], ["improved", "", "improved", ""]),
])
def test_a_neuron_epoch_improves_only_past_the_relative_threshold(maximize, scores, events):
    cfg = DendriteConfig(mode="none", patience=5, improvement_threshold=0.1, improvement_threshold_raw=0.01)
    model = nn.Sequential(nn.Linear(3, 2))
    ctl = Controller(model, cfg, maximize=maximize)
    steps, _ = _run(model, ctl, scores)
    assert [s.event for s in steps] == events
    assert ctl.best == scores[2]


def test_gd_sets_are_drawn_from_the_controllers_own_seeded_generator():
    """A gd set's weights and biases are randn draws from torch.Generator().manual_seed(config.seed) times
    init_scale / sqrt(fan_in), whatever the global generator's state."""
    cfg = DendriteConfig(mode="gd", patience=1, init_scale=0.7, seed=11)
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model = nn.Sequential(nn.Linear(3, 2))
        apical.perforate(model, cfg)
        ctl = Controller(model, cfg)
        steps, _ = _run(model, ctl, [1.0, 1.0])
        assert steps[-1].event == "plateau,added" and model[0].num_dendrites == 1
        g = torch.Generator().manual_seed(11)
        std = 0.7 / 3 ** 0.5
        torch.testing.assert_close(model[0].dendrite_weight[0], torch.randn(1, 2, 3, generator=g)[0] * std)
        torch.testing.assert_close(model[0].dendrite_bias[0], torch.randn(1, 2, generator=g)[0] * std)


def test_a_low_rank_phase_installs_the_best_epochs_projection_and_weights():
    """Candidates set by the test at the end of each epoch (their stored values) and scripted scores
    peaking at epoch 2 of 5: the installed set is epoch 2's, shared projection included, times the
    candidates' lr scale, and not the last epoch's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    cfg = DendriteConfig(mode="pb", candidates=2, dendrite_rank=1, patience=0, dendrite_patience=3,
                         dendrite_improvement=0.0, min_dendrite_epochs=1, max_dendrite_epochs=20,
                         improvement_threshold=0.0, improvement_threshold_raw=0.0, seed=0)
    apical.perforate(model, cfg)
    ctl = Controller(model, cfg)
    _run(model, ctl, [1.0, 1.0])
    layer = model[0]
    assert ctl.phase == "dendrite" and layer.candidate_proj.shape == (1, 1, 3)
    scale = layer.candidate_scale
    g = torch.Generator().manual_seed(5)
    stored = [{"weight": torch.randn(2, 2, 1, generator=g), "bias": torch.randn(2, 2, generator=g),
               "proj": torch.randn(1, 1, 3, generator=g)} for _ in range(5)]
    scores = torch.tensor([[1.0, 3.0], [2.0, 0.5]], dtype=torch.float64)  # neuron 0 takes 1, neuron 1 takes 0
    for factor, tensors in zip([1.0, 2.0, 1.5, 1.5, 1.5], stored, strict=True):
        _epoch(model, ctl)
        with torch.no_grad():  # the candidates as they stand when the epoch ends
            for name, value in tensors.items():
                getattr(layer, f"candidate_{name}").copy_(value)
        layer.candidate_scores = lambda s=scores * factor: s
        step = ctl.step(0.0)
    assert step.event == "installed" and layer.num_dendrites == 1
    best = stored[1]
    torch.testing.assert_close(layer.dendrite_proj[0], best["proj"][0] * scale)
    torch.testing.assert_close(layer.dendrite_weight[0], best["weight"][[1, 0], [0, 1]] * scale)
    torch.testing.assert_close(layer.dendrite_bias[0], best["bias"][[1, 0], [0, 1]] * scale)


@pytest.mark.parametrize("output_init", [0.0, 0.5])
def test_installed_candidate_is_the_best_of_the_best_correlation_epoch(output_init):
    """A dendrite phase of three epochs with candidate tensors set by the test (no optimiser step, so each
    epoch's candidates are known exactly). The correlation peaks at epoch 2; epoch 3 ends the phase. The
    installed set must be, per neuron, epoch 2's candidate with the highest numpy score, with
    v = -sign(cov) * output_init."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    cfg = DendriteConfig(mode="pb", candidates=3, patience=1, max_dendrites=3, dendrite_patience=1,
                         dendrite_improvement=0.0, min_dendrite_epochs=1, max_dendrite_epochs=10,
                         improvement_threshold=0.0, improvement_threshold_raw=0.0, output_init=output_init, seed=0)
    apical.perforate(model, cfg)
    layers = [model[0], model[2]]
    for layer in layers:  # one installed set, so the candidates have a cascade input
        layer.install_random(1.0)
        with torch.no_grad():
            layer.dendrite_out.normal_()
    ctl = Controller(model, cfg)
    _run(model, ctl, [1, 1])
    assert ctl.phase == "dendrite" and ctl.dendrites == 1
    installed = [{k: getattr(layer, f"dendrite_{k}").detach().clone() for k in ("weight", "bias", "cascade")}
                 for layer in layers]

    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)) for _ in range(3)]
    base = [{"W": torch.randn(3, layer.out_channels, layer.fan_in, generator=g) * 2,
             "b": torch.randn(3, layer.out_channels, generator=g),
             "u": torch.randn(3, 1, layer.out_channels, generator=g)} for layer in layers]
    # epoch 1: weak; epoch 2: strong (the best); epoch 3: candidates rolled and weak (ends the phase)
    variants = [lambda t: 0.3 * t, lambda t: t, lambda t: 0.1 * t.roll(1, 0)]
    refs, totals, steps = [], [], []
    for vary in variants:
        per_layer = []
        for layer, tensors in zip(layers, base, strict=True):
            eff = {k: vary(v) for k, v in tensors.items()}
            with torch.no_grad():  # the layer stores candidates divided by the lr scale
                layer.candidate_weight.copy_(eff["W"] / layer.candidate_scale)
                layer.candidate_bias.copy_(eff["b"] / layer.candidate_scale)
                layer.candidate_cascade.copy_(eff["u"] / layer.candidate_scale)
            per_layer.append({"W": eff["W"].double().numpy(), "b": eff["b"].double().numpy(),
                              "u": eff["u"].double().numpy(), "eff": eff,
                              "D": layer.dendrite_weight[0].detach().double().numpy(),
                              "bd": layer.dendrite_bias[0].detach().double().numpy()})
        store = [[] for _ in layers]
        handles = _capture_layers(layers, store)
        model.train()
        for x, y in data:
            nn.functional.mse_loss(model(x), y).backward()
        for h in handles:
            h.remove()
        for ref, batches in zip(per_layer, store, strict=True):
            ref["cov"], ref["score"] = _numpy_cov_scores(ref, batches)
        refs.append(per_layer)
        totals.append(np.concatenate([r["score"].max(0) for r in per_layer]).mean())
        steps.append(ctl.step(0.0))
    assert totals[1] > totals[0] and totals[2] < totals[1], totals  # the script does what it says
    assert [s.event for s in steps] == ["correlation_improved"] * 2 + ["installed"]
    assert [h["correlation"] for h in ctl.history[-3:]] == pytest.approx(totals, rel=1e-5)
    assert ctl.dendrites == 2 and ctl.phase == "neuron"
    for layer, ref, before in zip(layers, refs[1], installed, strict=True):
        o = layer.out_channels
        score = ref["score"]
        best = score.argmax(0)
        top2 = np.sort(score, 0)[-2:]
        assert (top2[1] - top2[0] > 1e-3 * top2[1]).all()  # no near-ties: the argmax is unambiguous
        cols = np.arange(o)
        eff = ref["eff"]
        assert layer.num_dendrites == 2 and layer.num_candidates == 0
        torch.testing.assert_close(layer.dendrite_weight[1], eff["W"][best, cols], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.dendrite_bias[1], eff["b"][best, cols], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.dendrite_cascade[1, 0], eff["u"][best, 0, cols], rtol=1e-6, atol=1e-7)
        assert torch.equal(layer.dendrite_cascade[:, 1], torch.zeros(2, o))
        for k in ("weight", "bias"):  # the first set is untouched
            assert torch.equal(getattr(layer, f"dendrite_{k}")[0], before[k][0])
        sign = np.sign(ref["cov"][best, cols])
        assert (np.abs(ref["cov"][best, cols]) > 0).all()
        want_v = torch.tensor(-sign * output_init, dtype=torch.float32)
        torch.testing.assert_close(layer.dendrite_out[1].detach(), want_v, rtol=0, atol=0)


@pytest.mark.parametrize("mode, scores, expected, weights_of", [
    # mid neuron phase, before any plateau: the best epoch's weights, its score
    ("pb", [1, 2, 1.5], (False, "neuron", 0, 3, "finish,done", 2.0, 2.0), 2),
    # mid dendrite phase: the candidates go (restructured); the accepted network and its score stay
    ("pb", [1, 2, 2, 2, 0], (True, "neuron", 0, 5, "finish,done", 2.0, None), 2),
    # a trial set that beats the accepted network: kept, nothing to rebuild
    ("pb", [1, 2, 2, 2, 0, 0, 3, 2.9], (False, "neuron", 1, 8, "finish,kept,done", 3.0, 3.0), 7),
    # a trial set that does not: reverted (restructured), back to the accepted network and its score
    ("gd", [1, 2, 2, 2, 1.5, 1.8], (True, "neuron", 0, 6, "finish,reverted,done", 2.0, 2.0), 2),
    # minimising: the lowest score is the best
    ("none", [3, 1, 2], (False, "neuron", 0, 3, "finish,done", 1.0, 1.0), 2),
])
def test_finish_returns_the_step_a_script_predicts(mode, scores, expected, weights_of):
    """Every field of the Step that finish() returns, and the weights it leaves, for scripted runs."""
    model, ctl = _setup(mode, maximize=mode != "none")
    _, states = _run(model, ctl, scores)
    step = ctl.finish()
    restructured, phase, dendrites, epoch, event, score, best = expected
    assert (step.restructured, step.done, step.phase, step.dendrites, step.epoch, step.event) == (
        restructured, True, phase, dendrites, epoch, event)
    assert step.score == score and step.best_score == best
    assert ctl.phase == "neuron" and ctl.dendrites == dendrites and ctl.done
    assert all(layer.num_candidates == 0 for _, layer in ctl.layers)
    for k, v in states[weights_of - 1].items():
        if "candidate_" not in k:
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="^training is already done$"):
        ctl.finish()


def test_finish_before_any_epoch_scores_nan():
    model, ctl = _setup("pb")
    before = copy.deepcopy(model.state_dict())
    step = ctl.finish()
    assert step.done and not step.restructured and step.event == "finish,done" and step.epoch == 0
    assert np.isnan(step.score) and step.best_score is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class _WithExtraState(nn.Linear):
    """A layer whose state_dict holds a non-tensor extra state (get_extra_state)."""

    def __init__(self):
        super().__init__(3, 2)
        self.info = {"seen": 0, "log": []}

    def get_extra_state(self):
        return dict(self.info)  # shallow: the log list is the module's own

    def set_extra_state(self, state):
        self.info = dict(state)


def test_snapshots_keep_a_modules_extra_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), _WithExtraState())
    ctl = Controller(model, DendriteConfig(mode="none", patience=1))
    x = torch.randn(8, 4)
    model[2].info["seen"] = 1
    model[2].info["log"].append("epoch 1")
    model(x)
    assert ctl.step(0.9).event == "improved"  # the best network, extra state included, is snapshotted
    best = {k: v.clone() for k, v in model.state_dict().items() if k != "2._extra_state"}
    model[2].info["seen"] = 2
    model[2].info["log"].append("epoch 2")  # changed in place: the snapshot must hold its own copy
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(x)
    assert ctl.step(0.1).done  # worse, patience 1: done, the best network is back
    assert model[2].info == {"seen": 1, "log": ["epoch 1"]}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())


def _seven_layer_controller(prefix: str = "fc"):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(7)])
    if prefix != "fc":  # the same model under other names
        model = nn.ModuleDict({f"{prefix}{i}": layer for i, layer in enumerate(model)})
    cfg = DendriteConfig(mode="pb", seed=0)
    apical.perforate(model, cfg)
    return model, Controller(model, cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("history"), "controller state is missing ['history']"),
    (lambda s: [s.pop(k) for k in ("counters", "maximize")], "controller state is missing ['counters', 'maximize']"),
    (lambda s: s.update(version=99), "controller state version 99 is not supported (this apical reads version 1)"),
    (lambda s: s["config"].update(mode="gd"), "controller state is for mode 'gd', this controller runs 'pb'"),
    (lambda s: s["counters"].pop("since"), "controller state counters do not match: ['since']"),
    (lambda s: s["counters"].update(extra=1), "controller state counters do not match: ['extra']"),
    (lambda s: s["counters"].update(phase="rest"), "controller state has an unknown phase 'rest'"),
])
def test_load_state_dict_refuses_a_bad_state_with_a_message_that_names_it(edit, message):
    _, ctl = _seven_layer_controller()
    state = copy.deepcopy(ctl.state_dict())
    edit(state)
    with pytest.raises(ValueError) as err:
        ctl.load_state_dict(state)
    assert str(err.value) == message


def test_load_state_dict_names_the_first_five_layers_of_each_side_and_ignores_include_exclude():
    _, ctl = _seven_layer_controller()
    _, other = _seven_layer_controller("layer")
    with pytest.raises(ValueError) as err:
        other.load_state_dict(copy.deepcopy(ctl.state_dict()))
    assert str(err.value) == ("controller state structure names layers ['0', '1', '2', '3', '4'], the model has "
                              "['layer0', 'layer1', 'layer2', 'layer3', 'layer4']")
    # include / exclude only matter to perforate: not even an invalid pattern there stops a load
    state = copy.deepcopy(ctl.state_dict())
    state["config"].update(include=["bad(regex"], exclude=["also(bad"])
    ctl.load_state_dict(state)
    # a restored controller counts training forwards afresh: step() without one is refused
    with pytest.raises(RuntimeError, match="before any training batch"):
        ctl.step(0.5)


def test_finish_twice_is_refused_by_name():
    _, ctl = _seven_layer_controller()
    ctl.finish()
    with pytest.raises(RuntimeError) as err:
        ctl.finish()
    assert str(err.value) == "training is already done"


@pytest.mark.parametrize("sets", [0, 1, 2])
def test_apply_structure_leaves_v_trainable_exactly_when_a_set_exists(sets):
    """Zero-size tensors never require grad (plain DDP would wait for their gradient); v of an
    installed set does, as after an install."""
    model, _ = _seven_layer_controller()
    apical.apply_structure(model, {name: {"dendrites": sets, "candidates": 0} for name, _ in
                                   apical.dendritic_layers(model)})
    for _, layer in apical.dendritic_layers(model):
        assert layer.num_dendrites == sets
        assert layer.dendrite_out.requires_grad is (sets > 0)


class _SecondRank:
    """Stands in for torch.distributed at step(): records this rank's row and answers with rank 1's,
    made from it by ``edit`` (rank 0 is this process)."""

    def __init__(self, edit):
        self.rows, self.edit = [], edit

    def all_gather(self, vec):
        mine = vec.tolist()
        self.rows.append(mine)
        return torch.tensor([mine, self.edit(list(mine))], dtype=torch.float64)


def _step_on_two_ranks(monkeypatch, ctl, score, edit=lambda row: row):
    from apical.dendrites import controller as controller_module

    rank1 = _SecondRank(edit)
    with monkeypatch.context() as m:  # only around step(): the epoch's own reductions stay single-process
        m.setattr(controller_module._dist, "world_size", lambda: 2)
        m.setattr(controller_module._dist, "all_gather", rank1.all_gather)
        try:
            return ctl.step(score), rank1.rows
        except Exception as err:
            err.rows = rank1.rows
            raise


def _dendrite_phase_epoch():
    model, ctl = _setup("pb", patience=1, max_dendrite_epochs=3)
    _run(model, ctl, [1.0, 1.0])  # a plateau at epoch 2: the dendrite phase starts
    assert ctl.phase == "dendrite"
    _epoch(model, ctl)  # 16 observations for each of the two layers
    return model, ctl


def test_two_ranks_take_the_mean_score_and_share_the_cycle_state(monkeypatch):
    model, ctl = _setup("pb")
    _epoch(model, ctl)
    step, rows = _step_on_two_ranks(monkeypatch, ctl, 1.0, lambda row: [3.0, *row[1:]])
    assert rows == [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]  # score, epoch, dendrites, dendrite phase, n, checksum
    assert step.score == 2.0 and ctl.history[-1]["score"] == 2.0 and step.best_score == 2.0

    model, ctl = _dendrite_phase_epoch()
    stats = [layer.stats for _, layer in ctl.layers]
    checksum = math.fsum(s.n + sum(float(getattr(s, f).sum()) for f in ("s_a", "s_d", "s_ad", "s_aa", "s_dd"))
                         for s in stats)
    step, rows = _step_on_two_ranks(monkeypatch, ctl, 0.5, lambda row: [1.5, *row[1:]])
    assert rows[0][:5] == [0.5, 2.0, 0.0, 1.0, 32.0]
    assert rows[0][5] == pytest.approx(checksum, rel=1e-12) and abs(checksum) > 1
    assert step.score == 1.0


@pytest.mark.parametrize("field", [1, 2, 3, 4], ids=["epoch", "dendrites", "phase", "observations"])
def test_a_rank_that_disagrees_on_the_cycle_state_stops_step(monkeypatch, field):
    model, ctl = _dendrite_phase_epoch()

    def edit(row):
        row[field] += 1
        return row

    with pytest.raises(RuntimeError) as err:
        _step_on_two_ranks(monkeypatch, ctl, 0.5, edit)
    mine = err.value.rows[0]
    theirs = edit(list(mine))
    assert str(err.value) == (
        f"apical: rank 1 disagrees with rank 0 at step() (epoch, dendrites, dendrite phase, observations, statistics "
        f"checksum: {theirs[1:]} vs {mine[1:]}); every rank must train the same number of batches per epoch and "
        "call step() once per epoch")
    assert ctl.epoch == 2 and len(ctl.history) == 2


def test_the_statistics_checksum_tolerates_rounding_only(monkeypatch):
    model, ctl = _dendrite_phase_epoch()
    with pytest.raises(RuntimeError, match="disagrees"):
        _step_on_two_ranks(monkeypatch, ctl, 0.5, lambda row: [*row[:5], row[5] * (1 + 3e-9)])
    model, ctl = _dendrite_phase_epoch()
    step, _ = _step_on_two_ranks(monkeypatch, ctl, 0.5, lambda row: [*row[:5], row[5] * (1 + 3e-10)])
    assert step.epoch == 3
    # in the neuron phase the checksum is 0: the tolerance is absolute there
    model, ctl = _setup("pb")
    _epoch(model, ctl)
    with pytest.raises(RuntimeError, match="disagrees"):
        _step_on_two_ranks(monkeypatch, ctl, 1.0, lambda row: [*row[:5], 1.5e-9])
    _epoch(model, ctl)
    _step_on_two_ranks(monkeypatch, ctl, 1.0, lambda row: [*row[:5], 1e-9])  # the bound itself passes


def test_a_bad_score_on_one_rank_still_joins_the_gather_then_raises(monkeypatch):
    model, ctl = _setup("pb")
    _epoch(model, ctl)
    with pytest.raises(ValueError, match="non-finite validation score") as err:
        _step_on_two_ranks(monkeypatch, ctl, float("nan"))
    assert len(err.value.rows) == 1 and math.isnan(err.value.rows[0][0])  # the other rank did not hang
    with pytest.raises(TypeError, match="needs a number, got str") as err:
        _step_on_two_ranks(monkeypatch, ctl, "high")
    assert len(err.value.rows) == 1 and ctl.epoch == 0


def test_a_controller_is_refused_a_model_that_does_not_match_its_config():
    plain = nn.Sequential(nn.Linear(3, 2))
    for mode in ("pb", "gd"):
        with pytest.raises(ValueError) as err:
            Controller(plain, DendriteConfig(mode=mode))
        assert str(err.value) == (f'mode "{mode}" needs dendritic layers: call apical.perforate(model, config) '
                                  "before creating the Controller")
    Controller(plain, DendriteConfig(mode="none"))  # plain early stopping needs none
    wide = nn.Sequential(*(nn.Linear(3, 3) for _ in range(5)))
    apical.perforate(wide, DendriteConfig(activation="tanh", dendrite_rank=2))
    with pytest.raises(ValueError) as err:
        Controller(wide, DendriteConfig(dendrite_rank=2))
    assert str(err.value) == ("layers ['0', '1', '2'] were perforated with another activation than the config's "
                              "'sigmoid': use the same DendriteConfig for perforate and Controller")
    with pytest.raises(ValueError) as err:
        Controller(wide, DendriteConfig(activation="tanh"))
    assert str(err.value) == ("layers ['0', '1', '2'] were perforated with another dendrite_rank than the config's "
                              "None: use the same DendriteConfig for perforate and Controller")


def test_without_a_seed_the_candidate_draws_come_from_torchs_global_generator():
    model, _ = _setup("pb")
    cfg = DendriteConfig(seed=None)
    torch.manual_seed(5)
    reference = int(torch.randint(2**62, ()))  # the draw a seedless controller makes
    torch.manual_seed(5)
    ctl = Controller(model, cfg)
    assert ctl._generator.initial_seed() == reference
    torch.manual_seed(5)
    assert Controller(model, cfg)._generator.initial_seed() == reference  # reproducible under torch.manual_seed


def test_a_parameter_added_after_the_controller_follows_the_phases_like_the_base():
    model, ctl = _setup("pb", patience=1, max_dendrite_epochs=1)
    model.add_module("extra", nn.Linear(2, 2))  # unseen by the controller: trains with the base network
    _run(model, ctl, [1.0, 1.0])
    assert ctl.phase == "dendrite" and not model.extra.weight.requires_grad
    _run(model, ctl, [1.0])
    assert ctl.phase == "neuron" and model.extra.weight.requires_grad


def test_a_first_set_that_is_reverted_gets_its_retries():
    model, ctl = _setup("pb")  # max_tries=2
    steps, _ = _run(model, ctl, [1, 2, 2, 2, 0, 0, 1.5, 1.5, 1.5])
    assert steps[5].event == "installed"
    assert steps[8].event == "plateau,reverted,dendrite_phase" and not steps[8].done and ctl.tries == 1
    steps, _ = _run(model, ctl, [0, 0, 1.5, 1.5, 1.5])  # the retry is reverted too: tries run out
    assert steps[-1].event == "plateau,reverted,done" and steps[-1].done and ctl.dendrites == 0
