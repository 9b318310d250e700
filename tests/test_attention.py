"""nn.MultiheadAttention with dendrites on its q, k, v projection neurons and out_proj."""

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import apical

E, H = 8, 2


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, **kw)
    return mha, copy.deepcopy(mha)


VARIANTS = list(itertools.product([True, False], [None, 6], [True, False], [False, True], [False, True]))


@pytest.mark.parametrize("batch_first, kdim, bias, add_bias_kv, add_zero_attn", VARIANTS)
def test_function_and_parameters_kept_at_insertion(batch_first, kdim, bias, add_bias_kv, add_zero_attn):
    mha, ref = _pair(batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias, add_bias_kv=add_bias_kv,
                     add_zero_attn=add_zero_attn)
    params = dict(mha.named_parameters())
    apical.perforate(nn.Sequential(mha))
    assert isinstance(mha, nn.MultiheadAttention) and mha.batch_first == batch_first
    assert {n: p for n, p in mha.named_parameters() if "dendrite" not in n} == {
        n.replace("out_proj.", "out_proj.base."): p for n, p in params.items()}
    kd = kdim or E
    q, k, v = torch.randn(3, 5, E), torch.randn(3, 4, kd), torch.randn(3, 4, kd)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[0, -1] = True
    am = torch.zeros(5, 4, dtype=torch.bool)
    am[1, 0] = True
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": am}, {"key_padding_mask": kpm, "attn_mask": am,
               "need_weights": False}, {"attn_mask": am.float() * -1e9, "average_attn_weights": False}):
        for mode in ("eval", "train"):  # eval: the plain module takes torch's fused path where it can
            mha.train(mode == "train")
            ref.train(mode == "train")
            got, want = mha(q, k, v, **kw), ref(q, k, v, **kw)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
            assert (got[1] is None) == (want[1] is None)
            if got[1] is not None:
                torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)


def test_self_attention_causal_and_unbatched():
    mha, ref = _pair(batch_first=True)
    apical.perforate(nn.Sequential(mha))
    mha.eval()
    ref.eval()
    x = torch.randn(2, 5, E)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for kw in ({"attn_mask": causal, "is_causal": True, "need_weights": False}, {"attn_mask": causal}):
        torch.testing.assert_close(mha(x, x, x, **kw)[0], ref(x, x, x, **kw)[0], rtol=0, atol=1e-5)
    xu = torch.randn(5, E)
    for a, b in zip(mha(xu, xu, xu), ref(xu, xu, xu), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _np(t):
    return t.detach().double().numpy()


def _attention_reference(x, w, q_extra, k_extra, v_extra):
    """Self-attention by hand in float64 (torch for the gradient): projections + extra terms
    (the dendrites' contribution, held constant), heads, softmax, out_proj. Returns out, q, k, v."""
    xt = torch.tensor(_np(x), requires_grad=True)
    n, length, _ = xt.shape
    proj = []
    for i, extra in enumerate((q_extra, k_extra, v_extra)):
        wi = torch.tensor(w["in_proj_weight"][i * E:(i + 1) * E])
        bi = torch.tensor(w["in_proj_bias"][i * E:(i + 1) * E])
        p = xt @ wi.T + bi + torch.tensor(extra)
        p.retain_grad()
        proj.append(p)
    q, k, v = proj
    hd = E // H

    def heads(t):
        return t.reshape(n, length, H, hd).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / np.sqrt(hd)
    out = (torch.softmax(scores, -1) @ heads(v)).transpose(1, 2).reshape(n, length, E)
    out = out @ torch.tensor(w["out_proj.weight"]).T + torch.tensor(w["out_proj.bias"])
    return xt, out, q, k, v


def _sig(z):
    return 1 / (1 + np.exp(-z))


def test_perforated_forward_and_gradient_against_a_hand_built_attention():
    mha, _ = _pair(batch_first=True)
    apical.perforate(nn.Sequential(mha))  # pb: perforated
    w = {n: _np(p) for n, p in mha.named_parameters()}
    w["out_proj.weight"], w["out_proj.bias"] = w["out_proj.base.weight"], w["out_proj.base.bias"]
    layers = [mha.q_proj, mha.k_proj, mha.v_proj]
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        layer.install_random(1.0, g)
        with torch.no_grad():
            layer.dendrite_out.normal_(generator=g)
    x = torch.randn(2, 5, E, generator=g)
    extras = [_np(layer.dendrite_out[0]) * _sig(_np(x) @ _np(layer.dendrite_weight[0]).T + _np(layer.dendrite_bias[0]))
              for layer in layers]
    xt, want, *_ = _attention_reference(x, w, *extras)
    target = torch.randn(2, 5, E, generator=g)
    (want * target.double()).sum().backward()
    xg = x.clone().requires_grad_(True)
    got = mha(xg, xg, xg, need_weights=False)[0]
    (got * target).sum().backward()
    np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-5)
    # no error flows back through a dendrite: the gradient is the one with dendrites held constant
    np.testing.assert_allclose(_np(xg.grad), _np(xt.grad), rtol=1e-4, atol=1e-5)
    assert all(layer.dendrite_weight.grad is None for layer in layers)


def test_dendrite_statistics_on_qkv_neurons_against_numpy():
    mha, _ = _pair(batch_first=True, dropout=0.0)
    cfg = apical.DendriteConfig(candidate_lr_scale=1.0)
    apical.perforate(nn.Sequential(mha), cfg)
    w = {n: _np(p) for n, p in mha.named_parameters()}
    w["out_proj.weight"], w["out_proj.bias"] = w["out_proj.base.weight"], w["out_proj.base.bias"]
    layers = [mha.q_proj, mha.k_proj, mha.v_proj]
    g = torch.Generator().manual_seed(2)
    for layer in layers:
        layer.add_candidates(3, 1.0, g)
        layer.set_training_mode("dendrite", perforated=True)
    mha.train()
    x = torch.randn(4, 6, E, generator=g)
    target = torch.randn(4, 6, E, generator=g)
    (mha(x, x, x)[0] * target).sum().backward()
    zeros = np.zeros((4, 6, E))
    _, out, q, k, v = _attention_reference(x, w, zeros, zeros, zeros)
    (out * target.double()).sum().backward()
    for layer, proj in zip(layers, (q, k, v), strict=True):
        delta = proj.grad.numpy().reshape(-1, E)  # the neuron's error dL/dz over every token
        a = _sig(np.einsum("ti,coi->tco", _np(x).reshape(-1, E), _np(layer.candidate_weight))
                 + _np(layer.candidate_bias))  # [tokens, C, O]
        cov = ((a - a.mean(0)) * (delta - delta.mean(0))[:, None, :]).mean(0)
        m = layer.stats.moments()
        assert layer.stats.n == 24
        np.testing.assert_allclose(m["cov"].numpy(), cov, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(m["var_d"].numpy(), delta.var(0), rtol=1e-4, atol=1e-12)
        assert layer.candidate_weight.grad is not None and layer.candidate_weight.grad.abs().sum() > 0


def test_save_load_export_unwrap_with_separate_projection_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(E, H, kdim=6, vdim=5, batch_first=True))
    q, k, v = torch.randn(2, 5, E), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    fresh_state = copy.deepcopy(model)
    apical.perforate(model)
    assert model[0].k_proj.weight_tail == (6,) and model[0].v_proj.weight_tail == (5,)
    g = torch.Generator().manual_seed(3)
    for name in ("q_proj", "v_proj", "out_proj"):  # k_proj keeps no set: the export reads the module's weight
        layer = getattr(model[0], name)
        layer.install_random(1.0, g)
        with torch.no_grad():
            layer.dendrite_out.normal_(generator=g)
    model.eval()
    with torch.no_grad():
        want = model[0](q, k, v)[0]
        apical.save(tmp_path / "a.safetensors", model)
        fresh = copy.deepcopy(fresh_state)
        apical.load(tmp_path / "a.safetensors", fresh)
        fresh.eval()
        assert torch.equal(fresh[0](q, k, v)[0], want)
        ex = apical.export(model)
        assert ex[0].k_proj is None
        torch.testing.assert_close(ex[0](q, k, v)[0], want, rtol=1e-5, atol=1e-6)
        apical.unwrap(model, force=True)
        assert type(model[0]) is nn.MultiheadAttention and isinstance(model[0].out_proj, nn.Linear)
        assert not hasattr(model[0], "q_proj")
        torch.testing.assert_close(model[0](q, k, v)[0], fresh_state[0](q, k, v)[0], rtol=0, atol=1e-6)


def test_transformer_encoder_keeps_its_function_and_turns_off_the_fused_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    ref = copy.deepcopy(enc)
    apical.perforate(enc)
    assert enc.layers[0].activation_relu_or_gelu == 0 and not enc.use_nested_tensor
    x = torch.randn(2, 5, E)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    with torch.no_grad():
        # the plain module runs torch's fused kernels here (zeros at padded positions): compare the rest
        torch.testing.assert_close(enc(x, src_key_padding_mask=kpm)[~kpm], ref(x, src_key_padding_mask=kpm)[~kpm],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(enc(x), ref(x), rtol=0, atol=1e-5)
        for _, lay in apical.dendritic_layers(enc):
            lay.install_random(1.0)
            lay.dendrite_out.normal_()
        assert (enc(x) - ref(x)).abs().max() > 1e-3  # the dendrites are used, not bypassed by a fused path
    apical.unwrap(enc, force=True)
    assert enc.layers[0].activation_relu_or_gelu == 1 and enc.use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), rtol=0, atol=1e-6)


def test_a_subclass_of_multihead_attention_is_left_alone_and_reported():
    class MyAttention(nn.MultiheadAttention):
        pass

    model = nn.Sequential(MyAttention(E, H), nn.Linear(E, E))
    with pytest.warns(UserWarning, match="Most layer parameters sit in modules left out"):
        apical.perforate(model)
    assert [n for n, _ in apical.dendritic_layers(model)] == ["1"]
    reasons = {e.name: e.reason for e in apical.coverage(model)}
    assert "register a layer class" in reasons["0"]
    assert "reads its weights directly" in reasons["0.out_proj"]
