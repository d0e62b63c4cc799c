"""data/sources.py and the readers on datasets: folders of part files, Hive partition
folders, globs, compressed text, and s3 through a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import bz2
import gzip
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svdfill.data.errors import DataError
from svdfill.data.readers import read_ratings
from svdfill.data.sources import Part, is_uri, resolve
from tests.s3_server import s3_bucket  # noqa: F401  (fixture)


def _table(users, items, ratings) -> pa.Table:
    return pa.table({"user": pa.array(users, pa.int64()), "item": pa.array(items, pa.int64()),
                     "rating": pa.array(ratings, pa.float32())})


def _random(n: int, seed: int):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(50 * 40, size=n, replace=False)
    return (pairs // 40).astype(np.int64), (pairs % 40).astype(np.int64), \
        rng.integers(1, 6, n).astype(np.float32)


def _spark_like(root, users, items, ratings, n_parts: int, partitioned: bool = False):
    """A folder as Spark writes it: part files, _SUCCESS, .crc side files, maybe
    ``bucket=K/`` partition folders; returns the part paths in sorted order."""
    root.mkdir(parents=True)
    (root / "_SUCCESS").write_bytes(b"")
    bounds = np.linspace(0, len(users), n_parts + 1).astype(int)
    paths = []
    for j in range(n_parts):
        folder = root / f"bucket={j}" if partitioned else root
        folder.mkdir(exist_ok=True)
        p = folder / f"part-{j:05d}.snappy.parquet"
        s = slice(bounds[j], bounds[j + 1])
        pq.write_table(_table(users[s], items[s], ratings[s]), p)
        (folder / f".part-{j:05d}.snappy.parquet.crc").write_bytes(b"crc")
        paths.append(p)
    (root / "_temporary").mkdir()
    (root / "_temporary" / "part-99999.parquet").write_bytes(b"half-written")
    return sorted(paths, key=str)


@pytest.mark.parametrize("partitioned", [False, True])
def test_a_folder_of_parts_reads_as_the_concatenated_file(tmp_path, partitioned):
    u, i, r = _random(900, 1)
    parts = _spark_like(tmp_path / "ds", u, i, r, 4, partitioned)
    assert [p.path for p in resolve(tmp_path / "ds")] == [str(p) for p in parts]
    got = read_ratings(tmp_path / "ds")
    one = tmp_path / "one.parquet"
    pq.write_table(_table(u, i, r), one)
    want = read_ratings(one)
    assert np.array_equal(got.users, want.users) and np.array_equal(got.items, want.items)
    assert np.array_equal(got.ratings, want.ratings)
    if partitioned:
        assert [dict(p.partition) for p in resolve(tmp_path / "ds")] == [{"bucket": str(j)} for j in range(4)]


def test_partition_folders_supply_a_missing_column(tmp_path):
    for day in ("1", "2"):
        d = tmp_path / "ds" / f"user={day}"
        d.mkdir(parents=True)
        pq.write_table(pa.table({"item": [10, 11], "rating": [4.0, 5.0]}), d / "p.parquet")
    got = read_ratings(tmp_path / "ds")
    assert list(got.users) == ["1", "1", "2", "2"] and list(got.items) == [10, 11, 10, 11]


def test_globs_match_within_and_across_folders(tmp_path):
    u, i, r = _random(300, 2)
    _spark_like(tmp_path / "ds", u, i, r, 3, partitioned=True)
    assert len(resolve(str(tmp_path / "ds" / "**" / "part-*.parquet"))) == 3
    assert len(resolve(str(tmp_path / "ds" / "bucket=[01]" / "*.parquet"))) == 2
    with pytest.raises(DataError, match="matches no data file"):
        resolve(str(tmp_path / "ds" / "*.csv"))


def test_a_bad_row_names_its_part_file_and_row(tmp_path):
    u, i, r = _random(200, 3)
    parts = _spark_like(tmp_path / "ds", u, i, r, 2)
    bad = r.copy()
    bad[150] = 9.0  # row 50 of the second part
    pq.write_table(_table(u[100:], i[100:], bad[100:]), parts[1])
    with pytest.raises(DataError) as e:
        read_ratings(tmp_path / "ds", scale=(1.0, 5.0))
    assert f"{parts[1]}: row 51" in str(e.value) and "outside the scale" in str(e.value)


def test_duplicates_across_parts_name_both_files(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(_table([1, 2], [1, 1], [3, 4]), d / "a.parquet")
    pq.write_table(_table([3, 2], [1, 1], [5, 1]), d / "b.parquet")
    with pytest.raises(DataError) as e:
        read_ratings(d)
    msg = str(e.value)
    assert f"{d / 'b.parquet'}: row 2" in msg and "row 2" in msg and "duplicate" in msg
    assert len(read_ratings(d, dedupe="last")) == 3


def test_text_ids_in_one_part_make_all_ids_text(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "a.csv").write_text("user,item,rating\n7,1,4\n")
    (d / "b.csv").write_text("user,item,rating\nu8,1,3\n007,2,2\n")
    got = read_ratings(d)
    assert list(got.users) == ["7", "u8", "007"] and got.items.dtype == np.int64


def test_mixed_formats_are_refused(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(_table([1], [1], [3]), d / "a.parquet")
    (d / "b.csv").write_text("user,item,rating\n2,1,4\n")
    with pytest.raises(DataError, match="mixes formats"):
        read_ratings(d)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_bytes(b"")
    with pytest.raises(DataError, match="holds no data files"):
        read_ratings(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        read_ratings(tmp_path / "nope")


MOVIELENS_CSV = "userId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n1,1029,3.0,1260759179\r\n2,10,4.0,835355493\r\n"


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".zst", None)])
def test_compressed_text_reads_as_the_plain_file(tmp_path, suffix, opener):
    plain = tmp_path / "ratings.csv"
    plain.write_bytes(MOVIELENS_CSV.encode())
    packed = tmp_path / f"ratings.csv{suffix}"
    if opener is None:
        with pa.CompressedOutputStream(str(packed), "zstd") as f:
            f.write(MOVIELENS_CSV.encode())
    else:
        with opener(packed, "wb") as f:
            f.write(MOVIELENS_CSV.encode())
    want, got = read_ratings(plain), read_ratings(packed)
    assert np.array_equal(got.ratings, want.ratings) and list(got.users) == list(want.users)
    assert got.source == str(packed)


def test_a_bad_line_in_a_gzip_file_names_the_file_and_line(tmp_path):
    p = tmp_path / "u.data.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"1\t2\t3\t100\n1\t3\t4\t101\n2\t5\tx\t102\n")
    with pytest.raises(DataError) as e:
        read_ratings(p)
    assert f"{p}:3" in str(e.value) and "'x'" in str(e.value)


def test_ml100k_gzipped_equals_the_original(tmp_path, ml100k_path):
    p = tmp_path / "u.data.gz"
    with open(ml100k_path, "rb") as src, gzip.open(p, "wb") as dst:
        shutil.copyfileobj(src, dst)
    want, got = read_ratings(ml100k_path), read_ratings(p)
    assert len(got) == 100_000
    assert np.array_equal(got.users, want.users) and np.array_equal(got.ratings, want.ratings)


def test_uris_are_recognized_and_file_uris_read_locally(tmp_path):
    assert is_uri("s3://b/k") and is_uri("file:///x") and not is_uri("/x/y") and not is_uri("c:x")
    p = tmp_path / "r.parquet"
    pq.write_table(_table([1, 2], [3, 4], [5, 1]), p)
    got = read_ratings(f"file://{p}")
    assert list(got.users) == [1, 2]
    (part,) = resolve(f"file://{p}")
    assert isinstance(part, Part) and part.size == p.stat().st_size


def test_s3_folder_of_parts_and_compressed_text(s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    u, i, r = _random(600, 4)
    local = _spark_like(tmp_path / "ds", u, i, r, 3, partitioned=True)
    for p in (tmp_path / "ds").rglob("*"):
        if p.is_file():
            with fs.open_output_stream(f"{bucket}/ratings/{p.relative_to(tmp_path / 'ds')}") as out:
                out.write(p.read_bytes())
    got = read_ratings(f"s3://{bucket}/ratings/")
    want = read_ratings(tmp_path / "ds")
    assert np.array_equal(got.users, want.users) and np.array_equal(got.ratings, want.ratings)
    assert got.source == f"s3://{bucket}/ratings/"
    assert len(resolve(f"s3://{bucket}/ratings/**/part-*.parquet")) == len(local)
    with fs.open_output_stream(f"{bucket}/text/ratings.csv.gz", compression=None) as out:
        out.write(gzip.compress(MOVIELENS_CSV.encode()))
    got = read_ratings(f"s3://{bucket}/text/ratings.csv.gz")
    assert list(got.items) == [31, 1029, 10]
    with pytest.raises(DataError) as e:
        read_ratings(f"s3://{bucket}/missing/?access_key=SECRET")
    assert "SECRET" not in str(e.value) and f"s3://{bucket}/missing/" in str(e.value)


def test_s3_dataset_through_the_config(s3_bucket, tmp_path):
    from svdfill.config import Config, DataConfig
    from svdfill.data.dataset import load_dataset

    bucket, fs = s3_bucket
    u, i, r = _random(400, 5)
    buf = pa.BufferOutputStream()
    pq.write_table(_table(u, i, r), buf)
    with fs.open_output_stream(f"{bucket}/r/part-0.parquet") as out:
        out.write(buf.getvalue().to_pybytes())
    ratings, idmap = load_dataset(DataConfig(path=f"s3://{bucket}/r"))
    assert len(ratings) == 400 and idmap.n_users == len(np.unique(u))
    assert Config  # the data section is what jobs pass on; nothing else to build here
