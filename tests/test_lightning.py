"""DendriteCallback with a real Lightning Trainer on the CPU: one process, and two with ddp_spawn."""

import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

import apical  # noqa: E402
from apical.integrations.lightning import DendriteCallback  # noqa: E402

CONFIG = {"mode": "pb", "candidates": 2, "max_dendrites": 1, "patience": 2, "dendrite_patience": 1,
          "max_dendrite_epochs": 3, "max_tries": 1, "improvement_threshold": 0.0, "seed": 0}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(2 * x[:, 2]) + x[:, 3], x[:, 4] ** 2 - 1], 1).argmax(1)
    return x[:256], y[:256], x[256:], y[256:]


def _loaders():
    xtr, ytr, xva, yva = _data()
    # (no torch.Generator here: ddp_spawn cannot send one to its workers on this machine)
    return (DataLoader(TensorDataset(xtr, ytr), batch_size=32, shuffle=True),
            DataLoader(TensorDataset(xva, yva), batch_size=128))


class LitMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", max_epochs=40, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _accuracy(net):
    _, _, xva, yva = _data()
    net.eval()
    with torch.no_grad():
        return (net(xva).argmax(1) == yva).float().mean().item()


def test_callback_grows_dendrites_and_ends_with_the_best_network():
    start = time.perf_counter()
    module = LitMLP()
    callback = DendriteCallback(apical.DendriteConfig(**CONFIG), monitor="val_acc", mode="max")
    trainer = _trainer(devices=1, callbacks=[callback])
    trainer.fit(module, *_loaders())
    ctl = callback.controller
    events = ",".join(h["event"] for h in callback.history)
    assert "dendrite_phase" in events and "installed" in events, events
    assert ctl.done and trainer.should_stop and trainer.current_epoch < 40
    assert apical.dendritic_layers(module) and ctl.model is module
    # the module holds the accepted network: its weights, and the score it was accepted with
    state = module.state_dict()
    for k, v in ctl._accepted_state.items():
        assert torch.equal(state[k], v), k
    assert _accuracy(module) == ctl.accepted_score == max(h["score"] for h in callback.history
                                                          if h["dendrites"] == ctl.dendrites)
    print(f"single-process Lightning cycle: {len(callback.history)} epochs, {time.perf_counter() - start:.1f} s")


def test_callback_rejects_a_bad_mode():
    with pytest.raises(ValueError, match="max"):
        DendriteCallback(mode="maximise")


def test_callback_under_ddp_spawn_two_processes(tmp_path):
    start = time.perf_counter()
    path = tmp_path / "final.safetensors"
    callback = DendriteCallback(apical.DendriteConfig(**CONFIG), module="net", save_path=str(path))
    trainer = _trainer(devices=2, strategy="ddp_spawn", callbacks=[callback])
    trainer.fit(LitMLP(), *_loaders())
    # the workers grew the network; rank 0 saved it, and a fresh module loads it
    net = LitMLP().net
    cfg = apical.DendriteConfig(**CONFIG)
    apical.perforate(net, cfg)
    ctl = apical.Controller(net, cfg)
    apical.load(path, net, ctl)
    events = ",".join(h["event"] for h in ctl.history)
    assert ctl.done and "installed" in events, events
    assert _accuracy(net) == ctl.accepted_score  # the best network, scored on the whole validation set
    print(f"2-process ddp_spawn Lightning cycle: {len(ctl.history)} epochs, {time.perf_counter() - start:.1f} s")


class LitAttention(LitMLP):
    """The same task through a TransformerEncoder: the callback grows dendrites on attention too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        layer = nn.TransformerEncoderLayer(8, 2, 8, dropout=0.0, batch_first=True)
        self.net = nn.Sequential(nn.Unflatten(1, (2, 4)), nn.Linear(4, 8), nn.TransformerEncoder(layer, 1),
                                 nn.Flatten(), nn.Linear(16, 3))


def _fit_briefly(lit, epochs: int) -> DendriteCallback:
    """A short single-process fit with patience 1, so that a dendrite phase comes early."""
    callback = DendriteCallback(apical.DendriteConfig(**dict(CONFIG, patience=1)), monitor="val_acc")
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(lit, *_loaders())
    return callback


def test_callback_grows_dendrites_on_attention():
    lit = LitAttention()
    callback = _fit_briefly(lit, 6)
    names = [n for n, _ in apical.dendritic_layers(lit)]
    assert "net.2.layers.0.self_attn.q_proj" in names and "net.2.layers.0.self_attn.out_proj" in names
    assert any(h["phase"] == "dendrite" for h in callback.history)


class _GRUHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x.reshape(x.shape[0], 2, 4))[0][:, -1])


class LitGRU(LitMLP):
    """The same task read as 2 steps of 4 features by a GRU: the callback grows dendrites on its cell."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = _GRUHead()


def test_callback_grows_dendrites_on_a_gru():
    lit = LitGRU()
    callback = _fit_briefly(lit, 8)
    assert [n for n, _ in apical.dendritic_layers(lit)] == ["net.rnn.cell_l0", "net.head"]
    events = ",".join(h["event"] for h in callback.history)
    assert any(h["phase"] == "dendrite" for h in callback.history) and "installed" in events, events
