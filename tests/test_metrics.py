"""kernels.metrics against numpy float64."""

from __future__ import annotations

import math

import numpy as np
import torch

from svdfill.kernels.metrics import error_sums, metrics_from_sums, rating_metrics


def test_rating_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 1000):
        pred, target = torch.rand(n, generator=g) * 5, torch.rand(n, generator=g) * 5
        m = rating_metrics(pred, target)
        e = pred.double().numpy() - target.double().numpy()
        assert m["mse"] == np.mean(e * e).item() or math.isclose(m["mse"], np.mean(e * e), rel_tol=1e-12)
        assert math.isclose(m["rmse"], math.sqrt(np.mean(e * e)), rel_tol=1e-12)
        assert math.isclose(m["mae"], np.mean(np.abs(e)), rel_tol=1e-12)


def test_sums_combine_across_chunks_and_empty_is_nan():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(101, generator=g), torch.randn(101, generator=g)
    whole = metrics_from_sums(error_sums(pred, target))
    parts = error_sums(pred[:40], target[:40]) + error_sums(pred[40:], target[40:])
    split = metrics_from_sums(parts)
    for k in whole:
        assert math.isclose(whole[k], split[k], rel_tol=1e-12)
    empty = rating_metrics(torch.zeros(0), torch.zeros(0))
    assert all(math.isnan(v) for v in empty.values())
