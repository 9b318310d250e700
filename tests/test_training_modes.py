"""Training under torch.compile (neuron phase) and under CPU bf16 autocast (both phases)."""

import torch
from torch import nn

import apical


def _model_with_dendrites(mode="pb"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    cfg = apical.DendriteConfig(mode=mode, seed=0)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)
    for _, layer in apical.dendritic_layers(model):
        layer.install_random(3.0)
        layer.install_random(3.0)
        with torch.no_grad():
            layer.dendrite_out.normal_(0, 0.5)
            layer.dendrite_cascade.normal_(0, 0.5)
    ctl._apply_phase()
    return model, ctl


def _train(model, params, steps, forward):
    opt = torch.optim.SGD(params, lr=0.05)
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_neuron_phase_trains_identically_under_torch_compile():
    torch._dynamo.reset()  # other tests compiled the same forward code objects: start from a clean cache
    eager, ctl_e = _model_with_dendrites()
    compiled_model, ctl_c = _model_with_dendrites()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    a = _train(eager, list(ctl_e.parameters()), 5, eager)
    b = _train(compiled_model, list(ctl_c.parameters()), 5, compiled)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_neuron_and_dendrite_phases():
    model, ctl = _model_with_dendrites()

    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    losses = _train(model, list(ctl.parameters()), 30, forward)
    assert all(torch.isfinite(torch.tensor(losses)))
    # dendrite phase under autocast: statistics in float32/64, candidates move, scores finite
    for _, layer in apical.dendritic_layers(model):
        layer.add_candidates(3, 3.0)
    ctl.phase = "dendrite"
    ctl._apply_phase()
    before = model[0].candidate_weight.detach().clone()
    _train(model, list(ctl.parameters()), 5, forward)
    assert not torch.equal(before, model[0].candidate_weight)
    for _, layer in apical.dendritic_layers(model):
        scores = layer.candidate_scores()
        assert scores.dtype == torch.float64 and torch.isfinite(scores).all() and (scores > 0).any()
