"""Small reference models for the demo, the benchmarks and the tests (no torchvision needed).

Every model is an ``nn.Sequential`` with named children, returns logits, and exposes
``output_layer_name``: the name (as in ``named_modules()``) of its last Linear layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from apical.datasets import Split

__all__ = ["ACTIVATIONS", "MLP", "Conv1dNet", "MnistCNN", "build", "scaled"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def scaled(n: int, width: float) -> int:
    """``round(n * width)``, at least 1."""
    return max(1, int(round(n * width)))


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


class MLP(nn.Sequential):
    """Multilayer perceptron: ``flatten, fc0, act0, [drop0], fc1, ..., out``.

    Inputs of any shape ``[N, ...]`` are flattened first (``in_features`` = product of the rest).
    """

    output_layer_name = "out"

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        prev = in_features
        for i, h in enumerate(hidden):
            layers[f"fc{i}"] = nn.Linear(prev, h)
            layers[f"act{i}"] = _activation(activation)
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            prev = h
        layers["out"] = nn.Linear(prev, out_features)
        super().__init__(layers)
        self.in_features = in_features
        self.hidden = tuple(hidden)
        self.out_features = out_features


class Conv1dNet(nn.Sequential):
    """Small 1-D CNN for MNIST-1D.

    ``[N, L]`` (or ``[N, 1, L]``) -> conv0(1, c0, 5, pad 2) relu maxpool2 -> conv1(c0, c1, 5, pad 2) relu
    maxpool2 -> ... -> flatten -> out(c_last * L / 2^k, n_classes).
    """

    output_layer_name = "out"

    def __init__(self, in_length: int = 40, channels: Sequence[int] = (32, 32), n_classes: int = 10) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev, length = 1, in_length
        for i, c in enumerate(channels):
            layers[f"conv{i}"] = nn.Conv1d(prev, c, kernel_size=5, padding=2)
            layers[f"act{i}"] = nn.ReLU()
            layers[f"pool{i}"] = nn.MaxPool1d(2)
            prev, length = c, length // 2
        if length < 1:
            raise ValueError(f"in_length {in_length} too short for {len(channels)} pooling stages")
        layers["flatten"] = nn.Flatten()
        layers["out"] = nn.Linear(prev * length, n_classes)
        super().__init__(layers)
        self.in_length = in_length
        self.channels = tuple(channels)
        self.n_classes = n_classes

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, n_classes]``; a flat ``[N, L]`` input gets a channel axis."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return super().forward(x)


class MnistCNN(nn.Sequential):
    """The PyTorch-examples MNIST CNN, with widths multiplied by ``width``; returns logits.

    conv1(1, 32, 3) relu conv2(32, 64, 3) relu maxpool2 dropout(0.25) flatten fc1(9216, 128) relu
    dropout(0.5) fc2(128, n_classes). Width 1: 1,199,882 parameters. Accepts ``[N, 1, 28, 28]`` or
    ``[N, 784]``.
    """

    output_layer_name = "fc2"

    def __init__(self, width: float = 1.0, n_classes: int = 10) -> None:
        c1, c2, h = scaled(32, width), scaled(64, width), scaled(128, width)
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(1, c1, 3),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(c1, c2, 3),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
                dropout1=nn.Dropout(0.25),
                flatten=nn.Flatten(),
                fc1=nn.Linear(c2 * 12 * 12, h),
                relu3=nn.ReLU(),
                dropout2=nn.Dropout(0.5),
                fc2=nn.Linear(h, n_classes),
            )
        )
        self.width = width
        self.n_classes = n_classes

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, n_classes]``; a flat ``[N, 784]`` input is reshaped to ``[N, 1, 28, 28]``."""
        if x.dim() == 2:
            x = x.reshape(x.shape[0], 1, 28, 28)
        return super().forward(x)


class SequenceClassifier(nn.Module):
    """A recurrent classifier: ``[N, T * F]`` (or ``[N, T, F]``) read as ``T`` steps of ``F``
    features by an ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN``, then a Linear head on the last hidden state.
    """

    output_layer_name = "head"

    def __init__(self, features: int, hidden: int, n_classes: int, kind: str = "gru", layers: int = 1) -> None:
        super().__init__()
        cls = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}.get(kind)
        if cls is None:
            raise ValueError(f"unknown recurrent kind {kind!r}; use gru, lstm or rnn")
        self.features, self.hidden, self.kind = features, hidden, kind
        self.rnn = cls(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(x.shape[0], -1, self.features)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


# default hidden sizes of build("mlp", ...) at width 1
MLP_HIDDEN: dict[str, tuple[int, ...]] = {
    "digits": (32,),
    "breast_cancer": (16,),
    "wine": (16,),
    "diabetes": (32,),
    "mnist1d": (64, 64),
    "mnist5k": (128,),
    "tox21": (512, 128),
}


def build(name: str, split: Split, width: float = 1.0) -> nn.Module:
    """Model ``name`` ("mlp", "cnn1d" or "mnist_cnn") sized for ``split``, widths scaled by ``width``.

    "mlp": hidden sizes from ``MLP_HIDDEN[split.name]`` (default (64,)); "cnn1d": channels (32, 32) on a
    flat sequence input; "mnist_cnn": needs 28x28 inputs (``[1, 28, 28]`` or 784 features).
    """
    shape = split.input_shape()
    n_in = int(torch.Size(shape).numel())
    if name == "mlp":
        hidden = [scaled(h, width) for h in MLP_HIDDEN.get(split.name, (64,))]
        return MLP(n_in, hidden, split.n_outputs)
    if name == "cnn1d":
        if len(shape) != 1:
            raise ValueError(f"cnn1d needs flat sequence inputs [N, L], got sample shape {shape}")
        return Conv1dNet(shape[0], (scaled(32, width), scaled(32, width)), split.n_outputs)
    if name in ("gru", "lstm"):  # digits as 8 rows of 8 pixels, MNIST-1D as 40 steps of 1 value
        features = 8 if split.name == "digits" else 1
        return SequenceClassifier(features, scaled(16, width), split.n_outputs, kind=name)
    if name == "mnist_cnn":
        if shape not in ((1, 28, 28), (784,)):
            raise ValueError(f"mnist_cnn needs 28x28 inputs, got sample shape {shape}")
        return MnistCNN(width, split.n_outputs)
    raise ValueError(f"unknown model {name!r}; known: cnn1d, gru, lstm, mlp, mnist_cnn")
