"""Acceptance on real models built from configs with random weights (no downloads): transformers BERT,
GPT-2 and ResNet, torch_geometric GIN, nn.TransformerEncoder.

Each: the output is unchanged at insertion, >= 95% of the layer parameters sit in wrapped modules
with their original Parameter objects, one pb cycle grows a set in every wrapped layer, and a fresh
model loaded from the checkpoint and the export compute the grown model's outputs."""

import time

import pytest
import torch
from torch import nn

import apical

CFG = dict(patience=1, candidates=2, max_dendrites=1, max_dendrite_epochs=1, min_dendrite_epochs=1, seed=0)


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0

    def run(m):
        out = m(input_ids=ids, attention_mask=mask)
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])

    return transformers.BertModel(cfg), run


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    return transformers.GPT2LMHeadModel(cfg), lambda m: m(input_ids=ids).logits.flatten()


def _resnet():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return transformers.ResNetForImageClassification(cfg), lambda m: m(pixel_values=x).logits.flatten()


def _gin():
    models = pytest.importorskip("torch_geometric.nn.models")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, generator=g)
    edges = torch.randint(0, 12, (2, 30), generator=g)
    return models.GIN(6, 16, 3, 3), lambda m: m(x, edges).flatten()


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x, mask):
        return self.head(self.encoder(x, mask=mask, is_causal=True))


def _encoder():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    return _Encoder(), lambda m: m(x, causal).flatten()


MODELS = {"bert": _bert, "gpt2": _gpt2, "resnet": _resnet, "gin": _gin, "transformer_encoder": _encoder}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_through_the_whole_product(name, tmp_path):
    start = time.perf_counter()
    model, run = MODELS[name]()
    model.eval()
    originals = {id(p) for p in model.parameters()}
    with torch.no_grad():
        before = run(model)
    cfg = apical.DendriteConfig(**CFG)
    apical.perforate(model, cfg)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(model), before, rtol=0, atol=1e-5)  # function kept at insertion
    report = apical.coverage(model)
    assert report.fraction >= 0.95, str(report)
    assert originals <= {id(p) for p in model.parameters()}  # the original Parameter objects train on
    layers = apical.dendritic_layers(model)
    wrapped = {id(p) for _, layer in layers for p in layer.base.parameters()}
    wrapped |= {id(p) for m in model.modules() if isinstance(m, apical.DendriticMultiheadAttention)
                for p in m._parameters.values() if p is not None}
    assert report.wrapped_parameters == sum(p.numel() for p in model.parameters() if id(p) in wrapped)

    ctl = apical.Controller(model, cfg)
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-3)
    target = torch.randn(before.shape, generator=torch.Generator().manual_seed(2))
    for _ in range(3):  # improve, plateau (dendrite phase), install
        model.train()
        opt.zero_grad()
        ((run(model) - target) ** 2).mean().backward()
        opt.step()
        step = ctl.step(1.0)
        if step.restructured:
            opt = torch.optim.Adam(ctl.parameters(), lr=1e-3)
    assert "installed" in step.event
    assert {n: layer.num_dendrites for n, layer in layers} == {n: 1 for n, _ in layers}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in layers:  # v away from zero, so that every set shows in the outputs
            layer.dendrite_out.copy_(torch.randn(layer.dendrite_out.shape, generator=g))
    model.eval()
    with torch.no_grad():
        want = run(model)
        assert (want - before).abs().max() > 1e-3
        apical.save(tmp_path / "m.safetensors", model, ctl, opt)
        fresh, _ = MODELS[name]()
        apical.load(tmp_path / "m.safetensors", fresh)
        fresh.eval()
        torch.testing.assert_close(run(fresh), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(run(apical.export(model)), want, rtol=1e-5, atol=1e-5)
    print(f"{name}: {report.summary()}; {time.perf_counter() - start:.2f} s")
