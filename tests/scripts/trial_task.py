"""A task file as a user writes one (used by tests/test_trials.py): digits, a small MLP."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import apical


def load(seed):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va, te = order[:900], order[900:1300], order[1300:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), TensorDataset(x[te], y[te])


def build(width):
    hidden = max(1, round(4 * width))
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


task = apical.Task(name="digits-file", model=build, data=load, loss=F.cross_entropy, metric="accuracy",
                   lr=1e-2, patience=2, max_epochs=25, dendrites={"max_dendrites": 1, "max_dendrite_epochs": 4})
other = apical.Task(name="other", model=build, data=load, loss=F.cross_entropy, max_epochs=3)
