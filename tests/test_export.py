import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn
from torch.overrides import TorchFunctionMode

import apical
from apical.dendrites.layer import DendriticLayer
from apical.export import FusedDendriticConv, FusedDendriticLinear, export

CASES = {
    "linear": (lambda: nn.Linear(5, 4), (7, 5)),
    "linear-3d": (lambda: nn.Linear(5, 4), (3, 6, 5)),  # (batch, time, features)
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, bias=False), (2, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, dilation=(1, 2, 1)), (2, 2, 4, 5, 4)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 7, 7)),
    "depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, padding_mode="reflect"), (2, 4, 6, 6)),
}


def _grow(model: nn.Module, dendrites: int, activation: str = "sigmoid", mode: str = "pb") -> nn.Module:
    """Perforate ``model`` and install ``dendrites`` random sets with random non-zero v and cascade."""
    apical.perforate(model, apical.DendriteConfig(mode=mode, activation=activation))
    for _, layer in apical.dendritic_layers(model):
        for _ in range(dendrites):
            layer.install_random(1.0)
        with torch.no_grad():
            layer.dendrite_out.normal_()
            layer.dendrite_cascade.normal_()
    return model


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(16, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3),
    )


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
        nn.Conv2d(8, 4, 1, groups=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
    )


def _trained_bn(model: nn.Module, x: torch.Tensor) -> None:
    """A few training-mode forwards so BatchNorm's running statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    model.eval()


def _assert_plain(exported: nn.Module) -> None:
    for name, module in exported.named_modules():
        assert not isinstance(module, DendriticLayer), name
        assert not module.training, name
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert len(getattr(module, attr)) == 0, (name, attr)


class _CountOps(TorchFunctionMode):
    OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("dendrites", [0, 1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_the_dendritic_layer(case, dendrites, activation):
    make, shape = CASES[case]
    model = _grow(nn.Sequential(make()), dendrites, activation)
    model.eval()
    x = torch.randn(*shape)
    expected = model(x)
    exported = export(model)
    _assert_plain(exported)
    if dendrites == 0:
        assert type(exported[0]) is type(model[0].base)
    else:
        fused = (FusedDendriticLinear, FusedDendriticConv)["conv" in type(model[0]).__name__.lower()]
        assert isinstance(exported[0], fused)
        assert exported[0].cascaded == (dendrites > 1)
    with torch.no_grad(), _CountOps() as ops:
        got = exported(x)  # eager inference: the in-place path
    assert ops.calls == 1  # the wrapped layer and all dendrites in one matmul / convolution
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    got = exported(x)  # with autograd: the functional path, which can be backpropagated
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    got.sum().backward()
    if dendrites:
        op = getattr(exported[0], "linear", None) or exported[0].conv
        assert op.weight.grad is not None and exported[0].dendrite_out.grad is not None


def test_unbatched_conv_input():
    make, shape = CASES["grouped"]
    model = _grow(nn.Sequential(make()), 2).eval()
    x = torch.randn(*shape[1:])
    assert torch.allclose(export(model)(x), model(x), atol=1e-5, rtol=0)


def test_float64_is_kept():
    model = _grow(nn.Sequential(nn.Linear(4, 3).double()), 2).eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    exported = export(model)
    assert exported[0].linear.weight.dtype == torch.float64
    assert torch.allclose(exported(x), model(x), atol=1e-12, rtol=0)


def test_mlp_with_batchnorm_dropout_controller_and_candidates():
    torch.manual_seed(3)
    model = _mlp()
    cfg = apical.DendriteConfig(mode="pb")
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)  # registers a forward pre-hook on the model
    layers = [layer for _, layer in apical.dendritic_layers(model)]
    for i, layer in enumerate(layers):  # 2, 1, 0 installed sets
        for _ in range(2 - i):
            layer.install_random(1.0)
        with torch.no_grad():
            layer.dendrite_out.normal_()
            layer.dendrite_cascade.normal_()
    layers[0].add_candidates(4, 1.0)  # a dendrite phase in progress: candidates are not exported
    x = torch.randn(32, 6)
    _trained_bn(model, x)
    expected = model(x)
    model.register_forward_hook(lambda m, i, o: o * 100)  # a user hook is dropped too
    model[1].register_forward_pre_hook(lambda m, i: None)
    model.train()  # the export is in eval mode whatever the model's mode

    exported = export(model)

    _assert_plain(exported)
    assert [type(m).__name__ for m in exported] == [
        "FusedDendriticLinear", "BatchNorm1d", "ReLU", "Dropout",
        "FusedDendriticLinear", "Tanh", "Dropout", "Linear",
    ]
    assert torch.allclose(exported(x), expected, atol=1e-5, rtol=0)
    # the original is untouched and shares no tensor with the export
    assert model.training and layers[0].num_candidates == 4 and len(model._forward_pre_hooks) == 1
    assert len(model._forward_hooks) == 1
    assert isinstance(model[0], DendriticLayer)
    own = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    theirs = {p.data_ptr() for p in exported.parameters()} | {b.data_ptr() for b in exported.buffers()}
    assert not own & theirs
    # the same parameters as the model computes with (every Linear has a bias here)
    assert sum(p.numel() for p in exported.parameters()) == apical.parameter_count(model)
    ctl.close()


def _weight_normed_mlp(dtype=torch.float32):
    """Linear 4-6 with one dendrite set, ReLU, Linear 6-2 under the (deprecated) weight_norm hook."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(model[2])
    apical.perforate(model, apical.DendriteConfig(include=["0"]))
    model[0].install_random(1.0)
    return model


def test_weight_norm_hook_is_kept():
    model = _weight_normed_mlp()
    with torch.no_grad():
        model[0].dendrite_out.normal_()
        model[2].weight_g.mul_(3.0)  # only the hook turns this into the weight used
    model.eval()
    x = torch.randn(5, 4)
    expected = model(x)
    exported = export(model)
    assert len(exported[2]._forward_pre_hooks) == 1
    assert torch.allclose(exported(x), expected, atol=1e-5, rtol=0)


def test_export_of_a_single_layer_and_bad_input():
    model = _grow(nn.Sequential(nn.Conv1d(2, 4, 3)), 1)
    assert isinstance(export(model[0]), FusedDendriticConv)
    with pytest.raises(TypeError):
        export("model")


def _graph_models():
    torch.manual_seed(5)
    mlp = _grow(_mlp(), 2)
    _trained_bn(mlp, torch.randn(16, 6))
    cnn = _grow(_cnn(), 3, activation="tanh")
    _trained_bn(cnn, torch.randn(4, 3, 8, 8))
    return [(export(mlp), torch.randn(16, 6)), (export(cnn), torch.randn(4, 3, 8, 8))]


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    for exported, x in _graph_models():
        expected = exported(x)
        compiled = torch.compile(exported, fullgraph=True, backend=backend)
        assert torch.allclose(compiled(x), expected, atol=1e-5, rtol=0)
        with torch.no_grad():
            assert torch.allclose(compiled(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [True, False])
def test_jit_trace(grad):
    for exported, x in _graph_models():
        expected = exported(x)
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in recent torch
            traced = torch.jit.trace(exported, x)
            assert torch.allclose(traced(x), expected, atol=1e-5, rtol=0)
            assert torch.allclose(traced(2 * x), exported(2 * x), atol=1e-5, rtol=0)


_HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
_HAVE_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


@pytest.mark.skipif(not _HAVE_ORT, reason="onnx / onnxruntime are not installed")
@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_runs_in_onnxruntime(dynamo, tmp_path):
    if dynamo and not _HAVE_ONNXSCRIPT:
        pytest.skip("the dynamo ONNX exporter needs onnxscript")
    import onnxruntime as ort

    for i, (exported, x) in enumerate(_graph_models()):
        expected = exported(x).detach().numpy()
        path = tmp_path / f"model{i}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.no_grad():
                    torch.onnx.export(exported, (x,), str(path), dynamo=dynamo, verbose=False)
            except TypeError:  # an older torch without the dynamo switch
                if dynamo:
                    pytest.skip("this torch has no dynamo ONNX exporter")
                torch.onnx.export(exported, (x,), str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert abs(got - expected).max() < 1e-5


# ---------------------------------------------------------------------------------- against numpy
def _np_act(name: str, h: np.ndarray) -> np.ndarray:
    return {"sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)), "tanh": np.tanh, "relu": lambda a: np.maximum(a, 0.0)}[
        name](h)


def _np_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, padding: int, groups: int) -> np.ndarray:
    """Cross-correlation, stride 1, zero padding, grouped: written out with numpy."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    patches = sliding_window_view(xp, (k, k), axis=(2, 3))  # [N, C, H', W', k, k]
    ci, co = x.shape[1] // groups, w.shape[0] // groups
    out = [np.einsum("ncyxij,ocij->noyx", patches[:, g * ci : (g + 1) * ci], w[g * co : (g + 1) * co])
           for g in range(groups)]
    return np.concatenate(out, axis=1) + b[None, :, None, None]


def _np_dendritic(x, w, b, dw, db, v, u, act, op, chan):
    """z = op(x, W, b) + sum_k v_k * act(op(x, D_k, b_k) + sum_{e<k} u[k, e] * a_e), per channel."""
    z = op(x, w, b)
    acts = []
    for k in range(dw.shape[0]):
        h = op(x, dw[k], db[k])
        for e in range(k):
            h = h + chan(u[k, e]) * acts[e]
        acts.append(_np_act(act, h))
        z = z + chan(v[k]) * acts[k]
    return z


def _set_dendrites(layer: DendriticLayer, seed: int) -> dict[str, np.ndarray]:
    """Overwrite every tensor of ``layer`` (2 installed sets) with values drawn here; the cascade's unread
    entries (diagonal, e >= k) are non-zero too, and must be ignored."""
    rng = np.random.default_rng(seed)
    o, tail = layer.out_channels, layer.weight_tail
    vals = {
        "w": rng.normal(size=(o, *tail)), "b": rng.normal(size=o),
        "dw": rng.normal(size=(2, o, *tail)), "db": rng.normal(size=(2, o)),
        "v": rng.normal(size=(2, o)) + 0.5, "u": rng.normal(size=(2, 2, o)) * 2.0,
    }
    targets = {"w": layer.base.weight, "b": layer.base.bias, "dw": layer.dendrite_weight, "db": layer.dendrite_bias,
               "v": layer.dendrite_out, "u": layer.dendrite_cascade}
    if layer.base.bias is None:  # a wrapped layer without bias adds zero
        del targets["b"]
        vals["b"] = np.zeros(o)
    with torch.no_grad():
        for key, tensor in targets.items():
            assert tensor.shape == vals[key].shape, key
            tensor.copy_(torch.from_numpy(vals[key]))
    assert np.all(vals["u"][1, 0] != 0)  # the one cascade entry that is read
    return vals


def _dendritic_model(base: nn.Module, activation: str, seed: int) -> tuple[nn.Sequential, dict[str, np.ndarray]]:
    model = nn.Sequential(base, nn.Tanh()).double()
    apical.perforate(model, apical.DendriteConfig(mode="pb", activation=activation))
    layer = model[0]
    for _ in range(2):
        layer.install_random(1.0)
    return model, _set_dendrites(layer, seed)


def _check_plain_structure(exported: nn.Module, fused_type: type, shapes: dict[str, tuple[int, ...]]) -> None:
    assert not any(isinstance(m, DendriticLayer) for m in exported.modules())
    assert type(exported[0]) is fused_type and type(exported[1]) is nn.Tanh
    for m in exported.modules():  # only torch.nn modules and the two fused ones
        assert type(m).__module__.startswith("torch.nn") or type(m) in (FusedDendriticLinear, FusedDendriticConv)
    got = {n: tuple(p.shape) for n, p in exported.named_parameters()}
    assert got == shapes
    assert all(p.dtype == torch.float64 for p in exported.parameters())


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_fused_linear_matches_numpy(activation):
    model, t = _dendritic_model(nn.Linear(5, 4), activation, seed=1)
    x = np.random.default_rng(2).normal(size=(7, 5))
    expected = np.tanh(_np_dendritic(x, t["w"], t["b"], t["dw"], t["db"], t["v"], t["u"], activation,
                                     lambda a, w, b: a @ w.T + b, lambda p: p))
    exported = export(model)
    _check_plain_structure(exported, FusedDendriticLinear, {
        "0.linear.weight": (12, 5), "0.linear.bias": (12,), "0.dendrite_out": (2, 4), "0.dendrite_cascade": (2, 2, 4),
    })
    fused = exported[0]
    assert fused.dendrites == 2 and fused.cascaded and fused.activation == activation
    # documented layout: rows [0, O) the wrapped layer's, rows [(k + 1) O, (k + 2) O) set k's
    np.testing.assert_array_equal(fused.linear.weight.detach().numpy(), np.concatenate([t["w"], *t["dw"]]))
    np.testing.assert_array_equal(fused.linear.bias.detach().numpy(), np.concatenate([t["b"], *t["db"]]))
    np.testing.assert_array_equal(fused.dendrite_out.detach().numpy(), t["v"])
    xt = torch.from_numpy(x)
    with torch.no_grad():
        np.testing.assert_allclose(exported(xt).numpy(), expected, rtol=1e-10, atol=1e-12)  # in place
    np.testing.assert_allclose(exported(xt).detach().numpy(), expected, rtol=1e-10, atol=1e-12)  # functional


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("groups", [1, 2])
def test_fused_conv2d_matches_numpy(groups, activation):
    model, t = _dendritic_model(nn.Conv2d(4, 6, 3, padding=1, groups=groups), activation, seed=3 + groups)
    x = np.random.default_rng(4).normal(size=(2, 4, 5, 5))
    expected = np.tanh(_np_dendritic(x, t["w"], t["b"], t["dw"], t["db"], t["v"], t["u"], activation,
                                     lambda a, w, b: _np_conv2d(a, w, b, 1, groups), lambda p: p[None, :, None, None]))
    exported = export(model)
    _check_plain_structure(exported, FusedDendriticConv, {
        "0.conv.weight": (18, 4 // groups, 3, 3), "0.conv.bias": (18,),
        "0.dendrite_out": (2, groups, 6 // groups, 1, 1), "0.dendrite_cascade": (2, 2, groups, 6 // groups, 1, 1),
    })
    fused = exported[0]
    assert fused.dendrites == 2 and fused.cascaded and fused.activation == activation
    conv = fused.conv
    assert conv.groups == groups and conv.padding == (1, 1) and conv.kernel_size == (3, 3)
    # documented layout: per group, the wrapped layer's O/g channels of that group, then each set's
    per = 6 // groups
    blocks = [src[g * per : (g + 1) * per] for g in range(groups) for src in (t["w"], *t["dw"])]
    np.testing.assert_array_equal(conv.weight.detach().numpy(), np.concatenate(blocks))
    xt = torch.from_numpy(x)
    with torch.no_grad():
        np.testing.assert_allclose(exported(xt).numpy(), expected, rtol=1e-10, atol=1e-12)  # in place
    np.testing.assert_allclose(exported(xt).detach().numpy(), expected, rtol=1e-10, atol=1e-12)  # functional
    np.testing.assert_allclose(exported(xt[0]).detach().numpy(), expected[0], rtol=1e-10, atol=1e-12)  # unbatched


def test_fused_linear_without_bias_matches_numpy():
    model, t = _dendritic_model(nn.Linear(5, 4, bias=False), "tanh", seed=7)
    assert model[0].base.bias is None and not t["b"].any()
    x = np.random.default_rng(8).normal(size=(3, 5))
    expected = np.tanh(_np_dendritic(x, t["w"], t["b"], t["dw"], t["db"], t["v"], t["u"], "tanh",
                                     lambda a, w, b: a @ w.T + b, lambda p: p))
    exported = export(model)
    bias = exported[0].linear.bias.detach().numpy()
    np.testing.assert_array_equal(bias, np.concatenate([np.zeros(4), *t["db"]]))  # the wrapped layer's part: 0
    with torch.no_grad():
        np.testing.assert_allclose(exported(torch.from_numpy(x)).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_conv_batch_of_one_keeps_its_batch_axis():
    model, t = _dendritic_model(nn.Conv2d(4, 6, 3, padding=1), "sigmoid", seed=9)
    x = np.random.default_rng(10).normal(size=(1, 4, 5, 5))
    expected = np.tanh(_np_dendritic(x, t["w"], t["b"], t["dw"], t["db"], t["v"], t["u"], "sigmoid",
                                     lambda a, w, b: _np_conv2d(a, w, b, 1, 1), lambda p: p[None, :, None, None]))
    assert expected.shape == (1, 6, 5, 5)
    exported = export(model)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        got = exported(xt)
    assert got.shape == (1, 6, 5, 5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    got = exported(xt)  # the functional path too
    assert got.shape == (1, 6, 5, 5)


def test_bad_input_messages_name_the_type():
    with pytest.raises(TypeError, match=r"^apical\.export expects an nn\.Module, got str$"):
        export("model")
    with pytest.raises(TypeError, match=r"^apical\.export expects an nn\.Module, got OrderedDict$"):
        export(nn.Linear(2, 2).state_dict())

    class CustomDendrites(DendriticLayer):  # a user's own kind of dendritic layer: apical cannot fuse it
        pass

    layer = CustomDendrites(nn.Linear(3, 2))
    layer.resize(1)
    for model in (layer, nn.Sequential(nn.Linear(3, 3), layer)):
        with pytest.raises(TypeError, match=r"^apical\.export: no fused form for CustomDendrites$"):
            export(model)
    layer.resize(0)  # without installed dendrites it is its wrapped module again
    assert type(export(layer)) is nn.Linear


def test_weight_norm_weight_is_exported_with_the_value_it_had():
    """weight_norm leaves the weight it computed, g v / |v|, on the module (a non-leaf tensor after a forward
    under autograd); the export holds a detached copy of it before its own first forward."""
    model = _weight_normed_mlp(torch.float64)
    with torch.no_grad():
        model[2].weight_g.mul_(torch.tensor([[3.0], [0.5]], dtype=torch.float64))
    model(torch.randn(3, 4, dtype=torch.float64))  # recomputes the weight, with autograd
    assert not model[2].weight.is_leaf
    g, v = model[2].weight_g.detach().numpy(), model[2].weight_v.detach().numpy()
    expected = g * v / np.sqrt((v**2).sum(1, keepdims=True))
    exported = export(model)
    weight = exported[2].weight
    assert isinstance(weight, torch.Tensor) and weight.is_leaf
    assert weight.data_ptr() != model[2].weight.data_ptr()
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-12)


class _KeepOutputs(TorchFunctionMode):
    """Keeps every tensor a torch function returns (so that no buffer is freed and its address reused)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("dendrites", [1, 3])
def test_eager_inference_allocates_only_the_fused_output_and_the_result(dendrites):
    """Documented: in eager inference the cascade and activations work in place on the fused output and the
    sum goes into one new tensor, the result: two buffers in all, and the result is its own compact tensor."""
    torch.manual_seed(11)
    model = _grow(nn.Sequential(nn.Linear(5, 4)), dendrites).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    expected = model(x)
    exported = export(model)
    inputs = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in exported.parameters()}
    with torch.no_grad(), _KeepOutputs() as mode:
        got = exported(x)
    new = {t.untyped_storage().data_ptr() for t in mode.outputs} - inputs
    assert len(new) == 2
    assert got.is_contiguous() and got.untyped_storage().nbytes() == got.numel() * got.element_size()
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)


def test_bfloat16_is_kept():
    torch.manual_seed(12)
    model = _grow(nn.Sequential(nn.Linear(4, 3)), 2).to(torch.bfloat16).eval()
    u = model[0].dendrite_cascade.detach().clone()
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    exported = export(model)
    assert {n: p.dtype for n, p in exported.named_parameters()} == dict.fromkeys(
        ["0.linear.weight", "0.linear.bias", "0.dendrite_out", "0.dendrite_cascade"], torch.bfloat16)
    cascade = exported[0].dendrite_cascade.detach()
    assert torch.equal(cascade[1, 0], u[1, 0]) and not cascade[0].any() and not cascade[1, 1].any()  # e < k only
    with torch.no_grad():
        got = exported(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), model(x).double(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("public", [True, False])
def test_compiling_asks_torch_compiler_first_then_dynamo(monkeypatch, public):
    """torch.compiler.is_compiling is the authority where it exists (torch >= 2.3), even against
    torch._dynamo.is_compiling; torch 2.2 has only the latter. Both torches simulated here."""
    import torch._dynamo

    from apical.export import _compiling, _eager_inference

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: public)
    monkeypatch.setattr(torch._dynamo, "is_compiling", lambda: not public)
    assert _compiling() is public
    with torch.no_grad():
        assert _eager_inference() is not public  # compiling: never the in-place path
    monkeypatch.delattr(torch.compiler, "is_compiling")  # torch 2.2
    monkeypatch.setattr(torch._dynamo, "is_compiling", lambda: public)
    assert _compiling() is public
    with torch.no_grad():
        assert _eager_inference() is not public


def test_exporting_a_recurrent_cell_mid_dendrite_phase_leaves_the_original_training():
    """A GRU cell with a set and candidates: the export is a copy without candidates; the original
    keeps its candidates, their tensors and their statistics, and goes on training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRUCell(3, 4))
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    cell = model[0]
    cell.install_random(1.0, torch.Generator().manual_seed(1))
    cell.add_candidates(2, 1.0, torch.Generator().manual_seed(2))
    cell.set_training_mode("dendrite", perforated=True)
    x = torch.randn(5, 3)
    cell(x).sum().backward()
    weights = [p.detach().clone() for p in cell.candidate_parameters()]
    exported = apical.export(model)
    assert exported[0].num_candidates == 0 and exported[0].stats is None
    assert cell.num_candidates == 2 and cell.stats is not None and not cell.stats.empty
    assert all(torch.equal(p, w) for p, w in zip(cell.candidate_parameters(), weights, strict=True))
    assert all(p.grad is not None for p in cell.candidate_parameters() if p.numel())
