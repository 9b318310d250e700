"""apical.metrics against scikit-learn and hand computations, NaN targets as missing labels."""

import numpy as np
import pytest
import torch

from apical import metrics

skm = pytest.importorskip("sklearn.metrics")


def _multitask(seed=0, n=300, tasks=5):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, tasks))
    labels = (scores + rng.normal(scale=1.5, size=(n, tasks)) > 0).astype(np.float64)
    labels[rng.random((n, tasks)) < 0.3] = np.nan  # missing labels
    scores[:40, 1] = np.round(scores[:40, 1])  # ties
    labels[:, 3] = np.where(np.isnan(labels[:, 3]), np.nan, 1.0)  # one class only: left out
    return scores, labels


def test_roc_auc_is_the_mean_of_sklearns_per_task_aucs_over_tasks_with_both_classes():
    scores, labels = _multitask()
    expected = []
    for t in range(labels.shape[1]):
        keep = ~np.isnan(labels[:, t])
        if len(np.unique(labels[keep, t])) == 2:
            expected.append(skm.roc_auc_score(labels[keep, t], scores[keep, t]))
    assert len(expected) == 4
    got = metrics.roc_auc(torch.from_numpy(scores).float(), torch.from_numpy(labels).float())
    assert got == pytest.approx(np.mean(expected), abs=1e-6)
    per = metrics.roc_auc_per_task(scores, labels)
    assert np.isnan(per[3]) and np.allclose(np.delete(per, 3), expected, atol=1e-12)


def test_roc_auc_single_column_and_shape_mismatch():
    scores, labels = _multitask(1, tasks=4)
    keep = ~np.isnan(labels[:, 0])
    expected = skm.roc_auc_score(labels[keep, 0], scores[keep, 0])
    assert metrics.roc_auc(scores[:, 0], labels[:, 0]) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        metrics.roc_auc(scores, labels[:, 0])
    assert np.isnan(metrics.roc_auc(scores[:, 0], np.ones(len(scores))))


def test_regression_metrics_match_sklearn_on_the_labelled_entries():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(200, 3))
    pred = y + rng.normal(scale=0.5, size=y.shape)
    y_missing = y.copy()
    y_missing[rng.random(y.shape) < 0.2] = np.nan
    keep = ~np.isnan(y_missing)
    P, Y = torch.from_numpy(pred), torch.from_numpy(y_missing)
    assert metrics.mse(P, Y) == pytest.approx(skm.mean_squared_error(y[keep], pred[keep]), rel=1e-12)
    assert metrics.mae(P, Y) == pytest.approx(skm.mean_absolute_error(y[keep], pred[keep]), rel=1e-12)
    r2 = [skm.r2_score(y_missing[keep[:, j], j], pred[keep[:, j], j]) for j in range(3)]
    assert metrics.r2(P, Y) == pytest.approx(np.mean(r2), rel=1e-12)
    full = torch.from_numpy(y)
    assert metrics.r2(P, full) == pytest.approx(skm.r2_score(y, pred), rel=1e-12)
    assert metrics.METRICS["mse"][1] is False and metrics.METRICS["r2"][1] is True


def test_accuracy_for_classes_and_for_one_logit():
    out = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5], [1.0, 0.0]])
    assert metrics.accuracy(out, torch.tensor([1, 0, 0, 0])) == 0.75
    logits = torch.tensor([[1.5], [-0.2], [0.3], [-2.0]])
    assert metrics.accuracy(logits, torch.tensor([1.0, 0.0, 0.0, 0.0])) == 0.75


def test_masked_losses_average_over_labelled_entries_only():
    torch.manual_seed(0)
    out = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([[1.0, float("nan"), 0.0]] * 6)
    loss = metrics.masked_bce_with_logits(out, y)
    labelled = out[:, [0, 2]]
    ref = torch.nn.functional.binary_cross_entropy_with_logits(labelled, y[:, [0, 2]])
    assert torch.allclose(loss, ref)
    loss.backward()
    assert torch.all(out.grad[:, 1] == 0)
    target = torch.randn(6, 3)
    target[0, 0] = float("nan")
    mse = metrics.masked_mse(out.detach(), target)
    keep = ~torch.isnan(target)
    assert torch.allclose(mse, ((out.detach()[keep] - target[keep]) ** 2).mean())
    empty = metrics.masked_bce_with_logits(out, torch.full_like(y, float("nan")))
    assert empty.item() == 0.0 and empty.requires_grad
