"""The dendrite phase's statistics and gradient, against references computed another way."""

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

import apical


def _setup(module, candidates=3):
    model = nn.Sequential(module, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    cfg = apical.DendriteConfig(include=["0"])
    apical.perforate(model, cfg)
    layer = model[0]
    layer.install_random(1.0)  # one installed set, so the candidates read a cascade input
    layer.add_candidates(candidates, 1.0)
    layer.set_training_mode("dendrite", perforated=True)
    with torch.no_grad():
        layer.candidate_cascade.normal_()
    return model, layer


def _error_recorder(store):
    def hook(module, inputs, out):
        out.register_hook(lambda g: store.append(g.clone()))

    return hook


def _capture(model, layer, batches, make_target):
    """Run an epoch of mini-batches; record each batch's candidate outputs and output error."""
    deltas, acts = [], []
    handle = layer.register_forward_hook(_error_recorder(deltas))
    for x in batches:
        with torch.no_grad():  # candidate outputs, computed outside the layer by hand
            d_pre = layer._stack_forward(x, layer.dendrite_weight, layer.dendrite_bias)
            a_inst = torch.sigmoid(d_pre)  # one installed set: no cascade among installed
            cw, cb, cu = layer.candidate_tensors()  # stored values times the lr scale
            pre = layer._stack_forward(x, cw, cb)
            ax = layer.set_axis % pre.dim()
            casc = cu[:, 0]  # [C, O]
            pre = pre + layer._chan(casc) * a_inst.select(ax, 0).unsqueeze(ax)
            acts.append(torch.sigmoid(pre))
        out = model(x)
        nn.functional.mse_loss(out, make_target(out)).backward()
    handle.remove()
    return acts, deltas


def _numpy_reference(acts, deltas, layer):
    """Covariance and scores over the whole epoch at once, in float64 numpy."""
    ax = layer.set_axis % acts[0].dim()
    a = np.concatenate([np.moveaxis(t.numpy(), (ax, ax + 1), (-2, -1)).reshape(-1, *t.shape[ax:ax + 2])
                        for t in acts]).astype(np.float64)  # [P, C, O]
    d = np.concatenate([np.moveaxis(t.numpy(), ax, -1).reshape(-1, t.shape[ax]) for t in deltas]).astype(np.float64)
    ac = a - a.mean(0)
    dc = d - d.mean(0)
    cov = (ac * dc[:, None, :]).mean(0)
    sd_d = dc.std(0)
    sd_a = ac.std(0)
    return cov, np.abs(cov) / sd_d, np.abs(cov) / (sd_d * sd_a)


@pytest.mark.parametrize(
    "make, shape",
    [(lambda: nn.Linear(6, 5), (16, 6)), (lambda: nn.Conv2d(3, 4, 3, padding=1), (4, 3, 6, 6))],
    ids=["linear", "conv2d"],
)
def test_epoch_statistics_match_numpy(make, shape):
    torch.manual_seed(3)
    model, layer = _setup(make())
    batches = [torch.randn(*shape) * (1 + i) + i for i in range(5)]
    target = torch.randn(2)
    acts, deltas = _capture(model, layer, batches, lambda out: target.expand_as(out) + out.detach() ** 2)
    cov, score_err, score_pearson = _numpy_reference(acts, deltas, layer)
    moments = layer.stats.moments()
    # rtol 1e-5, plus an atol 1e-6 times the largest entry: the per-batch products are float32, so an
    # entry a thousand times smaller than the largest (cancellation in the centred sum) carries the
    # float32 rounding of its terms, about 1e-5 of itself
    for got, want in ((moments["cov"], cov), (layer.stats.scores("error"), score_err),
                      (layer.stats.scores("pearson"), score_pearson)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    n_obs = sum(d.numel() // layer.out_channels for d in deltas)
    assert layer.stats.n == n_obs
    # the layer scores with its own normaliser
    for normaliser, want in (("error", score_err), ("pearson", score_pearson)):
        layer.normaliser = normaliser
        np.testing.assert_allclose(layer.candidate_scores().numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # installing the best: v starts at -sign(cov) * output_init of the chosen candidate (signs from the statistics)
    best = score_pearson.argmax(0)
    cols = np.arange(layer.out_channels)
    chosen = layer.install_best(torch.from_numpy(score_pearson), output_init=0.3)
    np.testing.assert_array_equal(chosen.numpy(), best)
    np.testing.assert_allclose(layer.dendrite_out[-1].detach().numpy(), -np.sign(cov[best, cols]) * 0.3, rtol=1e-6)
    for method, message in ((layer.candidate_scores, "this layer has no candidates: it is not in a dendrite phase"),
                            (lambda: layer.install_best(torch.from_numpy(score_pearson)),
                             "this layer has no candidates to install")):
        with pytest.raises(RuntimeError, match=f"^{message}$"):
            method()


@pytest.mark.parametrize("scale", [10.0, 2.0, 1.0], ids=["default-scale", "scale2", "scale1"])
@pytest.mark.parametrize("normaliser", ["error", "pearson"])
def test_candidate_gradient_is_the_objective_gradient(normaliser, scale):
    """On a single batch (epoch == batch), the gradient the tap hands the candidates equals
    autograd of the explicit objective -sum |cov| / normaliser, whatever the candidates' lr scale."""
    torch.manual_seed(4)
    model, layer = _setup(nn.Linear(6, 5))
    layer.candidate_scale = scale  # (the stored values are read as scale times bigger from here on)
    layer.normaliser = normaliser
    x = torch.randn(32, 6)
    target = torch.randn(32, 2)
    deltas = []
    h = layer.register_forward_hook(_error_recorder(deltas))
    nn.functional.mse_loss(model(x), target).backward()
    h.remove()
    got = layer.candidate_weight.grad.clone()
    # reference: explicit objective with autograd, the error treated as a constant. The stored
    # weight is the effective one divided by the scale, and the tap divides its gradient by the
    # scale too, so the stored weight's gradient equals the objective's gradient in the
    # effective weight.
    cw, cb, cu = (t.detach() for t in layer.candidate_tensors())
    assert torch.allclose(cw, layer.candidate_weight * scale)
    w = cw.clone().requires_grad_(True)
    with torch.no_grad():
        a_inst = torch.sigmoid(layer._stack_forward(x, layer.dendrite_weight, layer.dendrite_bias))[..., 0, :]
    pre = layer._stack_forward(x, w, cb) + cu[:, 0] * a_inst[:, None]
    a = torch.sigmoid(pre).double()  # [N, C, O]
    d = deltas[0].double()[:, None, :]
    ac, dc = a - a.mean(0), d - d.mean(0)
    cov = (ac * dc).mean(0)
    norm = dc.pow(2).mean(0).sqrt()
    if normaliser == "pearson":
        norm = norm * ac.pow(2).mean(0).sqrt()
    (-(cov.abs() / norm).sum()).backward()
    torch.testing.assert_close(got, w.grad.float(), rtol=1e-4, atol=1e-7)


def test_statistics_memory_does_not_grow_with_the_epoch():
    model, layer = _setup(nn.Linear(6, 5))
    for _ in range(20):
        nn.functional.mse_loss(model(torch.randn(8, 6)), torch.zeros(8, 2)).backward()
    sizes = [getattr(layer.stats, k).numel() for k in layer.stats.FIELDS]
    assert sizes == [3 * 5, 5, 3 * 5, 3 * 5, 5]
    assert layer.stats.n == 160


def test_eval_forward_does_not_touch_statistics():
    model, layer = _setup(nn.Linear(6, 5))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 6))
    model(torch.randn(4, 6)).sum().backward()  # eval with gradients: no candidate statistics either
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 6))  # nor a training-mode pass without gradients
    assert layer.stats.empty
    with pytest.raises(RuntimeError) as err:
        layer.candidate_scores()
    assert str(err.value) == ("no correlation statistics were gathered: train at least one batch in the dendrite "
                              "phase (model.train(), loss.backward()) before calling step()")


def _mlp(widths):
    mods = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


@pytest.mark.parametrize("widths", [(4, 5, 2), (4, 5, 6, 2)], ids=["2-layer", "3-layer"])
def test_candidates_leave_the_error_of_lower_layers_unchanged(widths):
    """Candidates read a detached input: in a dendrite phase of a multi-layer network, the error reaching
    each layer, and so each layer's statistics, equal those of a hand-built copy without candidates
    (errors by autograd on the copy, covariances in numpy)."""
    torch.manual_seed(6)
    model = _mlp(widths)
    apical.perforate(model, apical.DendriteConfig())
    layers = [m for m in model if isinstance(m, apical.DendriticLinear)]
    for layer in layers:
        layer.install_random(1.0)
        layer.add_candidates(3, 3.0)
        with torch.no_grad():
            layer.dendrite_out.normal_()
            layer.candidate_cascade.normal_()
        layer.set_training_mode("dendrite", perforated=True)
        layer.base.requires_grad_(False)
    x, y = torch.randn(32, widths[0]), torch.randn(32, widths[-1])
    errors = []
    handles = [layer.register_forward_hook(_error_recorder(errors)) for layer in layers]
    nn.functional.mse_loss(model(x), y).backward()
    for h in handles:
        h.remove()
    errors.reverse()  # the hooks fire from the top layer down

    # the plain copy: z = W h + b + v * sigmoid(D h + b_d), the installed dendrite reading h detached (pb)
    h, zs, inputs = x, [], []
    for i, layer in enumerate(layers):
        w = layer.base.weight.detach().clone().requires_grad_(True)  # so that autograd reaches every z
        b = layer.base.bias.detach().clone()
        dw, db, v = (t.detach().clone() for t in (layer.dendrite_weight[0], layer.dendrite_bias[0],
                                                   layer.dendrite_out[0]))
        inputs.append(h.detach().double().numpy())
        z = h @ w.T + b + v * torch.sigmoid(h.detach() @ dw.T + db)
        zs.append(z)
        h = torch.tanh(z) if i < len(layers) - 1 else z
    want = torch.autograd.grad(nn.functional.mse_loss(h, y), zs)
    for i, (got, ref) in enumerate(zip(errors, want, strict=True)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9, msg=f"layer {i}")

    for i, layer in enumerate(layers):
        xin = inputs[i]
        cw, cb, cu = (t.detach().double().numpy() for t in layer.candidate_tensors())
        a_inst = 1 / (1 + np.exp(-(xin @ layer.dendrite_weight[0].detach().double().numpy().T
                                   + layer.dendrite_bias[0].detach().double().numpy())))
        pre = np.einsum("ni,coi->nco", xin, cw) + cb + cu[:, 0] * a_inst[:, None]
        a = 1 / (1 + np.exp(-pre))
        d = want[i].double().numpy()
        cov = ((a - a.mean(0)) * (d - d.mean(0))[:, None]).mean(0)
        got = layer.stats.moments()["cov"].numpy()
        np.testing.assert_allclose(got, cov, rtol=1e-4, atol=1e-5 * np.abs(cov).max(), err_msg=f"layer {i}")


# ---------------------------------------------------------------------------------- two ranks, in one process
class _TwoRanks:
    """Two threads standing in for two ranks: ``all_reduce_sum`` returns the sum of both threads' buffers
    (a barrier on either side), as a gloo all-reduce would, without processes."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=30)
        self.bufs = [None, None]
        self.local = threading.local()
        self.calls = [0, 0]

    def all_reduce_sum(self, buf):
        r = self.local.rank
        self.calls[r] += 1
        self.bufs[r] = buf.clone()
        self.barrier.wait()
        total = self.bufs[0] + self.bufs[1]
        self.barrier.wait()
        buf.copy_(total)
        return buf

    def run(self, fn):
        """Run ``fn(rank)`` on two threads; re-raise the first failure."""
        errors = []

        def target(r):
            self.local.rank = r
            try:
                fn(r)
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


@pytest.mark.parametrize("normaliser, centring", [("error", "batch"), ("pearson", "batch"), ("error", "epoch")])
@pytest.mark.parametrize(
    "make, shape",
    [(lambda: nn.Linear(6, 5), (10, 6)), (lambda: nn.Conv2d(3, 4, 3, padding=1), (6, 3, 4, 4))],
    ids=["linear", "conv2d"],
)
def test_two_ranks_gather_the_statistics_and_gradient_of_the_global_batch(make, shape, normaliser, centring,
                                                                          monkeypatch):
    """Two ranks, each with half of every batch, hold the statistics of the global batches (numpy over both
    ranks' captured outputs and errors); their candidate gradients, averaged as DDP averages them, equal one
    process's gradient on the global batch."""
    from apical.dendrites import _dist

    torch.manual_seed(5)
    model, layer = _setup(make())
    model(torch.randn(*shape))  # materialise the lazy head
    layer.stats.reset()
    layer.normaliser, layer.centring = normaliser, centring
    batches = [torch.randn(*shape) * (1 + i) + i for i in range(3)]
    target = torch.randn(2)
    half = shape[0] // 2
    split = [slice(0, half), slice(half, None)]
    single = copy.deepcopy(model)
    ranks = [copy.deepcopy(model) for _ in range(2)]

    # one process on the global batches (world size 1); the candidates' gradient after each batch
    single_grads = []
    for x in batches:
        single[0].candidate_weight.grad = None
        out = single(x)
        nn.functional.mse_loss(out, target.expand_as(out)).backward()
        single_grads.append(single[0].candidate_weight.grad.clone())

    fake = _TwoRanks()
    monkeypatch.setattr(_dist, "world_size", lambda: 2)
    monkeypatch.setattr(_dist, "all_reduce_sum", fake.all_reduce_sum)
    captured = [None, None]
    rank_grads = [[], []]

    def rank_epoch(r):
        net = ranks[r]
        parts = [x[split[r]] for x in batches]
        acts, deltas = [], []
        for x in parts:  # as _capture, keeping each batch's candidate gradient
            net[0].candidate_weight.grad = None
            a, d = _capture(net, net[0], [x], lambda out: target.expand_as(out))
            acts += a
            deltas += d
            rank_grads[r].append(net[0].candidate_weight.grad.clone())
        captured[r] = (acts, deltas)

    fake.run(rank_epoch)
    assert fake.calls == [3, 3]  # one all-reduce per batch and layer

    acts = [torch.cat([captured[0][0][i], captured[1][0][i]]) for i in range(3)]
    deltas = [torch.cat([captured[0][1][i], captured[1][1][i]]) for i in range(3)]
    cov, score_err, score_pearson = _numpy_reference(acts, deltas, layer)
    n_obs = sum(d.numel() // layer.out_channels for d in deltas)
    for net in ranks:
        stats = net[0].stats
        assert stats.n == n_obs
        scale = np.abs(cov).max()
        np.testing.assert_allclose(stats.moments()["cov"].numpy(), cov, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(stats.scores("error").numpy(), score_err, rtol=1e-5,
                                   atol=1e-6 * np.abs(score_err).max())
        np.testing.assert_allclose(stats.scores("pearson").numpy(), score_pearson, rtol=1e-5,
                                   atol=1e-6 * np.abs(score_pearson).max())
        a_all = np.concatenate([np.moveaxis(t.double().numpy(), (layer.set_axis % t.dim(), layer.set_axis % t.dim()
                                                                  + 1), (-2, -1)).reshape(-1, *t.shape[1:3]
                                                                  if t.dim() > 3 else t.shape[-2:])
                                for t in acts])
        np.testing.assert_allclose(stats.moments()["mean_a"].numpy(), a_all.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.moments()["var_a"].numpy(), a_all.var(0), rtol=1e-4, atol=1e-8)
    assert torch.equal(ranks[0][0].stats.flat(), ranks[1][0].stats.flat())  # identical on both ranks

    # each rank's error is twice the global loss's (its loss is a mean over half the rows); the objective
    # does not depend on the error's scale, and DDP averages the ranks' gradients
    for i in range(3):
        assert rank_grads[0][i].abs().sum() > 0
        avg = (rank_grads[0][i] + rank_grads[1][i]) / 2
        torch.testing.assert_close(avg, single_grads[i], rtol=2e-4, atol=1e-6 * single_grads[i].abs().max())


def test_flat_is_the_count_then_every_running_sum():
    """flat() is what the ranks compare: n exactly (float64, past float32's 2**24), then the sums in FIELDS order."""
    from apical.dendrites.correlation import CorrelationStats

    stats = CorrelationStats(2, 3)
    stats.n = float(2**24 + 1)
    values = {}
    for i, k in enumerate(stats.FIELDS):
        shape = (2, 3) if k in ("s_a", "s_ad", "s_aa") else (3,)
        values[k] = torch.arange(np.prod(shape), dtype=torch.float64).reshape(shape) + 10 * i
        setattr(stats, k, values[k])
    flat = stats.flat()
    want = np.concatenate([[2**24 + 1]] + [values[k].numpy().ravel() for k in ("s_a", "s_d", "s_ad", "s_aa", "s_dd")])
    assert flat.dtype == torch.float64 and flat.shape == (1 + 3 * 6 + 2 * 3,)
    np.testing.assert_array_equal(flat.numpy(), want)
    for k in stats.FIELDS:  # on another device, the count goes along with the sums
        setattr(stats, k, values[k].to("meta"))
    assert stats.flat().device.type == "meta"


def test_signs_of_positive_negative_and_zero_covariance():
    """From hand-set sums: cov = s_ad / n - (s_a / n) (s_d / n) is +2, -3 and exactly 0; zero counts as +1."""
    from apical.dendrites.correlation import CorrelationStats

    stats = CorrelationStats(1, 3)
    stats.n = 2.0
    stats.shift_a, stats.shift_d = torch.zeros(1, 3), torch.zeros(3)
    stats.s_a = torch.tensor([[2.0, 2.0, 2.0]], dtype=torch.float64)
    stats.s_d = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    stats.s_ad = torch.tensor([[6.0, -4.0, 2.0]], dtype=torch.float64)  # cov = 3 - 1, -2 - 1, 1 - 1
    stats.s_aa = torch.full((1, 3), 8.0, dtype=torch.float64)
    stats.s_dd = torch.full((3,), 8.0, dtype=torch.float64)
    assert stats.moments()["cov"].tolist() == [[2.0, -3.0, 0.0]]
    assert stats.signs().tolist() == [[1.0, -1.0, 1.0]] and stats.signs().dtype == torch.float64
    # the candidates' gradient climbs |cov| with the same signs, zero included: -sign (d - mean d) / (n sd_d)
    layer = apical.perforate(nn.Sequential(nn.Linear(4, 3)))[0]
    layer.normaliser, layer.centring = "error", "batch"
    d = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0], [2.0, 4.0, 1.0]], dtype=torch.float64)
    a = torch.full((3, 1, 3), 0.5, dtype=torch.float64)
    want = -torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64) * (d - d.mean(0)) / (3 * 3 ** 0.5)  # var_d = 4 - 1
    torch.testing.assert_close(stats.gradient(a, d, layer), want[:, None, :], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 1e-6), (torch.float64, 1e-12)])
def test_two_ranks_accumulate_low_and_high_precision_exactly(dtype, rtol, monkeypatch):
    """accumulate_global on bf16 outputs and errors works in float32 at least (the sums match numpy on the
    bf16 values to float32 accuracy), and on float64 ones stays in float64."""
    from apical.dendrites import _dist

    layer = apical.perforate(nn.Sequential(nn.Linear(4, 3)))[0]
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(2, 8, 5, 3, generator=g) * 0.5 + 0.25 + i, torch.randn(2, 8, 3, generator=g) * 1e-3 + i)
               for i in range(3)]  # [rank, rows, C, O] outputs; errors [rank, rows, O]: offsets make shifts matter
    batches = [(a.to(dtype), d.to(dtype)) for a, d in batches]
    fake = _TwoRanks()
    monkeypatch.setattr(_dist, "all_reduce_sum", fake.all_reduce_sum)
    stats = [apical.dendrites.correlation.CorrelationStats(5, 3) for _ in range(2)]

    def rank_epoch(r):
        for a, d in batches:
            stats[r].accumulate_global(a[r], d[r], layer)

    fake.run(rank_epoch)
    a = np.concatenate([b[0].double().numpy().reshape(-1, 5, 3) for b in batches])
    d = np.concatenate([b[1].double().numpy().reshape(-1, 3) for b in batches])
    m = stats[0].moments()
    assert all(t.dtype == torch.float64 for t in m.values())
    # the per-batch work stays in the outputs' precision (float32 at least), not float64: the shifts say so
    work = torch.float32 if dtype == torch.bfloat16 else dtype
    assert (stats[0].shift_a.dtype, stats[0].shift_d.dtype) == (work, work)
    np.testing.assert_allclose(m["mean_a"].numpy(), a.mean(0), rtol=rtol)
    np.testing.assert_allclose(m["mean_d"].numpy(), d.mean(0), rtol=rtol)
    np.testing.assert_allclose(m["var_d"].numpy(), d.var(0), rtol=100 * rtol)
    np.testing.assert_allclose(m["var_a"].numpy(), a.var(0), rtol=100 * rtol)
    cov = ((a - a.mean(0)) * (d - d.mean(0))[:, None]).mean(0)
    np.testing.assert_allclose(m["cov"].numpy(), cov, rtol=100 * rtol, atol=100 * rtol * np.abs(cov).max())


def test_the_global_accumulation_builds_its_buffer_on_the_outputs_device(monkeypatch):
    """On the meta device (like CUDA, it refuses CPU tensors in one cat), the count and sums of a
    distributed step travel in one buffer made on the outputs' device."""
    from apical.dendrites import _dist

    layer = apical.perforate(nn.Sequential(nn.Linear(4, 3)))[0]
    sent = []
    # the reduction itself: one rank, its result read back on the CPU (meta tensors hold no values)
    monkeypatch.setattr(_dist, "all_reduce_sum",
                        lambda buf: sent.append(buf) or torch.ones(buf.shape, dtype=buf.dtype))
    stats = apical.dendrites.correlation.CorrelationStats(5, 3)
    stats.accumulate_global(torch.rand(8, 5, 3, device="meta"), torch.randn(8, 3, device="meta"), layer)
    assert [(b.device.type, b.dtype, b.numel()) for b in sent] == [("meta", torch.float64, 1 + 15 + 3 + 15 + 3 + 15)]
    # (the count, then the sums of a, d, a^2, d^2 and a*d: [C, O], [O], [C, O], [O], [C, O])


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_statistics_and_gradient_are_worked_in_float32(half):
    """Half-precision outputs and errors are summed and differentiated in float32: the same numbers as the
    float32 path on the same (half-precision) values, and the gradient comes back in half precision."""
    from apical.dendrites.correlation import CorrelationStats

    layer = apical.perforate(nn.Sequential(nn.Linear(4, 3)))[0]  # for its layout ([N, C, O], [N, O])
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(64, 5, 3, generator=g) * 0.5 + 0.25).to(half)
    d = (torch.randn(64, 3, generator=g) * 1e-3 + 0.01).to(half)  # an offset: centring in half would lose it
    low, ref = CorrelationStats(5, 3), CorrelationStats(5, 3)
    low.accumulate(a, d, layer)
    ref.accumulate(a.float(), d.float(), layer)
    for k, v in ref.moments().items():
        torch.testing.assert_close(low.moments()[k], v, rtol=1e-6, atol=0, msg=k)
    for normaliser in ("error", "pearson"):
        layer.normaliser = normaliser
        got = low.gradient(a, d, layer)
        assert got.dtype == half and got.shape == a.shape
        torch.testing.assert_close(got, ref.gradient(a.float(), d.float(), layer).to(half), rtol=0, atol=0)


class _LargeResultDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtype of every torch result with at least ``size`` elements."""

    def __init__(self, size):
        super().__init__()
        self.size, self.seen = size, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() >= self.size:
            self.seen.add(out.dtype)
        return out


@pytest.mark.parametrize("normaliser", ["error", "pearson"])
@pytest.mark.parametrize("centring", ["batch", "epoch"])
@pytest.mark.parametrize("global_batch", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("dtype, work", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16"])
def test_the_gradient_works_per_element_in_the_outputs_precision(normaliser, centring, global_batch, dtype, work):
    """The statistics are float64, but the per-element work of the candidates' gradient (activation-sized
    tensors) stays in the outputs' precision (float32 for half): float64 there would double its memory and
    time on the hot path. Values: the float64 formula on the same inputs, to float32 accuracy."""
    from apical.dendrites.correlation import CorrelationStats

    layer = apical.perforate(nn.Sequential(nn.Linear(4, 3)))[0]
    layer.normaliser, layer.centring = normaliser, centring
    g = torch.Generator().manual_seed(4)
    a = (torch.rand(64, 5, 3, generator=g) * 0.5 + 0.25).to(dtype)
    d = (torch.randn(64, 3, generator=g) + 0.5).to(dtype)
    stats = CorrelationStats(5, 3)
    stats.accumulate(a, d, layer)
    batch = (64, d.double().mean(0)) if global_batch else None
    probe = _LargeResultDtypes(d.numel())
    with probe:
        got = stats.gradient(a, d, layer, batch)
    assert got.dtype == dtype
    assert probe.seen <= {work, dtype}, f"activation-sized results in {probe.seen}"
    # the reference: the same formula in float64 throughout
    m = stats.moments()
    a64, d64 = a.double(), d.double()
    mu_d = d64.mean(0) if centring == "batch" else m["mean_d"]
    sign = torch.where(m["cov"] >= 0, 1.0, -1.0)
    sd_d = m["var_d"].sqrt()
    dc = (d64 - mu_d)[:, None, :]
    if normaliser == "pearson":
        sd_a = m["var_a"].sqrt()
        r = m["cov"] / (sd_a * sd_d)
        want = -sign / (64 * sd_a * sd_d) * dc + sign * r / (64 * sd_a ** 2) * (a64 - m["mean_a"])
    else:
        want = -sign / (64 * sd_d) * dc
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
