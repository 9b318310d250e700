"""The layer registry: user-defined kinds, the optional built-in kinds, lazy layers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apical
from apical import PerforationError


class MyLinear(nn.Module):
    """A user's linear layer that nn.Linear does not know about."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MyTransposed(nn.Module):
    """Weight stored [in, out], as GPT-2's Conv1D: the neurons are the columns."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def _net(kind=MyLinear):
    torch.manual_seed(0)
    return nn.Sequential(kind(5, 4), nn.Tanh(), kind(4, 3))


def _sig(z):
    return 1 / (1 + np.exp(-z))


def test_unregistered_kind_is_left_alone_and_reported():
    net = _net()
    with pytest.raises(PerforationError, match="nothing to wrap"):
        apical.perforate(net)
    rep = apical.coverage(net)
    assert [e.reason for e in rep] == ["unsupported type MyLinear"] * 2 and rep.fraction == 0


@pytest.mark.parametrize("kind, layer_class", [(MyLinear, apical.DendriticLinear),
                                               (MyTransposed, apical.DendriticTransposedLinear)])
def test_registered_kind_goes_through_the_product(kind, layer_class, tmp_path):
    x = torch.randn(6, 5)
    with apical.layer_registry.registered(kind, layer_class):
        net = _net(kind)
        refs = [net[0].weight, net[2].weight]
        before = net(x).detach()
        cfg = apical.DendriteConfig(seed=0)
        apical.perforate(net, cfg)
        assert [type(m) for _, m in apical.dendritic_layers(net)] == [layer_class] * 2
        assert net[0].base.weight is refs[0] and net[2].weight is refs[1]  # the wrapper shows the weight too
        assert torch.equal(net(x), before)  # function kept at insertion
        assert apical.coverage(net).fraction == 1.0
        layer = net[0]
        layer.install_random(1.0, torch.Generator().manual_seed(1))
        with torch.no_grad():
            layer.dendrite_out.normal_()
        # against numpy: base + v * sigmoid(dendrite), the neuron axis being the weight's out axis
        w = refs[0].detach().numpy()
        w_neuron = w if kind is MyLinear else w.T
        xn = x.numpy()
        z = xn @ w_neuron.T + net[0].base.bias.detach().numpy()
        a = _sig(xn @ layer.dendrite_weight[0].detach().numpy().T + layer.dendrite_bias[0].detach().numpy())
        z = z + layer.dendrite_out[0].detach().numpy() * a
        np.testing.assert_allclose(layer(x).detach().numpy(), z, rtol=1e-5, atol=1e-6)
        # perforated: no error reaches the input through the dendrites
        xg = x.clone().requires_grad_(True)
        layer(xg).sum().backward()
        np.testing.assert_allclose(xg.grad.numpy(), np.tile(w_neuron.sum(0), (6, 1)), rtol=1e-5, atol=1e-6)
        out = net(x).detach()
        apical.save(tmp_path / "m.safetensors", net)
        fresh = _net(kind)
        apical.load(tmp_path / "m.safetensors", fresh)
        assert torch.equal(fresh(x), out)
        ex = apical.export(net)
        torch.testing.assert_close(ex(x), out, rtol=1e-5, atol=1e-6)
    assert apical.layer_registry.lookup(kind) is None  # the scope ended


def test_register_and_unregister():
    assert apical.register_layer(MyLinear, apical.DendriticLinear) is None
    try:
        net = apical.perforate(_net())
        assert len(apical.dendritic_layers(net)) == 2
        apical.unwrap(net)
        assert type(net[0]) is MyLinear
    finally:
        assert apical.unregister_layer(MyLinear) is apical.DendriticLinear
    with pytest.raises(KeyError):
        apical.unregister_layer(MyLinear)
    with pytest.raises(TypeError, match="DendriticLayer subclass"):
        apical.register_layer(MyLinear, object)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        apical.register_layer(int, apical.DendriticLinear)


def test_uninitialised_lazy_layer_gets_a_clear_error():
    net = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(PerforationError, match="run one forward pass"):
        apical.perforate(net)
    assert isinstance(net[2], nn.Linear)  # nothing changed
    net(torch.randn(3, 7))
    apical.perforate(net)
    assert [n for n, _ in apical.dendritic_layers(net)] == ["0", "2"]


def test_torch_geometric_linear_is_built_in():
    gnn = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    net = nn.Sequential(gnn.Linear(-1, 4), nn.ReLU(), gnn.Linear(4, 2))
    with pytest.raises(PerforationError, match="run one forward pass"):
        apical.perforate(net)
    x = torch.randn(5, 3)
    before = net(x).detach()
    apical.perforate(net)
    assert [type(m) for _, m in apical.dendritic_layers(net)] == [apical.DendriticLinear] * 2
    assert torch.equal(net(x), before)


def test_transformers_conv1d_is_built_in():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    net = nn.Sequential(pytorch_utils.Conv1D(6, 4), nn.Tanh(), pytorch_utils.Conv1D(3, 6))  # Conv1D(out, in)
    x = torch.randn(2, 5, 4)
    before = net(x).detach()
    apical.perforate(net)
    layer = net[0]
    assert type(layer) is apical.DendriticTransposedLinear and layer.out_channels == 6 and layer.weight_tail == (4,)
    assert torch.equal(net(x), before)


def test_a_fresh_registry_by_type_and_by_name():
    """A LayerRegistry of its own (the built-in one is created at import): lookup along the MRO, entries by
    qualified name active only once their module is imported, replaced entries returned, kinds listed."""
    from apical.dendrites.registry import LayerRegistry

    reg = LayerRegistry()
    assert reg.lookup(MyLinear) is None and reg.kinds() == []
    assert reg.register(nn.Linear, apical.DendriticLinear) is None
    assert reg.register(nn.Linear, apical.DendriticConv) is apical.DendriticLinear  # the entry it replaces
    assert reg.lookup(nn.Linear) is apical.DendriticConv

    class Sub(nn.Linear):
        pass

    assert reg.lookup(Sub) is apical.DendriticConv  # along the MRO
    reg.register_by_name(f"{MyLinear.__module__}.{MyLinear.__qualname__}", apical.DendriticLinear)
    assert reg.lookup(MyLinear) is apical.DendriticLinear  # its module is imported: the entry is active
    reg.register_by_name("no_such_package.sub.Thing", apical.DendriticLinear)
    top = MyLinear.__module__.split(".")[0]
    assert reg.kinds() == ["Linear", f"{top}:{MyLinear.__qualname__}", "no_such_package:Thing"]
    assert reg.unregister(nn.Linear) is apical.DendriticConv and reg.lookup(nn.Linear) is None
    with pytest.raises(KeyError, match="^\"Linear has no entry in apical's layer registry\"$"):
        reg.unregister(nn.Linear)
    with pytest.raises(KeyError, match='^"42 has no entry'):
        reg.unregister(42)  # not a type: named by itself


def test_an_entry_by_name_is_not_taken_by_a_namesake():
    """An entry by name matches only the class that its module defines under that name."""
    from apical.dendrites.registry import LayerRegistry

    reg = LayerRegistry()
    reg.register_by_name(f"{MyLinear.__module__}.{MyLinear.__qualname__}", apical.DendriticLinear)
    namesake = type(MyLinear.__qualname__, (nn.Module,), {"__module__": MyLinear.__module__})
    assert reg.lookup(namesake) is None
