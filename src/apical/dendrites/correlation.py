"""The dendrite phase's objective: per-neuron correlation of candidates with the neuron's error.

For a neuron j with error ``delta_j = dL/dz_j`` and a candidate c with output ``a_{c,j}``, the
epoch statistic is the covariance over every observation p of the epoch (every sample, and
every position for convolutions or sequences)::

    cov_{c,j} = mean_p (a_{c,j,p} - mean a)(delta_{j,p} - mean delta)

scored as ``|cov| / std(delta)`` ("error" normaliser, Cascade-Correlation's) or
``|cov| / (std(a) std(delta))`` ("pearson"). The statistics are running, shifted sums in
float64, so memory grows with candidates x neurons, never with the epoch's length.

The candidates learn inside the user's own ``loss.backward()``: the layer's output passes
through :func:`correlation_tap`, an identity in the forward pass whose backward reads the
neuron's error, updates the statistics, and hands the candidates the gradient of
``-sign(cov) * normalised covariance`` on the current mini-batch.

Under ``torch.distributed`` (world size W > 1, e.g. DistributedDataParallel) each backward
all-reduces the batch's sums (one float64 buffer per layer), so every rank holds the statistics
of the global batches, centres the error on the global batch mean, and hands its candidates W
times its share of the global batch's gradient: DDP's averaging then yields exactly the
gradient a single process computes on the global batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from apical.dendrites import _dist

if TYPE_CHECKING:
    from apical.dendrites.layer import DendriticLayer

_EPS = 1e-12


class CorrelationStats:
    """Running sums for ``C`` candidates x ``O`` neurons of one layer (float64, shifted)."""

    FIELDS = ("s_a", "s_d", "s_ad", "s_aa", "s_dd")

    def __init__(self, candidates: int, neurons: int) -> None:
        self.candidates = candidates
        self.neurons = neurons
        self.reset()

    def reset(self) -> None:
        """Forget the epoch so far (the shift values are re-taken from the next batch)."""
        self.n = 0.0
        self.shift_a: Tensor | None = None
        self.shift_d: Tensor | None = None
        self.s_a = self.s_d = self.s_ad = self.s_aa = self.s_dd = None

    @property
    def empty(self) -> bool:
        return self.n == 0

    def accumulate(self, a: Tensor, d: Tensor, layer: DendriticLayer) -> None:
        """Add one mini-batch: ``a`` in stack layout ``[.., C, O, ..]``, ``d`` like the output."""
        with torch.no_grad():
            a = a.detach().float() if a.dtype in (torch.float16, torch.bfloat16) else a.detach()
            d = d.detach().to(a.dtype)
            dims_a = layer.observation_dims(True, a.dim())
            dims_d = layer.observation_dims(False, d.dim())
            if self.shift_a is None:
                self.shift_a = a.mean(dims_a)
                self.shift_d = d.mean(dims_d)
                c, o, dev = self.candidates, self.neurons, a.device
                f64 = {"device": dev, "dtype": torch.float64}
                self.s_a, self.s_aa, self.s_ad = (torch.zeros(c, o, **f64) for _ in range(3))
                self.s_d, self.s_dd = (torch.zeros(o, **f64) for _ in range(2))
            ac = a - layer._chan(self.shift_a)
            dc = d - layer._chan(self.shift_d)
            self.s_a += ac.sum(dims_a).double()
            self.s_aa += (ac * ac).sum(dims_a).double()
            self.s_d += dc.sum(dims_d).double()
            self.s_dd += (dc * dc).sum(dims_d).double()
            # sum_p ac * dc per (candidate, neuron), as a broadcast product: an einsum here
            # lowers to a batched matmul over neurons with permuted copies (10-20x slower)
            self.s_ad += ac.mul_(dc.unsqueeze(layer.set_axis % ac.dim())).sum(dims_a).double()
            self.n += float(d.numel() // self.neurons)

    def accumulate_global(self, a: Tensor, d: Tensor, layer: DendriticLayer) -> tuple[float, Tensor]:
        """:meth:`accumulate` under torch.distributed: add this step's batch of every rank.

        The batch's sums travel in one float64 all-reduce. The first batch of an epoch is
        summed raw (float64) and its global mean becomes the shift, identical on every rank.
        Returns the global batch's observation count and mean error per neuron.
        """
        with torch.no_grad():
            a = a.detach().float() if a.dtype in (torch.float16, torch.bfloat16) else a.detach()
            d = d.detach()  # the gradient of the layer's output: a's dtype, or one torch promotes with it
            dims_a = layer.observation_dims(True, a.dim())
            dims_d = layer.observation_dims(False, d.dim())
            first = self.shift_a is None
            if first:
                ac, dc = a.double(), d.double()
            else:
                ac, dc = a - layer._chan(self.shift_a), d - layer._chan(self.shift_d)
            parts = [torch.tensor([d.numel() // self.neurons], dtype=torch.float64, device=a.device),
                     ac.sum(dims_a), dc.sum(dims_d), (ac * ac).sum(dims_a), (dc * dc).sum(dims_d),
                     (ac * dc.unsqueeze(layer.set_axis % ac.dim())).sum(dims_a)]
            buf = _dist.all_reduce_sum(torch.cat([t.double().reshape(-1) for t in parts]))
            c, o = self.candidates, self.neurons
            n_t, s_a, s_d, s_aa, s_dd, s_ad = buf.split([1, c * o, o, c * o, o, c * o])
            n = float(n_t)
            s_a, s_aa, s_ad = s_a.view(c, o), s_aa.view(c, o), s_ad.view(c, o)
            if first:  # shift = the global first batch's mean; re-centre the raw sums on it
                self.shift_a, self.shift_d = (s_a / n).to(a.dtype), (s_d / n).to(a.dtype)
                sa, sd = self.shift_a.double(), self.shift_d.double()
                s_aa = s_aa - 2 * sa * s_a + n * sa * sa
                s_dd = s_dd - 2 * sd * s_d + n * sd * sd
                s_ad = s_ad - sd * s_a - sa * s_d + n * sa * sd
                s_a, s_d = s_a - n * sa, s_d - n * sd
                self.s_a, self.s_d, self.s_aa, self.s_dd, self.s_ad = (t.clone() for t in (s_a, s_d, s_aa, s_dd, s_ad))
            else:
                self.s_a += s_a
                self.s_d += s_d
                self.s_aa += s_aa
                self.s_dd += s_dd
                self.s_ad += s_ad
            self.n += n
            return n, self.shift_d.double() + s_d / n

    # moments of the epoch so far -------------------------------------------------------
    def moments(self) -> dict[str, Tensor]:
        """Means, variances and covariance (float64) of everything accumulated."""
        if self.empty:
            raise RuntimeError(
                "no correlation statistics were gathered: train at least one batch in the "
                "dendrite phase (model.train(), loss.backward()) before calling step()"
            )
        n = self.n
        ma, md = self.s_a / n, self.s_d / n
        return {
            "mean_a": self.shift_a.double() + ma,
            "mean_d": self.shift_d.double() + md,
            "var_a": (self.s_aa / n - ma * ma).clamp_min(0),
            "var_d": (self.s_dd / n - md * md).clamp_min(0),
            "cov": self.s_ad / n - ma * md,
        }

    def scores(self, normaliser: str = "error") -> Tensor:
        """``[C, O]`` score of each candidate for each neuron (higher is better)."""
        m = self.moments()
        score = m["cov"].abs() / m["var_d"].sqrt().clamp_min(_EPS)
        if normaliser == "pearson":
            score = score / m["var_a"].sqrt().clamp_min(_EPS)
        return score

    def signs(self) -> Tensor:
        """``[C, O]`` sign of each candidate's covariance with its neuron's error (zero counts as +1,
        as in the candidates' gradient)."""
        cov = self.moments()["cov"]
        return torch.where(cov >= 0, 1.0, -1.0).to(torch.float64)

    # a fingerprint for the ranks' consistency check ----------------------------------------
    def flat(self) -> Tensor:
        """n, then every running sum, as one float64 vector (the controller checksums it)."""
        parts = [torch.tensor([self.n], dtype=torch.float64, device=self.s_a.device)]
        parts += [getattr(self, k).reshape(-1) for k in self.FIELDS]
        return torch.cat(parts)

    # the candidates' gradient -----------------------------------------------------------
    def gradient(self, a: Tensor, d: Tensor, layer: DendriticLayer,
                 batch: tuple[float, Tensor] | None = None) -> Tensor:
        """d(-objective)/da for this mini-batch, in ``a``'s shape and dtype.

        ``batch``: the global batch's count and mean error (from :meth:`accumulate_global`);
        by default this process's batch.
        """
        with torch.no_grad():
            m = self.moments()
            work = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
            af, df = a.detach().to(work), d.detach().to(work)
            dims_d = layer.observation_dims(False, df.dim())
            if batch is None:
                nb = df.numel() // self.neurons
                mu_d = df.mean(dims_d) if layer.centring == "batch" else m["mean_d"].to(work)
            else:
                nb = batch[0]
                mu_d = (batch[1] if layer.centring == "batch" else m["mean_d"]).to(work)
            sd_d = m["var_d"].sqrt().clamp_min(_EPS)
            sign = torch.where(m["cov"] >= 0, 1.0, -1.0).to(torch.float64)
            dc = (df - layer._chan(mu_d)).unsqueeze(layer.set_axis % a.dim())
            if layer.normaliser == "pearson":
                sd_a = m["var_a"].sqrt().clamp_min(_EPS)
                r = m["cov"] / (sd_a * sd_d)
                coef_d = (-sign / (nb * sd_a * sd_d)).to(work)
                coef_a = (sign * r / (nb * sd_a * sd_a)).to(work)
                grad = layer._chan(coef_d) * dc + layer._chan(coef_a) * (af - layer._chan(m["mean_a"].to(work)))
            else:
                coef = (-sign / (nb * sd_d)).to(work)
                grad = layer._chan(coef) * dc
            return grad.expand_as(af).to(a.dtype)


class _CorrelationTap(torch.autograd.Function):
    """Identity on z; its backward turns the error at z into the candidates' gradient."""

    @staticmethod
    def forward(ctx, z: Tensor, a: Tensor, layer: DendriticLayer) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.layer = layer
        return z.clone()

    @staticmethod
    def backward(ctx, grad_z: Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        layer = ctx.layer
        stats = layer.stats
        if stats is None:  # candidates were dropped between forward and backward
            return grad_z, None, None
        world = _dist.world_size()
        if world > 1:  # DDP averages over ranks: W x this rank's share gives the global gradient
            batch = stats.accumulate_global(a, grad_z, layer)
            grad_a = stats.gradient(a, grad_z, layer, batch) * world
        else:
            stats.accumulate(a, grad_z, layer)
            grad_a = stats.gradient(a, grad_z, layer)
        if layer.candidate_scale != 1.0:  # so that plain SGD, like Adam, moves candidates `scale` times faster
            grad_a = grad_a / layer.candidate_scale
        return grad_z, grad_a, None


def correlation_tap(z: Tensor, a: Tensor, layer: DendriticLayer) -> Tensor:
    """Return ``z`` unchanged, attaching the candidates' correlation objective to its backward."""
    return _CorrelationTap.apply(z, a, layer)
