"""kernels.model: init independent of sharding, predictions vs float64, sparse gradients."""

from __future__ import annotations

import pytest
import torch

from svdfill.kernels.model import INIT_CHUNK_ROWS, STATE_KEYS, BiasedMF, init_rows, predict_chunk


def test_init_rows_of_a_shard_equal_the_full_table():
    n = INIT_CHUNK_ROWS * 2 + 37
    full = init_rows(0, n, 3, std=0.1, seed=4, table=2)
    for lo, hi in [(0, 5), (INIT_CHUNK_ROWS - 3, INIT_CHUNK_ROWS + 3), (n - 10, n), (100, 100)]:
        assert torch.equal(init_rows(lo, hi, 3, std=0.1, seed=4, table=2), full[lo:hi])
    assert not torch.equal(init_rows(0, 5, 3, std=0.1, seed=5, table=2), full[:5])
    assert abs(float(full.std()) - 0.1) < 0.01


def test_model_shard_and_state():
    full = BiasedMF(10, 9, 4, init_std=0.1, global_mean=3.5, seed=1)
    shard = BiasedMF(10, 4, 4, init_std=0.1, global_mean=3.5, seed=1, item_offset=5)
    assert torch.equal(shard.item_factors, full.item_factors[5:9])
    assert torch.equal(shard.user_factors, full.user_factors)
    assert float(full.global_mean) == 3.5 and torch.all(full.user_bias == 0)
    st = full.state_tensors()
    assert tuple(st) == STATE_KEYS
    back = BiasedMF.from_state(st)
    for k in STATE_KEYS:
        assert torch.equal(getattr(back, k), st[k])


def test_forward_and_predict_match_float64():
    m = BiasedMF(6, 5, 3, init_std=0.3, global_mean=3.0, seed=2)
    with torch.no_grad():
        m.user_bias.normal_()
        m.item_bias.normal_()
    u = torch.tensor([0, 5, 5, 2, 1])
    i = torch.tensor([4, 0, 0, 3, 1])
    P, Q = m.user_factors.double(), m.item_factors.double()
    ref = 3.0 + m.user_bias.double()[u] + m.item_bias.double()[i] + (P[u] * Q[i]).sum(1)
    torch.testing.assert_close(m(u, i).double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.predict(u.int(), i.int(), chunk=2).double(), ref, rtol=1e-6, atol=1e-6)
    pred, pen = m(u, i, reg=(0.1, 0.2))
    want = 0.1 * ((P[u] ** 2).sum() + (Q[i] ** 2).sum()) + 0.2 * ((m.user_bias.double()[u] ** 2).sum()
                                                                 + (m.item_bias.double()[i] ** 2).sum())
    assert float(pen.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


@pytest.mark.parametrize("d", [3, 32, 130])
def test_predict_chunks_change_no_bit(d):
    """The CPU's cache-sized chunks (ragged: n is no multiple of them) give the same floats as
    one chunk of everything, and those match float64."""
    m = BiasedMF(700, 300, d, init_std=0.3, global_mean=3.0, seed=d)
    with torch.no_grad():
        m.user_bias.normal_()
        m.item_bias.normal_()
    c = predict_chunk("cpu", d)
    assert c >= 4096 and (c * d <= 1 << 18 or c == 4096) and predict_chunk("cuda", d) == 1 << 22
    g = torch.Generator().manual_seed(d)
    n = 2 * c + 17
    u = torch.randint(0, 700, (n,), generator=g, dtype=torch.int32)
    i = torch.randint(0, 300, (n,), generator=g, dtype=torch.int32)
    got = m.predict(u, i)
    assert torch.equal(got, m.predict(u, i, chunk=n))
    P, Q = m.user_factors.double(), m.item_factors.double()
    ref = 3.0 + m.user_bias.double()[u.long()] + m.item_bias.double()[i.long()] + (P[u.long()] * Q[i.long()]).sum(1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_sparse_gradients_equal_dense_ones_and_sparse_adam_steps():
    dense = BiasedMF(6, 5, 3, init_std=0.3, global_mean=3.0, seed=3)
    sparse = BiasedMF(6, 5, 3, init_std=0.3, global_mean=3.0, seed=3, sparse=True)
    u = torch.tensor([0, 5, 5, 2])
    i = torch.tensor([4, 0, 0, 3])
    r = torch.tensor([4.0, 1.0, 2.0, 5.0])
    for m in (dense, sparse):
        pred, pen = m(u, i, reg=(0.05, 0.01))
        (((r - pred) ** 2).sum() + pen).backward()
    for k in ("user_factors", "item_factors", "user_bias", "item_bias"):
        g = getattr(sparse, k).grad
        assert g.is_sparse
        torch.testing.assert_close(g.to_dense(), getattr(dense, k).grad)
    opt = torch.optim.SparseAdam(list(sparse.parameters()), lr=0.1)
    before = sparse.user_bias.detach().clone()
    opt.step()
    changed = (sparse.user_bias.detach() != before).nonzero().flatten().tolist()
    assert changed == [0, 2, 5]  # only the rows of the batch move
