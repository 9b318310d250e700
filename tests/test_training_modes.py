"""Training under torch.compile (neuron phase) and under CPU bf16 autocast (both phases)."""

import pytest
import torch
from torch import nn

import apical


def _model_with_dendrites(mode="pb", sets=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    cfg = apical.DendriteConfig(mode=mode, seed=0)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)
    for _, layer in apical.dendritic_layers(model):
        for _ in range(sets):
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


def _bf16_or_fp32_run(bf16, sets):
    """30 neuron-phase steps, then 5 dendrite-phase steps from the same candidates; bf16 autocast or not."""
    model, ctl = _model_with_dendrites(sets=sets)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def forward(x):
        if not bf16:
            return model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    losses = _train(model, list(ctl.parameters()), 30, forward)
    for _, layer in apical.dendritic_layers(model):
        layer.add_candidates(3, 3.0, torch.Generator().manual_seed(3))
    ctl.phase = "dendrite"
    ctl._apply_phase()
    start.update({n: p.detach().clone() for n, p in model.named_parameters() if "candidate" in n})
    losses += _train(model, list(ctl.parameters()), 5, forward)
    moves = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    scores = [layer.candidate_scores() for _, layer in apical.dendritic_layers(model)]
    return moves, torch.tensor(losses), scores


@pytest.mark.parametrize("sets", [0, 2])
def test_bf16_autocast_neuron_and_dendrite_phases(sets):
    """Both phases under CPU bf16 autocast follow the float32 run within bf16's precision: the losses,
    every trained tensor, and the candidates' correlation scores (kept in float64). Without installed sets
    the candidates' outputs are bf16; with them, the cascade term makes them float32."""
    moves, losses, scores = _bf16_or_fp32_run(True, sets)
    ref_moves, ref_losses, ref_scores = _bf16_or_fp32_run(False, sets)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=5e-3)
    assert moves.keys() == ref_moves.keys()
    for n, want in ref_moves.items():  # how far each trained tensor moved, in both phases
        if not want.numel():
            continue
        if "dendrite_" in n and "dendrite_out" not in n:
            assert not want.any() and not moves[n].any(), n  # installed inputs stay frozen in pb
            continue
        assert want.abs().max() > 0, n
        torch.testing.assert_close(moves[n], want, rtol=0, atol=3e-2 * float(want.abs().max()), msg=n)
    for got, want in zip(scores, ref_scores, strict=True):
        assert got.dtype == torch.float64 and (want > 0).all()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.max()))
        # each neuron's best candidate scores within 3% of the float32 run's best
        torch.testing.assert_close(got.max(0).values, want.max(0).values, rtol=3e-2, atol=0)
