"""Checkpoints written before issue 11 (empty dendrite tensors then required grad) still load and resume."""

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import apical

DATA = Path(__file__).parent / "data"


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _cfg():
    return apical.DendriteConfig(patience=1, candidates=2, max_dendrite_epochs=5, min_dendrite_epochs=2, seed=0)


def test_pre11_checkpoint_loads_for_inference_against_its_own_weights():
    path = DATA / "pre11_neuron.safetensors"
    fresh = _net()
    extra = apical.load(path, fresh)
    raw = safetensors.torch.load_file(str(path))
    w = {k[len("model/"):]: v.double().numpy() for k, v in raw.items() if k.startswith("model/")}
    x = extra["x"].double().numpy()
    h = np.tanh(x @ w["0.base.weight"].T + w["0.base.bias"])  # no dendrite set yet: the plain network
    want = h @ w["2.base.weight"].T + w["2.base.bias"]
    fresh.eval()
    with torch.no_grad():
        got = fresh(extra["x"]).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not fresh[0].dendrite_out.requires_grad  # empty: never requires grad now


@pytest.mark.parametrize("name", ["pre11_neuron", "pre11_dendrite"])
def test_pre11_checkpoint_resumes_with_controller_and_optimizer(name):
    model = apical.perforate(_net(), _cfg())
    ctl = apical.Controller(model, _cfg())
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    extra = apical.load(DATA / f"{name}.safetensors", model, ctl, opt)
    x, y = extra["x"], extra["y"]
    # the optimiser still lists the empty tensors it was saved with (dendrite_out or candidate_cascade)
    assert any(p.numel() == 0 for g in opt.param_groups for p in g["params"])
    events = []
    for _ in range(8):
        model.train()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        step = ctl.step(1.0)
        events.append(step.event)
        if step.done or "installed" in step.event:
            break
        if step.restructured:
            opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    assert any("installed" in e for e in events), events
    assert apical.structure(model)["0"]["dendrites"] == 1
