"""data/idmap.py: factorize against a brute-force reference, encode/decode, state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svdfill.data.idmap import IdMap, as_id_array, factorize
from svdfill.data.readers import RawRatings


def brute_factorize(values):
    uniq = sorted(set(values.tolist()))
    pos = {v: k for k, v in enumerate(uniq)}
    return uniq, [pos[v] for v in values.tolist()]


@pytest.mark.parametrize("seed", range(6))
def test_factorize_ints_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 3000))
    # dense small ranges (presence table) and huge sparse ones incl. negatives (sort path)
    span = [5, 1000, 10**12][seed % 3]
    values = rng.integers(-span, span, n)
    uniq, codes = factorize(values)
    ref_u, ref_c = brute_factorize(values)
    assert uniq.dtype == np.int64 and codes.dtype == np.int64
    assert uniq.tolist() == ref_u and codes.tolist() == ref_c


@pytest.mark.parametrize("lo,gap", [(0, False), (1, False), (-7, False), (0, True)])
def test_factorize_ints_with_every_id_of_the_range_used(lo, gap):
    """Ids lo..hi all present (the synthetic presets, 1..n files) take the no-lookup path;
    one missing id in the middle takes the table lookup. Both equal the reference."""
    rng = np.random.default_rng(abs(lo) + 10 * gap)
    ids = np.arange(lo, lo + 200)
    if gap:
        ids = np.delete(ids, 57)
    values = np.concatenate([ids, rng.choice(ids, 5000)])
    rng.shuffle(values)
    uniq, codes = factorize(values)
    ref_u, ref_c = brute_factorize(values)
    assert uniq.dtype == np.int64 and codes.dtype == np.int64
    assert uniq.tolist() == ref_u and codes.tolist() == ref_c


def test_factorize_strings_matches_reference():
    rng = np.random.default_rng(7)
    pool = np.array(["b", "a", "ä", "10", "9", "", "zz", "A"], dtype=object)
    values = pool[rng.integers(0, len(pool), 500)]
    uniq, codes = factorize(values)
    ref_u, ref_c = brute_factorize(values.astype(str))
    assert uniq.dtype == object and uniq.tolist() == ref_u and codes.tolist() == ref_c


def test_as_id_array_types():
    assert as_id_array([3, 1]).dtype == np.int64
    assert as_id_array(np.array([3, 1], dtype=np.uint16)).dtype == np.int64
    assert as_id_array(torch.tensor([1, 2], dtype=torch.int32)).dtype == np.int64
    assert as_id_array(["x", "y"]).dtype == object
    assert as_id_array(np.array([1, "x"], dtype=object)).tolist() == ["1", "x"]


def test_build_encode_decode():
    raw = RawRatings(np.array([30, 10, 30, 20]), np.array(["b", "a", "c", "a"], dtype=object),
                     np.ones(4, np.float32))
    m = IdMap.build(raw)
    assert m.user_ids.tolist() == [10, 20, 30] and m.item_ids.tolist() == ["a", "b", "c"]
    assert (m.n_users, m.n_items, m.user_dtype, m.item_dtype) == (3, 3, "int64", "str")
    assert m.encode_users([30, 10, 99]).tolist() == [2, 0, -1]
    assert m.encode_items(["c", "zzz", "a"]).tolist() == [2, -1, 0]
    assert m.encode_users(np.array(["20", "020", "x"], dtype=object)).tolist() == [1, -1, -1]
    assert m.encode_items(np.array([1, 2])).tolist() == [-1, -1]  # compared as text: no such ids
    assert m.encode_users(np.array([], dtype=np.int64)).tolist() == []
    assert m.decode_users(torch.tensor([2, 0])).tolist() == [30, 10]
    assert m.decode_items(np.array([1])).tolist() == ["b"]
    with pytest.raises(IndexError):
        m.decode_users([3])
    m2, uc, ic = IdMap.build_encoded(raw)
    assert m2 == m and uc.tolist() == [2, 0, 2, 1] and ic.tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError):
        IdMap(np.array([2, 1]), np.array([1]))


@pytest.mark.parametrize("kind", ["int", "str"])
def test_state_survives_weights_only_load(tmp_path, kind):
    users = np.array([5, 7, 11]) if kind == "int" else np.array(["u1", "u2"], dtype=object)
    m = IdMap(users, np.array(["i1", "i2", "i3"], dtype=object))
    p = tmp_path / "m.pt"
    torch.save({"idmap": m.to_state()}, p)
    back = IdMap.from_state(torch.load(p, weights_only=True)["idmap"])
    assert back == m and back.user_ids.dtype == m.user_ids.dtype
    assert back.decode_users([1]).tolist() == m.decode_users([1]).tolist()
    with pytest.raises(ValueError):
        IdMap.from_state({"nope": 1})
