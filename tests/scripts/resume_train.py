"""Train a digits MLP with a Perforated Backpropagation controller, checkpointing every epoch.

    python resume_train.py DIR [--resume] [--epochs N] [--data FILE]

Writes ``DIR/ckpt.safetensors`` after every epoch (then prints ``epoch N ...``) and
``DIR/final.safetensors`` at the end (then prints ``done``). With ``--resume`` it continues from
``DIR/ckpt.safetensors`` when it exists. Deterministic on the CPU: fixed seeds, one thread, and
the data order and global RNG states travel in the checkpoint's ``extra``, so a run killed at
any point and resumed ends with the same tensors and metadata as an uninterrupted one.
``--data`` reads the split from a safetensors file written by :func:`save_data` (saves the
sklearn import in each process).

The helpers are imported by ``tests/test_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

torch.set_num_threads(1)

from torch import nn  # noqa: E402

from apical.checkpoint import load, save  # noqa: E402
from apical.dendrites import Controller, DendriteConfig, perforate  # noqa: E402

CONFIG = {
    "mode": "pb", "candidates": 2, "max_dendrites": 2, "patience": 2, "dendrite_patience": 1,
    "min_dendrite_epochs": 1, "max_dendrite_epochs": 3, "max_tries": 2, "improvement_threshold": (0.01, 0.0),
    "seed": 0,
}
LR = 1e-2
BATCH = 100
MAX_EPOCHS = 40


def make_data(path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits scaled to [0, 1], shuffled by a fixed seed: 1200 train, 597 validation rows."""
    if path is not None:
        from safetensors.torch import load_file

        d = load_file(path)
        return d["xt"], d["yt"], d["xv"], d["yv"]
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def save_data(path: str) -> None:
    from safetensors.torch import save_file

    save_file(dict(zip(("xt", "yt", "xv", "yv"), make_data(), strict=True)), path)


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def make_optimizer(controller: Controller) -> torch.optim.Optimizer:
    return torch.optim.Adam(controller.parameters(), lr=LR)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                gen: torch.Generator) -> None:
    model.train()
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), BATCH):
        idx = perm[i : i + BATCH]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def setup() -> tuple[nn.Module, Controller, torch.optim.Optimizer, torch.Generator]:
    """The same code for a fresh start and a resume: model, perforation, controller, optimiser."""
    model = make_model()
    cfg = DendriteConfig(**CONFIG)
    perforate(model, cfg)
    ctl = Controller(model, cfg, maximize=True)
    return model, ctl, make_optimizer(ctl), torch.Generator().manual_seed(123)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=MAX_EPOCHS)
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    ckpt = os.path.join(args.dir, "ckpt.safetensors")
    xt, yt, xv, yv = make_data(args.data)
    model, ctl, opt, gen = setup()
    start = 0
    if args.resume and os.path.exists(ckpt):
        extra = load(ckpt, model, ctl, opt)
        gen.set_state(extra["data_rng"])
        torch.set_rng_state(extra["torch_rng"])
        start = extra["epoch"]
        print(f"resumed at epoch {start}", flush=True)
    done = ctl.done
    for epoch in range(start, args.epochs):
        if done:
            break
        train_epoch(model, opt, xt, yt, gen)
        step = ctl.step(accuracy(model, xv, yv))
        if step.restructured:
            opt = make_optimizer(ctl)
        save(ckpt, model, ctl, opt, extra={"epoch": epoch + 1, "data_rng": gen.get_state(),
                                           "torch_rng": torch.get_rng_state()})
        print(f"epoch {epoch + 1} phase={step.phase} dendrites={step.dendrites} event={step.event}", flush=True)
        done = step.done
    save(os.path.join(args.dir, "final.safetensors"), model, ctl, opt)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
