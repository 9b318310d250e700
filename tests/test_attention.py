"""nn.MultiheadAttention with dendrites on its q, k, v projection neurons and out_proj."""

import copy
import itertools
import warnings

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


def test_perforating_an_exported_model_turns_off_the_fused_path_of_an_encoder_after_one_already_off():
    """An exported model keeps the encoders it perforated with their fused paths off (and remembers the
    flags). Perforating it again skips those and still turns off the next encoder's fused path; unwrap
    gives every encoder back its own flags."""
    torch.manual_seed(0)
    encoders = [nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True), 1,
                                      enable_nested_tensor=True) for _ in range(2)]
    model = nn.Sequential(*encoders).eval()
    apical.perforate(model, apical.DendriteConfig(include=["0.*"]))
    exported = apical.export(model)
    assert exported[0].layers[0].activation_relu_or_gelu == 0 and not exported[0].use_nested_tensor
    assert exported[1].layers[0].activation_relu_or_gelu == 1 and exported[1].use_nested_tensor
    apical.perforate(exported, apical.DendriteConfig(include=["1.*"]))
    assert exported[1].layers[0].activation_relu_or_gelu == 0 and not exported[1].use_nested_tensor
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        before = exported(x)
        for _, lay in apical.dendritic_layers(exported):
            lay.install_random(1.0)
            lay.dendrite_out.normal_()
        assert (exported(x) - before).abs().max() > 1e-3  # the second encoder's dendrites are used
    apical.unwrap(exported, force=True)
    for enc in exported:
        assert enc.layers[0].activation_relu_or_gelu == 1 and enc.use_nested_tensor is True


def test_only_torchs_encoder_classes_have_their_fast_path_flags_changed():
    """A user's module that happens to have a ``use_nested_tensor`` attribute is not torch's encoder:
    perforating the layers inside it leaves the attribute alone."""

    class MyBlock(nn.Module):
        use_nested_tensor = True

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    model = nn.Sequential(MyBlock())
    apical.perforate(model)
    assert model[0].use_nested_tensor is True and "use_nested_tensor" not in model[0].__dict__
    apical.unwrap(model)
    assert model[0].use_nested_tensor is True and "use_nested_tensor" not in model[0].__dict__


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


# ---------------------------------------------------------------- the plain module as the reference
def _perforated_pair(seed=0, **kw):
    """(plain nn.MultiheadAttention, a perforated copy of it): random biases, so a projection that
    dropped its bias would show."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():
        for p in (ref.in_proj_bias, ref.out_proj.bias):
            if p is not None:
                p.normal_()
    mha = copy.deepcopy(ref)
    apical.perforate(nn.Sequential(mha))
    return ref, mha


def _outcome(module, *args, **kw):
    """What a call gives: ("ok", outputs, warning texts) or ("error", type, message)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = module(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the reference's error is the expected value
        return "error", type(e), str(e)
    return "ok", out, [str(w.message) for w in caught]


def _assert_same(mha, ref, *args, atol=1e-5, **kw):
    got, want = _outcome(mha, *args, **kw), _outcome(ref, *args, **kw)
    assert got[0] == want[0] == "ok", (got, want)
    assert got[2] == want[2]  # the same warnings (mismatched mask types)
    (out, weights), (want_out, want_weights) = got[1], want[1]
    assert out.dtype == want_out.dtype and out.shape == want_out.shape
    torch.testing.assert_close(out, want_out, rtol=0, atol=atol)
    assert (weights is None) == (want_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, want_weights, rtol=0, atol=atol)


def test_dropout_acts_in_training_only_like_the_plain_module():
    p = 0.25  # not F.dropout's default 0.5
    ref, mha = _perforated_pair(dropout=p)
    q, k = torch.randn(5, 3, E), torch.randn(4, 3, E)
    ref.eval()
    mha.eval()
    clean = ref(q, k, k, average_attn_weights=False)[1]
    for kw in ({}, {"average_attn_weights": False}, {"need_weights": False}):
        _assert_same(mha, ref, q, k, k, **kw)  # eval: no dropout
    mha.train()
    ref.train()
    torch.manual_seed(1)
    dropped = mha(q, k, k, average_attn_weights=False)[1]
    # each weight is dropped or scaled by 1 / (1 - p)
    zero = dropped == 0
    torch.testing.assert_close(dropped[~zero], clean[~zero] / (1 - p), rtol=1e-6, atol=0)
    assert 0.15 < zero.float().mean().item() < 0.35
    for kw in ({}, {"average_attn_weights": False}, {"need_weights": False}):
        outs = []
        for module in (mha, ref):  # the same random draws as the plain module's
            torch.manual_seed(2)
            outs.append(module(q, k, k, **kw))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-5)
        assert not torch.allclose(outs[0][0], ref.eval()(q, k, k, **kw)[0], atol=1e-3)
        ref.train()
        if outs[1][1] is not None:
            torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-6)


def _masks(bool_mask):
    """attn_mask [T, S] = [5, 4] and key_padding_mask [N, S] = [3, 4]: bool, or float with -inf / -1e9 / small
    values where the bool would mask."""
    g = torch.Generator().manual_seed(5)
    am = torch.rand(5, 4, generator=g) < 0.3
    am[:, 0] = False  # no row fully masked
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[0, -1] = kpm[2, 1] = True
    if bool_mask:
        return am, kpm
    return (torch.where(am, -1e9, torch.rand(5, 4, generator=g)),
            torch.where(kpm, float("-inf"), 0.0) + 0.1 * torch.rand(3, 4, generator=g))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("am_bool, kpm_bool", [(True, True), (False, False), (True, False), (False, True)])
def test_masks_of_every_accepted_form_match_the_plain_module(am_bool, kpm_bool, need_weights):
    ref, mha = _perforated_pair(dropout=0.0)
    mha.train()
    ref.train()  # not torch's fused inference path
    q, k, v = torch.randn(5, 3, E), torch.randn(4, 3, E), torch.randn(4, 3, E)
    am = _masks(am_bool)[0]
    kpm = _masks(kpm_bool)[1]
    am3 = am[None].repeat(3 * H, 1, 1)  # [N * heads, T, S]
    am3[1, 2, 3] = am3[4, 0, 2] = (True if am_bool else -1e9)  # masks differing per batch and head
    nw = {"need_weights": need_weights}
    for kw in ({"attn_mask": am}, {"attn_mask": am3}, {"key_padding_mask": kpm},
               {"attn_mask": am, "key_padding_mask": kpm}, {"attn_mask": am3, "key_padding_mask": kpm},
               {"attn_mask": am3, "average_attn_weights": False}):
        _assert_same(mha, ref, q, k, v, **kw, **nw)


@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched_inputs_with_masks_match_the_plain_module(need_weights):
    ref, mha = _perforated_pair(dropout=0.0)
    q, k = torch.randn(5, E), torch.randn(4, E)
    am, kpm = _masks(True)
    am3 = am[None].repeat(H, 1, 1)  # unbatched: [heads, T, S]
    am3[1, 2, 3] = True
    for kw in ({}, {"attn_mask": am}, {"attn_mask": am3}, {"key_padding_mask": kpm[0]},
               {"attn_mask": am3, "key_padding_mask": kpm[2]}):
        _assert_same(mha, ref, q, k, k, need_weights=need_weights, **kw)


def test_is_causal_hint_like_the_plain_module():
    ref, mha = _perforated_pair(dropout=0.0)
    x = torch.randn(5, 3, E)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    kpm = _masks(True)[1].new_zeros(3, 5)
    kpm[1, 1] = True
    for kw in ({"need_weights": True}, {"need_weights": True, "key_padding_mask": kpm}, {"need_weights": False},
               {"need_weights": False, "key_padding_mask": kpm}):
        _assert_same(mha, ref, x, x, x, attn_mask=causal, is_causal=True, **kw)
    # with a key_padding_mask merged into it the mask is no longer causal: the plain module drops the
    # hint and uses the mask as given, even one that is not causal
    other = torch.zeros(5, 5, dtype=torch.bool)
    other[0, 1] = other[3, 0] = True
    _assert_same(mha, ref, x, x, x, attn_mask=other, is_causal=True, need_weights=False, key_padding_mask=kpm)
    _assert_same(mha, ref, x, x, x, attn_mask=other, need_weights=False)  # no hint: the mask is kept
    for module in (mha, ref):
        with pytest.raises(RuntimeError, match="^Need attn_mask if specifying the is_causal hint"):
            module(x, x, x, is_causal=True)


def test_bad_masks_and_inputs_are_refused_like_the_plain_module():
    ref, mha = _perforated_pair(dropout=0.0)
    q, k = torch.randn(5, 3, E), torch.randn(4, 3, E)
    # torch's own checks, reached before apical's: the same error and message
    for args, kw in [
        ((q, k, k), {"attn_mask": torch.zeros(5, 4, dtype=torch.long)}),
        ((q, k, k), {"key_padding_mask": torch.zeros(3, 4, dtype=torch.int32)}),
        ((q, k, k), {"key_padding_mask": torch.zeros(3, 4, dtype=torch.long), "attn_mask": torch.zeros(5, 4)}),
        ((q, k, k), {"attn_mask": torch.zeros(1, 3 * H, 5, 4)}),
        ((q, k, k), {"key_padding_mask": torch.zeros(4, dtype=torch.bool)}),
        ((q[:, 0], k[:, 0], k[:, 0]), {"attn_mask": torch.zeros(H + 1, 5, 4)}),
        ((q[:, 0], k[:, 0], k[:, 0]), {"key_padding_mask": torch.zeros(1, 4, dtype=torch.bool)}),
    ]:
        got, want = _outcome(mha, *args, **kw), _outcome(ref, *args, **kw)
        assert got[0] == want[0] == "error" and got[1:] == want[1:], (kw, got, want)
    # apical's own checks: the error names the shape given and the one expected
    with pytest.raises(RuntimeError, match=r"^the 2D attn_mask has shape \(5, 3\), expected \(5, 4\)$"):
        mha(q, k, k, attn_mask=torch.zeros(5, 3))
    with pytest.raises(RuntimeError, match=r"2D attn_mask .*\[5, 3\].*\(5, 4\)"):
        ref(q, k, k, attn_mask=torch.zeros(5, 3))
    # torch raises AssertionError for these two; apical a RuntimeError / ValueError naming the same numbers
    with pytest.raises(RuntimeError, match=r"^key_padding_mask has shape \(3, 5\), expected \(3, 4\)$"):
        mha(q, k, k, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(AssertionError, match="to be 4, but got 5"):
        ref(q, k, k, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^expected embedding dimension 8, got 6$"):
        mha(torch.randn(5, 3, 6), k, k)
    with pytest.raises(AssertionError, match="embedding dimension of 8, but got 6"):
        ref(torch.randn(5, 3, 6), k, k)


def test_mismatched_mask_types_warn_like_the_plain_module():
    ref, mha = _perforated_pair(dropout=0.0)
    q, k = torch.randn(5, 3, E), torch.randn(4, 3, E)
    am, kpm = _masks(True)
    fam, fkpm = _masks(False)
    for kw in ({"attn_mask": fam, "key_padding_mask": kpm}, {"attn_mask": am, "key_padding_mask": fkpm}):
        got = _outcome(mha, q, k, k, **kw)
        assert got[2] == ["Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead."]
        _assert_same(mha, ref, q, k, k, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("add_bias_kv, add_zero_attn", [(True, False), (False, True), (True, True)])
def test_bias_kv_and_zero_attention_keep_the_dtype(dtype, add_bias_kv, add_zero_attn):
    ref, mha = _perforated_pair(dropout=0.0, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    ref.to(dtype)
    mha.to(dtype)
    q, k = torch.randn(5, 3, E, dtype=dtype), torch.randn(4, 3, E, dtype=dtype)
    am, kpm = _masks(True)
    atol = 1e-12 if dtype == torch.float64 else 0.05
    for kw in ({}, {"attn_mask": am, "key_padding_mask": kpm}, {"need_weights": False}):
        _assert_same(mha, ref, q, k, k, atol=atol, **kw)
        assert mha(q, k, k, **kw)[0].dtype == dtype


def test_nested_tensors_are_refused_with_a_clear_error():
    _, mha = _perforated_pair()
    dense = torch.randn(2, 4, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that nested tensors are a prototype (given once)
        nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(4, E)])
    for args in ((nested, dense, dense), (dense, nested, dense), (dense, dense, nested), (nested, nested, nested)):
        with pytest.raises(ValueError, match="^apical's dendritic MultiheadAttention does not take nested tensors$"):
            mha(*args)


def test_wrap_called_directly_passes_the_activation_and_refuses_a_subclass():
    from apical.dendrites.attention import DendriticMultiheadAttention

    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    mha = DendriticMultiheadAttention.wrap(nn.MultiheadAttention(E, H))
    assert [getattr(mha, n).activation for n in names] == ["sigmoid"] * 4
    mha = DendriticMultiheadAttention.wrap(nn.MultiheadAttention(E, H), activation="tanh")
    assert [getattr(mha, n).activation for n in names] == ["tanh"] * 4

    class MyAttention(nn.MultiheadAttention):
        pass

    reason = ("MyAttention subclasses nn.MultiheadAttention with code of its own: "
              "register a layer class for it (apical.register_layer)")
    assert DendriticMultiheadAttention.unsupported(MyAttention(E, H)) == reason
    with pytest.raises(ValueError) as err:
        DendriticMultiheadAttention.wrap(MyAttention(E, H))
    assert str(err.value) == f"cannot wrap MyAttention: {reason}"


def test_a_plain_attention_whose_out_proj_cannot_be_wrapped_is_reported():
    from apical.dendrites.attention import DendriticMultiheadAttention

    mha = nn.MultiheadAttention(E, H)
    mha.out_proj = nn.LazyLinear(E)
    lazy = "it is a lazy layer that has not been initialised yet: run one forward pass through the model first"
    assert DendriticMultiheadAttention.unsupported(mha) == f"its out_proj: {lazy}"
    reasons = {e.name: e.reason for e in apical.coverage(nn.Sequential(mha, nn.Linear(E, E)))}
    assert reasons["0"] == f"its out_proj: {lazy}"
    assert DendriticMultiheadAttention.unsupported(nn.MultiheadAttention(E, H)) is None


def test_export_without_sets_reads_the_attention_weights_and_unwraps_to_the_plain_module():
    ref, mha = _perforated_pair(dropout=0.0, kdim=6, vdim=5)
    ref.eval()
    q, k, v = torch.randn(5, 3, E), torch.randn(4, 3, 6), torch.randn(4, 3, 5)
    with torch.no_grad():
        ex = apical.export(nn.Sequential(mha))
        assert ex[0].q_proj is None and ex[0].k_proj is None and ex[0].v_proj is None
        assert isinstance(ex[0].out_proj, nn.Linear) and not isinstance(ex[0].out_proj, apical.DendriticLinear)
        _assert_same(ex[0], ref, q, k, v)
        apical.unwrap(ex)
        assert type(ex[0]) is nn.MultiheadAttention and type(ex[0].out_proj) is type(ref.out_proj)
        _assert_same(ex[0], ref, q, k, v)


@pytest.mark.parametrize("shape", [(1, 3, 5), (8, 1, 5), (8, 3, 1), (4, 3, 5)])
def test_a_3d_mask_of_the_wrong_shape_is_refused_like_the_plain_module(shape):
    """torch refuses a 3D attn_mask that is not [N * heads, T, S]; so does the perforated module, rather than
    broadcasting it (N=2, heads=4, T=3, S=5)."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 4, batch_first=True)
    net = nn.Sequential()
    net.add_module("attn", copy.deepcopy(plain))
    apical.perforate(net)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.zeros(shape, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="3D attn_mask"):
        plain(q, kv, kv, attn_mask=mask)
    with pytest.raises(RuntimeError, match=rf"^the 3D attn_mask has shape \({shape[0]}, {shape[1]}, {shape[2]}\), "
                                           r"expected \(8, 3, 5\)$"):
        net.attn(q, kv, kv, attn_mask=mask)
    good = torch.rand(8, 3, 5) > 0.3
    good[..., 0] = False  # no row fully masked
    want, _ = plain(q, kv, kv, attn_mask=good)
    got, _ = net.attn(q, kv, kv, attn_mask=good)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
