"""One Perforated Backpropagation cycle on a tiny MLP, on one process or as one rank of a DDP run.

    python ddp_cycle.py OUT --rank R --world W --init tcp://127.0.0.1:29500

The run starts from plain ``DistributedDataParallel(model)`` (no ``apical.distributed.wrap``) and
rebuilds it with ``apical.distributed.rewrap`` after each restructure. Rank R of W trains on rows
R*b .. (R+1)*b - 1 of every global batch (b = global batch / W) and
scores on its share of the validation set; with ``--world 1`` (or :func:`run` called with
``world=1``) it is the single-process reference over the same global batches. Writes a
``torch.save`` dict to OUT: final parameters, controller history, the dendrites as they were when
installed, and a one-step check of the correlation statistics and candidate gradients of a
Conv2d layer (pearson normaliser, epoch centring). Helpers are imported by
``tests/test_distributed.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import apical  # noqa: E402
import apical.distributed  # noqa: E402
from apical.dendrites import Controller, DendriteConfig, perforate  # noqa: E402

CONFIG = {"mode": "pb", "candidates": 2, "max_dendrites": 1, "patience": 2, "dendrite_patience": 1,
          "max_dendrite_epochs": 3, "max_tries": 1, "improvement_threshold": 0.0, "seed": 0}
GLOBAL_BATCH = 32
MAX_EPOCHS = 30


def data() -> tuple[torch.Tensor, ...]:
    """A fixed 3-class problem in 8 dimensions: 256 training rows, 128 validation rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    logits = torch.stack([x[:, 0] * x[:, 1], torch.sin(2 * x[:, 2]) + x[:, 3], x[:, 4] ** 2 - 1], 1)
    y = logits.argmax(1)
    return x[:256], y[:256], x[256:], y[256:]


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))


def dendrites(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in apical.dendritic_layers(model):
        for k in ("dendrite_weight", "dendrite_bias", "dendrite_cascade"):
            out[f"{name}.{k}"] = getattr(layer, k).detach().clone()
    return out


def run(rank: int = 0, world: int = 1) -> dict:
    """Train to the end of the cycle; ``world > 1`` needs an initialised process group."""
    xtr, ytr, xva, yva = data()
    b, v = GLOBAL_BATCH // world, len(xva) // world
    xva, yva = xva[rank * v:(rank + 1) * v], yva[rank * v:(rank + 1) * v]
    cfg = DendriteConfig(**CONFIG)
    model = perforate(net(), cfg)
    ctl = Controller(model, cfg)
    # plain DistributedDataParallel, as HF accelerate and most frameworks wrap a model: no tensor of
    # size zero requires grad, so the first neuron phase needs no help; rewrap after each restructure
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    installed: list[dict] = []
    order = torch.Generator().manual_seed(2)
    for _ in range(MAX_EPOCHS):
        ddp.train()
        perm = torch.randperm(len(xtr), generator=order)  # the same global batches on every rank
        for i in range(0, len(xtr), GLOBAL_BATCH):
            rows = perm[i:i + GLOBAL_BATCH][rank * b:(rank + 1) * b]
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(xtr[rows]), ytr[rows]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            score = (model(xva).argmax(1) == yva).float().mean()  # 64 or 128 rows: exact in float
        step = ctl.step(score)
        if "installed" in step.event:
            installed.append(dendrites(model))
        if step.done:
            break
        if step.restructured:
            if world > 1:
                ddp = apical.distributed.rewrap(ddp)
            opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    else:
        ctl.finish()
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "history": ctl.history,
        "installed": installed,
        "dendrites": apical.dendrite_count(model),
        "conv": conv_check(rank, world),
        "gru": gru_check(rank, world),
        "conv_low_rank": conv_check(rank, world, dendrite_rank=2),
    }


def _candidate_check(model: nn.Module, layer, make_x, rank: int, world: int) -> dict:
    """Three global batches through ``model`` with candidates on ``layer``: statistics and gradients."""
    layer.install_random(1.0, torch.Generator().manual_seed(4))
    layer.add_candidates(2, 1.0, torch.Generator().manual_seed(5))
    layer.set_training_mode("dendrite", perforated=True)
    for p in model.parameters():
        p.requires_grad_(p is layer.candidate_weight or p is layer.candidate_bias or p is layer.candidate_proj)
    ddp = apical.distributed.wrap(model) if world > 1 else model
    g = torch.Generator().manual_seed(6)
    grads = []
    for i in range(3):
        x = make_x(g) * (1 + i) + i
        t = torch.randn(8, 2, generator=g)
        b = 8 // world
        layer.candidate_weight.grad = None
        if layer.candidate_proj is not None:
            layer.candidate_proj.grad = None
        nn.functional.mse_loss(ddp(x[rank * b:(rank + 1) * b]), t[rank * b:(rank + 1) * b]).backward()
        grads.append(layer.candidate_weight.grad.clone())
        if layer.candidate_proj is not None:  # a low-rank layer's shared projection
            grads.append(layer.candidate_proj.grad.clone())
    return {"moments": layer.stats.moments(), "n": layer.stats.n, "grads": grads}


def conv_check(rank: int = 0, world: int = 1, dendrite_rank: int | None = None) -> dict:
    """A Conv2d layer (pearson normaliser, epoch centring), with full or low-rank sets."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    perforate(model, DendriteConfig(include=["0"], normaliser="pearson", centring="epoch", seed=0,
                                    dendrite_rank=dendrite_rank))
    return _candidate_check(model, model[0], lambda g: torch.randn(8, 2, 5, 5, generator=g), rank, world)


class _GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def gru_check(rank: int = 0, world: int = 1) -> dict:
    """A GRU: statistics over batch x time (one reduction per step)."""
    torch.manual_seed(3)
    model = _GRUNet()
    perforate(model, DendriteConfig(include=["rnn"], seed=0))
    return _candidate_check(model, model.rnn.cell_l0, lambda g: torch.randn(8, 5, 3, generator=g), rank, world)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--init", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.world > 1:
        dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
        _stage("initialised")
        probe = torch.tensor([float(args.rank + 1)])
        dist.all_reduce(probe)  # the environment can run a collective before apical is involved
        if probe.item() != args.world * (args.world + 1) / 2:
            raise RuntimeError(f"all_reduce returned {probe.item()}")
        _stage("collective")
    try:
        result = run(args.rank, args.world)
        result["seconds"] = time.perf_counter() - start
        torch.save(result, args.out)
        _stage("saved")
        apical.distributed.release()  # on success only: its barrier would wait on a failed peer
    finally:
        if args.world > 1:
            dist.destroy_process_group()
    _stage("exit")


def _stage(name: str) -> None:
    """One line per stage reached, so that a rank that dies says where (read by the test)."""
    print(f"stage: {name}", flush=True)


if __name__ == "__main__":
    main()
