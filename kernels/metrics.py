"""Rating-prediction error metrics."""

from __future__ import annotations

import math

import torch


def error_sums(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float64 [3] = (Σ e², Σ |e|, n) for e = pred − target (both [n], any float dtype).

    Sums rather than means so shards and chunks combine by addition (an all-reduce)."""
    e = pred.to(torch.float64) - target.to(torch.float64)
    return torch.stack([(e * e).sum(), e.abs().sum(),
                        torch.tensor(float(e.numel()), dtype=torch.float64, device=e.device)])


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """``{"mse","rmse","mae"}`` from :func:`error_sums` (NaN when n = 0)."""
    se, ae, n = (float(x) for x in sums.cpu())
    if n == 0:
        return {"mse": math.nan, "rmse": math.nan, "mae": math.nan}
    mse = se / n
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": ae / n}


def rating_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MSE, RMSE and MAE (float64 accumulation) of predictions against ratings, each [n]."""
    if pred.shape != target.shape:
        raise ValueError(f"rating_metrics: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return metrics_from_sums(error_sums(pred, target))
