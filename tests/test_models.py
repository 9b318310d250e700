"""Tests for apical.models: shapes, parameter counts computed by hand, the build factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apical.datasets import Split
from apical.models import MLP, Conv1dNet, MnistCNN, build, scaled

torch.set_num_threads(1)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def linear(i: int, o: int) -> int:
    return i * o + o


def conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def fake_split(name: str, shape: tuple[int, ...], n_outputs: int = 10, n: int = 4) -> Split:
    x = torch.zeros((n, *shape))
    y = torch.zeros(n, dtype=torch.int64)
    return Split(name, "classification", x, y, x, y, x, y, n_outputs)


def output_layer(m: nn.Module) -> nn.Module:
    return dict(m.named_modules())[m.output_layer_name]  # type: ignore[index]


def test_mnist_cnn_width1() -> None:
    m = MnistCNN()
    expected = conv(1, 32, 3) + conv(32, 64, 3) + linear(9216, 128) + linear(128, 10)
    assert expected == 1_199_882
    assert n_params(m) == expected
    m.eval()
    x = torch.rand(3, 1, 28, 28)
    out = m(x)
    assert out.shape == (3, 10)
    assert torch.equal(m(x.reshape(3, 784)), out)
    last = output_layer(m)
    assert isinstance(last, nn.Linear) and last.out_features == 10


@pytest.mark.parametrize("width", [0.125, 0.5, 0.01])
def test_mnist_cnn_width(width: float) -> None:
    c1, c2, h = scaled(32, width), scaled(64, width), scaled(128, width)
    assert min(c1, c2, h) >= 1
    m = MnistCNN(width=width, n_classes=7)
    assert n_params(m) == conv(1, c1, 3) + conv(c1, c2, 3) + linear(c2 * 144, h) + linear(h, 7)
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_mlp() -> None:
    m = MLP(40, (8, 8), 10)
    assert n_params(m) == linear(40, 8) + linear(8, 8) + linear(8, 10) == 490
    assert m(torch.rand(5, 40)).shape == (5, 10)
    assert m(torch.rand(5, 1, 5, 8)).shape == (5, 10)  # flattened first
    last = output_layer(m)
    assert isinstance(last, nn.Linear) and last is list(m.modules())[-1]
    d = MLP(4, (3,), 2, dropout=0.5, activation="tanh")
    assert isinstance(d.act0, nn.Tanh) and isinstance(d.drop0, nn.Dropout)
    with pytest.raises(ValueError, match="activation"):
        MLP(4, (3,), 2, activation="swishy")


def test_conv1dnet() -> None:
    m = Conv1dNet(40, (8, 16), 10)
    expected = (8 * 5 + 8) + (8 * 16 * 5 + 16) + linear(16 * 10, 10)
    assert n_params(m) == expected
    x = torch.rand(6, 40)
    assert m(x).shape == (6, 10)
    assert torch.equal(m(x), m(x.unsqueeze(1)))
    assert isinstance(output_layer(m), nn.Linear)


def test_build() -> None:
    mlp = build("mlp", fake_split("mnist1d", (40,)), width=0.5)
    assert isinstance(mlp, MLP) and mlp.hidden == (32, 32)
    tox = build("mlp", fake_split("tox21", (2048,), n_outputs=12))
    assert isinstance(tox, MLP) and tox.hidden == (512, 128) and tox.out_features == 12
    img = fake_split("mnist5k", (1, 28, 28))
    assert build("mlp", img)(img.x_train).shape == (4, 10)
    cnn = build("mnist_cnn", img, width=0.25)
    assert isinstance(cnn, MnistCNN) and cnn(img.x_train).shape == (4, 10)
    c1 = build("cnn1d", fake_split("mnist1d", (40,)), width=0.25)
    assert isinstance(c1, Conv1dNet) and c1.channels == (8, 8)
    with pytest.raises(ValueError, match="28x28"):
        build("mnist_cnn", fake_split("digits", (64,)))
    with pytest.raises(ValueError, match="cnn1d"):
        build("cnn1d", img)
    with pytest.raises(ValueError, match="known"):
        build("resnet", img)


def test_build_on_real_split() -> None:
    pytest.importorskip("sklearn")
    from apical.datasets import load

    s = load("digits", seed=0)
    m = build("mlp", s)
    assert m(s.x_val).shape == (len(s.x_val), 10)
