"""Writes tests/data/pre11_*.safetensors: checkpoints of apical before issue 11 (commit 496cba1), when the
empty dendrite tensors still required grad. Run with that commit's src on PYTHONPATH:

    git archive 496cba1 src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python tests/scripts/make_pre11_checkpoints.py tests/data
"""

import sys

import torch
from torch import nn

import apical


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def main(out: str) -> None:
    cfg = apical.DendriteConfig(patience=1, candidates=2, max_dendrite_epochs=5, min_dendrite_epochs=2, seed=0)
    model = apical.perforate(net(), cfg)
    ctl = apical.Controller(model, cfg)
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    assert any(p.numel() == 0 for p in ctl.parameters())  # the old behaviour these files record
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)

    def epoch():
        model.train()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    epoch()
    ctl.step(1.0)
    apical.save(f"{out}/pre11_neuron.safetensors", model, ctl, opt, extra={"x": x, "y": y})
    epoch()
    ctl.step(1.0)
    assert ctl.phase == "dendrite"
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    epoch()
    apical.save(f"{out}/pre11_dendrite.safetensors", model, ctl, opt, extra={"x": x, "y": y})


if __name__ == "__main__":
    main(sys.argv[1])
