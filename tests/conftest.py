"""Shared fixtures: real data paths (skipped with a reason when absent), temp run dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SVDFILL_SHARED_DATA", REPO.parent / "shared" / "data"))


def _data_file(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: real MovieLens/FilmTrust data lives in ../shared/data "
                    "(set SVDFILL_SHARED_DATA to point elsewhere); it is never copied into the repo")
    return p


@pytest.fixture
def ml100k_path() -> Path:
    """MovieLens-100K u.data (tab separated, 100,000 ratings)."""
    return _data_file("ml-100k", "u.data")


@pytest.fixture
def ml1m_path() -> Path:
    """MovieLens-1M ratings.dat (``::`` separated, 3 fields)."""
    return _data_file("ml-1m", "ratings.dat")


@pytest.fixture
def filmtrust_path() -> Path:
    """FilmTrust ratings.txt (space separated, 0.5-4 scale, 3 duplicate pairs)."""
    return _data_file("filmtrust", "ratings.txt")


@pytest.fixture
def cuda():
    """A CUDA device, or skip: GPU paths run for real on the device machine."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (runs on the GPU device machine)")
    return torch.device("cuda")


@pytest.fixture(params=["cpu", "cuda"])
def kernel_device(request, monkeypatch):
    """Where a fused Triton kernel test runs — cpu: Triton's interpreter
    (TRITON_INTERPRET=1, set for the test only); cuda: the compiled kernel (skipped without
    a GPU)."""
    import torch

    if request.param == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return request.getfixturevalue("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")
