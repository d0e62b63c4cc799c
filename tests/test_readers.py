"""data/readers.py: every format on real and tmp files, and every kind of bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svdfill.data.errors import DataError
from svdfill.data.readers import RawRatings, count_distinct_pairs, read_ratings


def write(tmp_path, name: str, text: str | bytes):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def error_of(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        read_ratings(path, **kw)
    msg = str(e.value)
    assert str(path) in msg, msg
    return msg


# --------------------------------------------------------------------------- real data
def test_ml100k(ml100k_path):
    r = read_ratings(ml100k_path)
    assert isinstance(r, RawRatings) and len(r) == 100_000
    assert r.users.dtype == np.int64 and r.items.dtype == np.int64 and r.ratings.dtype == np.float32
    assert len(np.unique(r.users)) == 943 and len(np.unique(r.items)) == 1682
    assert np.bincount(r.ratings.astype(np.int64)).tolist() == [0, 6110, 11370, 27145, 34174, 21201]
    # first line of u.data: 196 242 3 881250949
    assert (r.users[0], r.items[0], r.ratings[0]) == (196, 242, 3.0)
    assert r.source == str(ml100k_path)


def test_ml1m(ml1m_path):
    r = read_ratings(ml1m_path)
    assert len(r) == 1_000_209
    assert len(np.unique(r.users)) == 6040 and len(np.unique(r.items)) == 3706
    assert r.ratings.astype(np.float64).mean() == pytest.approx(3.581564, abs=5e-7)
    assert (r.users[0], r.items[0], r.ratings[0]) == (1, 1193, 5.0)
    same = read_ratings(ml1m_path, format="ml-dat", sep="::")
    assert np.array_equal(same.items, r.items)


def test_filmtrust_duplicates(filmtrust_path):
    msg = error_of(filmtrust_path)
    # the first repeated pair is (308, 207) on line 7437, first seen on line 7411
    assert f"{filmtrust_path}:7437:" in msg and "line 7411" in msg
    assert "(308, 207)" in msg and "3 duplicate rows" in msg and "dedupe" in msg
    last = read_ratings(filmtrust_path, dedupe="last")
    mean = read_ratings(filmtrust_path, dedupe="mean")
    assert len(last) == len(mean) == 35_494
    key = last.users * 10_000 + last.items
    assert len(np.unique(key)) == len(key)
    sel = (last.users == 308) & (last.items == 207)
    assert last.ratings[sel].tolist() == [3.0]  # line 7411 says 3.5, line 7437 says 3
    sel = (mean.users == 308) & (mean.items == 207)
    assert mean.ratings[sel].tolist() == [3.25]
    assert 0.5 <= mean.ratings.min() and mean.ratings.max() <= 4.0


# --------------------------------------------------------------------------- formats
def test_movielens_csv_header(tmp_path):
    p = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n"
                                       "1,1029,3.0,1260759179\n7,31,0.5,1\n")
    r = read_ratings(p)
    assert r.users.tolist() == [1, 1, 7] and r.items.tolist() == [31, 1029, 31]
    assert r.ratings.tolist() == [2.5, 3.0, 0.5]
    bad = write(tmp_path, "r2.csv", "userId,movieId,rating,timestamp\n1,31,0.25,1\n")
    assert "outside the scale [0.5, 5]" in error_of(bad)  # MovieLens csv scale is 0.5-5


def test_generic_csv_named_columns_and_sep(tmp_path):
    p = write(tmp_path, "x.txt", "when;score;who;what\n5;4.5;alice;m1\n6;2;bob;m2\n7;1;alice;m2\n")
    r = read_ratings(p, format="csv", sep=";", user_col="who", item_col="what", rating_col="score")
    assert r.users.dtype == object and r.users.tolist() == ["alice", "bob", "alice"]
    assert r.items.tolist() == ["m1", "m2", "m2"] and r.ratings.tolist() == [4.5, 2.0, 1.0]
    # auto-detection sniffs the separator and sees the header
    assert read_ratings(p, user_col="who", item_col="what", rating_col="score").users.tolist() == r.users.tolist()


def test_csv_quoted_fields(tmp_path):
    p = write(tmp_path, "q.csv", 'user,item,rating\n"a, b",x,1\nc,"y",2\n')
    r = read_ratings(p)
    assert r.users.tolist() == ["a, b", "c"] and r.items.tolist() == ["x", "y"]


def test_plain_space_and_override(tmp_path):
    p = write(tmp_path, "ratings.txt", "1 1 2\n1 2 4\n2 1 3.5\n")
    r = read_ratings(p)
    assert r.users.tolist() == [1, 1, 2] and r.ratings.tolist() == [2.0, 4.0, 3.5]
    # no scale check for unknown formats unless asked
    big = write(tmp_path, "big.txt", "1 1 200\n")
    assert read_ratings(big).ratings.tolist() == [200.0]
    assert "outside the scale [0.5, 4]" in error_of(big, scale=(0.5, 4.0))
    # explicit format override: a tab file named like nothing known
    t = write(tmp_path, "data.tsv", "3\t4\t5\t99\n")
    assert read_ratings(t, format="ml-100k").items.tolist() == [4]
    assert read_ratings(t, format="plain").items.tolist() == [4]


def test_ml_dat_four_fields(tmp_path):
    p = write(tmp_path, "ratings.dat", "1::10::5::978300760\n2::10::1::978300761\n")
    r = read_ratings(p)
    assert r.users.tolist() == [1, 2] and r.ratings.tolist() == [5.0, 1.0]


def test_string_and_noncanonical_ids_stay_strings(tmp_path):
    p = write(tmp_path, "ids.txt", "007\tA\t1\n7\tB\t2\n")
    r = read_ratings(p, format="plain")
    assert r.users.dtype == object and r.users.tolist() == ["007", "7"]  # not merged
    assert r.items.tolist() == ["A", "B"]
    neg = write(tmp_path, "neg.txt", "-3\t10\t1\n12\t-10\t2\n")
    assert read_ratings(neg).users.tolist() == [-3, 12]


def test_blank_lines_crlf_and_bom(tmp_path):
    p = write(tmp_path, "u.data", b"\xef\xbb\xbf1\t2\t3\t0\r\n\r\n4\t5\t4\t0\r\n\n6\t7\tx\t0\r\n")
    msg = error_of(p)
    assert f"{p}:5:" in msg and "'x' is not a number" in msg  # line numbers count blank lines
    ok = write(tmp_path, "u1.base", b"\xef\xbb\xbf1\t2\t3\t0\r\n\r\n4\t5\t6\t0\r\n")
    msg = error_of(ok)
    assert f"{ok}:3:" in msg and "outside the scale [1, 5]" in msg and "'4\\t5\\t6\\t0'" in msg


@pytest.mark.parametrize("ids", ["int", "str"])
def test_parquet(tmp_path, ids):
    users = [10, 20, 10] if ids == "int" else ["u1", "u2", "u1"]
    t = pa.table({"user": pa.array(users), "item": pa.array([1, 1, 2], type=pa.int32()),
                  "rating": pa.array([1.5, 2.0, 3.0], type=pa.float32()), "ts": [0, 0, 0]})
    p = tmp_path / "r.parquet"
    pq.write_table(t, p)
    r = read_ratings(p)
    assert r.users.tolist() == users and r.items.dtype == np.int64
    assert r.users.dtype == (np.int64 if ids == "int" else object)
    assert r.ratings.dtype == np.float32 and r.ratings.tolist() == [1.5, 2.0, 3.0]
    renamed = tmp_path / "named.pq"
    pq.write_table(t.rename_columns(["u", "i", "r", "ts"]), renamed)
    assert read_ratings(renamed, user_col="u", item_col="i", rating_col="r").users.tolist() == users


# --------------------------------------------------------------------------- bad input
# one bad line, named by file:line with what is wrong: (file name, content, read_ratings
# keywords, the line named, what the message says)
BAD_LINE = {
    "malformed-tab": ("u.data", "1\t2\t3\t4\n5\t6\t7\n8\t9\t1\t2\n", {}, 2,
                      ["expected 4 fields", "got 3", "'5\\t6\\t7'"]),
    "malformed-dat": ("ratings.dat", "1::2::3\n1::3::4\n1::4\n", {}, 3, ["got 2", "'1::4'"]),
    "non-numeric-dat": ("ratings.dat", "1::2::3\n1::3::four\n", {}, 2,
                        ["'four' is not a number", "'1::3::four'"]),
    "non-numeric-csv": ("r.csv", "user,item,rating\n1,2,3\n1,3,\n", {}, 3, ["'' is not a number"]),
    **{f"nonfinite-{v}": ("r.txt", f"1 2 3\n1 3 4\n2 2 {v}\n", {}, 3, ["finite", f"'2 2 {v}'"])
       for v in ("nan", "NaN", "inf", "-inf")},
    "separator-mid-file": ("u.data", "1\t2\t3\t0\n4,5,3,0\n", {}, 2,
                           ["got 1", "separator looks wrong"]),
    "duplicate-pair": ("r.txt", "1 1 1\n2 1 2\n1 1 3\n1 1 5\n", {}, 3,
                       ["line 1", "(1, 1)", "2 duplicate rows"]),
    "missing-column": ("r.csv", "user,movie,stars\n1,2,3\n", {"format": "csv", "rating_col": "score"},
                       1, ["missing", "'score'", "'stars'"]),
}


@pytest.mark.parametrize("case", BAD_LINE)
def test_bad_line_is_named(tmp_path, case):
    name, content, kw, line, says = BAD_LINE[case]
    p = write(tmp_path, name, content)
    msg = error_of(p, **kw)
    assert f"{p}:{line}:" in msg, msg
    for part in says:
        assert part in msg, (part, msg)


def test_rating_outside_scale(tmp_path):
    p = write(tmp_path, "u.data", "1\t2\t3\t0\n1\t3\t6\t0\n1\t4\t0\t0\n")
    msg = error_of(p)  # MovieLens formats default to 1..5
    assert f"{p}:2:" in msg and "6 is outside the scale [1, 5]" in msg and "2 such ratings" in msg
    assert read_ratings(p, scale=None).ratings.tolist() == [3.0, 6.0, 0.0]
    assert read_ratings(p, scale=(0, 10)).ratings.tolist() == [3.0, 6.0, 0.0]
    msg = error_of(p, scale=(math.nan, 5))  # only the upper side checked
    assert f"{p}:2:" in msg and "[nan, 5]" in msg


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    p = write(tmp_path, "ratings.dat", content)
    assert "empty" in error_of(p)


def test_header_only(tmp_path):
    p = write(tmp_path, "r.csv", "user,item,rating\n")
    assert "no ratings" in error_of(p)


def test_missing_parquet_column(tmp_path):  # the CSV case: BAD_LINE["missing-column"]
    t = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": [1], "item": [2]}), t)
    msg = error_of(t)
    assert "missing rating column 'rating'" in msg and "'user', 'item'" in msg


def test_csv_without_header(tmp_path):
    p = write(tmp_path, "r.csv", "1,2,3\n4,5,6\n")
    msg = error_of(p, format="csv")
    assert "looks like data" in msg and "plain" in msg


def test_wrong_separator(tmp_path):
    tab = write(tmp_path, "tab.csv", "user\titem\trating\n1\t2\t3\n")
    msg = error_of(tab, format="csv")
    assert "separator looks wrong" in msg and "tab" in msg and f"{tab}:1:" in msg
    comma = write(tmp_path, "u.data", "1,2,3,4\n")
    msg = error_of(comma)  # u.data means tab-separated ml-100k
    assert "separator looks wrong" in msg and "comma" in msg
    dat = write(tmp_path, "x.dat", "1\t2\t3\n")
    msg = error_of(dat, format="ml-dat")
    assert "separator looks wrong" in msg


def test_duplicates_policy(tmp_path):  # refused by default: BAD_LINE["duplicate-pair"]
    p = write(tmp_path, "r.txt", BAD_LINE["duplicate-pair"][1])
    last = read_ratings(p, dedupe="last")
    assert list(zip(last.users.tolist(), last.items.tolist(), last.ratings.tolist())) == [(2, 1, 2.0), (1, 1, 5.0)]
    mean = read_ratings(p, dedupe="mean")
    assert list(zip(mean.users.tolist(), mean.items.tolist(), mean.ratings.tolist())) == [(1, 1, 3.0), (2, 1, 2.0)]


def test_empty_id_and_parquet_nulls(tmp_path):
    p = write(tmp_path, "r.csv", "user,item,rating\n1,2,3\n,4,5\n")
    msg = error_of(p)
    assert f"{p}:3:" in msg and "empty user id" in msg
    t = tmp_path / "n.parquet"
    pq.write_table(pa.table({"user": [1, 2, 3], "item": [1, 1, 1], "rating": [1.0, None, 2.0]}), t)
    msg = error_of(t)
    assert "row 2" in msg and "null" in msg
    s = tmp_path / "s.parquet"
    pq.write_table(pa.table({"user": [1, 2], "item": [1, 1], "rating": ["4", "good"]}), s)
    msg = error_of(s)
    assert "row 2" in msg and "not a number" in msg and "'good'" in msg
    f = tmp_path / "f.parquet"
    pq.write_table(pa.table({"user": [1, 2], "item": [1, 1], "rating": [1.0, float("nan")]}), f)
    assert "row 2" in error_of(f)


def test_misc_errors(tmp_path):
    assert "no such file" in error_of(tmp_path / "missing.data")
    assert "directory" in error_of(tmp_path)
    p = write(tmp_path, "r.txt", "1 2 3\n")
    assert "unknown format" in error_of(p, format="xls")
    assert "unknown dedupe" in error_of(p, dedupe="first")
    junk = write(tmp_path, "j.parquet", b"not parquet at all")
    assert "Parquet" in error_of(junk)
    assert issubclass(DataError, ValueError)


def test_long_lines_are_shortened(tmp_path):
    p = write(tmp_path, "u.data", "1\t2\t3\t4\n" + "9" * 5000 + "\n")
    msg = error_of(p)
    assert len(msg) < 600 and "…" in msg


# --------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("seed", range(4))
def test_count_distinct_pairs_matches_brute_force(seed, monkeypatch):
    import svdfill.data.readers as readers

    rng = np.random.default_rng(seed)
    n_users, n_items = int(rng.integers(1, 300)), int(rng.integers(1, 50))
    n = int(rng.integers(0, 2000))
    uc, ic = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    expect = len(set(zip(uc.tolist(), ic.tolist())))
    assert count_distinct_pairs(uc, ic, n_users, n_items) == expect
    monkeypatch.setattr(readers, "_TABLE_CELLS", 97)  # force the blocked path, ragged blocks
    assert count_distinct_pairs(uc, ic, n_users, n_items) == expect


def test_message_format_names_line(tmp_path):
    p = write(tmp_path, "ratings.dat", "1::1::1\n" * 3 + "bad line\n")
    msg = error_of(p)
    assert re.search(rf"{re.escape(str(p))}:4: ", msg)


# --------------------------------------------------------------------------- timestamps
def test_ml100k_timestamps_only_when_asked(ml100k_path):
    assert read_ratings(ml100k_path).timestamps is None
    r = read_ratings(ml100k_path, timestamps=True)
    assert r.timestamps.dtype == np.int64 and r.timestamps.shape == (100_000,)
    assert r.timestamps[0] == 881250949  # 196 242 3 881250949
    assert r.timestamps.min() == 874724710 and r.timestamps.max() == 893286638


def test_ml1m_has_no_timestamps(ml1m_path):
    with pytest.raises(DataError, match=r"ratings\.dat:1: no timestamp field: ml-dat lines here "
                                        r"have 3 fields.*data\.time_col"):
        read_ratings(ml1m_path, timestamps=True)


def test_timestamps_of_text_formats(tmp_path):
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::10::5::978300760\n1::11::3::978302109\n")
    assert read_ratings(dat, timestamps=True).timestamps.tolist() == [978300760, 978302109]
    plain = tmp_path / "r.txt"
    plain.write_text("1 1 2\n1 2 4\n")
    with pytest.raises(DataError, match=r"r\.txt:1: no timestamp field: plain lines here have 3"):
        read_ratings(plain, timestamps=True)
    csv = tmp_path / "ratings.csv"
    csv.write_text("userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676.7\n")
    assert read_ratings(csv, timestamps=True).timestamps.tolist() == [1112486027, 1112484676]


@pytest.mark.parametrize("name", ["time", "ts", "Date"])
def test_csv_time_column_spellings_and_iso_dates(tmp_path, name):
    f = tmp_path / "r.csv"
    f.write_text(f"user,item,rating,{name}\n1,1,3,2020-01-01\n1,2,4,2020-01-01T00:00:10\n"
                 "2,1,5,2020-01-01T02:00:00+02:00\n")
    assert read_ratings(f, timestamps=True).timestamps.tolist() == [1577836800, 1577836810, 1577836800]


def test_csv_missing_or_bad_time_column(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("user,item,rating,when\n1,1,3,1\n")
    with pytest.raises(DataError,
                       match=r"r\.csv:1: no timestamp column 'timestamp'.*'when'.*set data\.time_col"):
        read_ratings(f, timestamps=True)
    assert read_ratings(f, timestamps=True, time_col="when").timestamps.tolist() == [1]
    with pytest.raises(DataError, match="no timestamp column 'stamp'"):
        read_ratings(f, timestamps=True, time_col="stamp")  # a chosen name is taken literally
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,rating,timestamp\n1,1,3,100\n1,2,3,yesterday\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: timestamp 'yesterday' is neither"):
        read_ratings(bad, timestamps=True)
    assert read_ratings(bad).timestamps is None  # not asked for: not read, not checked


def test_parquet_timestamps(tmp_path):
    import datetime as dt

    f = tmp_path / "r.parquet"
    pq.write_table(pa.table({
        "user": [1, 2, 3], "item": [1, 1, 2], "rating": [1.0, 2.0, 3.0],
        "ts": pa.array([dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 1, 0, 0, 1, 500),
                        dt.datetime(2021, 1, 1)], pa.timestamp("ms")),
        "unix": [5, 6, 7]}), f)
    assert read_ratings(f, timestamps=True).timestamps.tolist() == [1577836800, 1577836801, 1609459200]
    assert read_ratings(f, timestamps=True, time_col="unix").timestamps.tolist() == [5, 6, 7]
    g = tmp_path / "none.parquet"
    pq.write_table(pa.table({"user": [1], "item": [1], "rating": [1.0]}), g)
    with pytest.raises(DataError, match=r"none\.parquet: no timestamp column.*set data\.time_col"):
        read_ratings(g, timestamps=True)


def test_dedupe_keeps_timestamps(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("user,item,rating,timestamp\n1,1,2,10\n1,2,3,20\n1,1,4,30\n")
    last = read_ratings(f, timestamps=True, dedupe="last")
    assert last.ratings.tolist() == [3.0, 4.0] and last.timestamps.tolist() == [20, 30]
    mean = read_ratings(f, timestamps=True, dedupe="mean")
    assert mean.ratings.tolist() == [3.0, 3.0] and mean.timestamps.tolist() == [30, 20]
