"""Acceptance 4: on a width-limited problem, dendrites lift the network above its plateau."""

import torch
from torch import nn

import apical


def _data(n, g):
    x = torch.rand(n, 2, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, :1]) * torch.cos(1.5 * x[:, 1:]) + 0.3 * x[:, :1] ** 2
    return x, y


def test_dendrites_lower_the_plateau_of_a_narrow_network():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    (xtr, ytr), (xva, yva) = _data(2000, g), _data(500, g)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    cfg = apical.DendriteConfig(mode="pb", patience=10, max_dendrites=1, seed=0)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg, maximize=False)
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    plateau = None
    while True:
        model.train()
        perm = torch.randperm(2000)
        for i in range(0, 2000, 100):
            idx = perm[i:i + 100]
            opt.zero_grad()
            nn.functional.mse_loss(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = nn.functional.mse_loss(model(xva), yva).item()
        step = ctl.step(val)
        if "dendrite_phase" in step.event and plateau is None:
            plateau = ctl.accepted_score
        if step.done:
            break
        if step.restructured:
            opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    correlations = [h["correlation"] for h in ctl.history if h["phase"] == "dendrite"]
    assert len(correlations) >= 2
    assert correlations[-1] > 1.5 * correlations[0]  # the dendrite phase raised the correlation
    assert apical.dendrite_count(model) == 1  # the set was kept
    with torch.no_grad():
        final = nn.functional.mse_loss(model(xva), yva).item()
    assert final < 0.9 * plateau, (final, plateau)
