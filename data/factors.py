"""Factor export: a trained model's tables as files other tools read without torch.

``parquet`` (:func:`write_parquet_factors`), the folder ``DIR/``:

- ``users.parquet``: ``user_id`` (the raw id: int64 or string), ``bias`` float32,
  ``factors`` fixed_size_list<float32>[d] — one row per user in contiguous-id order;
- ``items.parquet``: ``item_id``, ``bias``, ``factors``, the same for items;
- ``model.json``: ``global_mean`` (μ), ``factors`` (d), ``n_users``, ``n_items``, the id
  types, ``model_sha256`` of the source ``model.pt``, ``svdfill_version`` and the prediction
  formula ``global_mean + user.bias + item.bias + dot(user.factors, item.factors)``.

``spark`` (:func:`write_spark_als`): the folder ``pyspark.ml.recommendation.ALSModel.load``
reads (``metadata/part-00000`` JSON, ``userFactors/`` and ``itemFactors/`` Parquet with
``id int, features array<float>``, what ``ALSModel.save`` writes). Spark's ALS has no biases
and predicts ``dot(userFeatures, itemFeatures)``, so μ and the biases are folded into two
extra factor columns (rank d + 2):

    user features  [p_u, μ + b_u, 1]      item features  [q_i, 1, b_i]

whose dot product is ``p_u·q_i + μ + b_u + b_i``, svdfill's prediction (Spark computes it
in float32, so the two agree to float32 rounding); ``transform``, ``recommendForAllUsers``
and ``recommendForAllItems`` therefore predict and rank as svdfill does (Spark keeps no seen
sets: it does not exclude rated items). (``bench.peer_spark`` folds only ``[p_u, 1]·[q_i,
b_i]``, which ranks the same for each user but does not predict ratings.) Spark's ids are
int32: raw integer ids that fit are written as they are; otherwise (string ids, or integers
beyond int32) the contiguous ids are written and ``svdfill_user_ids.parquet`` /
``svdfill_item_ids.parquet`` (``id`` int32, ``raw_id``) map them back.

Either way the folder is built under a temporary name beside ``DIR`` and renamed into place
(a kill leaves no half folder); an existing non-empty ``DIR`` is replaced only with
``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from svdfill.data.durable import fsync_dir, fsync_file
from svdfill.data.errors import DataError

FORMATS = ("parquet", "spark")
FACTORS_FORMAT = "svdfill-factors/1"
SPARK_VERSION = "3.5.0"
"""``sparkVersion`` written into the metadata: the format is the one of Spark 3.x and 4.x
(loaded by pyspark 4 in the tests); an older claimed version keeps Spark 3 readers happy."""
INT32_MAX = 2**31 - 1


class FactorExportError(DataError):
    """A factor export that cannot be written (target in the way, unwritable folder)."""


def _np(t: Any, dtype=np.float32) -> np.ndarray:
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return np.ascontiguousarray(a, dtype=dtype)


def _mu(state: dict) -> np.float32:
    """μ as float32 (a 0-d tensor or a number in ``state``)."""
    mu = state["global_mean"]
    return np.float32(mu.detach().cpu().item() if hasattr(mu, "detach") else mu)


def _raw_id_array(ids: np.ndarray):
    import pyarrow as pa

    return pa.array(ids, type=pa.int64()) if ids.dtype == np.int64 else pa.array(
        [str(v) for v in ids], type=pa.string())


def factor_table(id_name: str, ids: np.ndarray, bias: np.ndarray, factors: np.ndarray):
    """A pyarrow table: ``id_name`` (raw ids), ``bias`` float32 [n], ``factors``
    fixed_size_list<float32>[d] from ``factors`` float32 [n, d]."""
    import pyarrow as pa

    n, d = factors.shape
    vec = pa.FixedSizeListArray.from_arrays(pa.array(factors.reshape(-1), type=pa.float32()), d)
    return pa.table({id_name: _raw_id_array(ids), "bias": pa.array(bias, type=pa.float32()),
                     "factors": vec})


def build_dir_atomically(out: str | os.PathLike, build: Callable[[Path], None], *,
                         overwrite: bool = False) -> Path:
    """Run ``build(tmp)`` on a fresh folder beside ``out``, then rename it onto ``out``.

    ``out`` may be missing or an empty folder; a non-empty one is replaced only with
    ``overwrite`` (moved aside, the new folder renamed in, the old one removed), else
    :class:`FactorExportError`. On any error the temporary folder is removed."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        raise FactorExportError(f"{out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FactorExportError(f"{out}: folder {parent} is not writable")
    if out.exists() and not out.is_dir():
        raise FactorExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FactorExportError(f"{out}: folder exists and is not empty (add --overwrite to replace it)")
    # a private staging folder beside out (same file system, so the rename is atomic); the
    # export is built in a subfolder made by mkdir, which gets the umask's permissions
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        new = stage / "new"
        new.mkdir()
        build(new)
        for f in new.rglob("*"):  # on disk before the rename makes them visible
            if f.is_file():
                fsync_file(f)
        old = stage / "old" if out.is_dir() else None
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)  # the previous export stays where it was
            raise
        fsync_dir(parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def write_parquet_factors(folder: Path, state: dict, idmap: Any, info: dict) -> None:
    """Write ``users.parquet``, ``items.parquet`` and ``model.json`` into ``folder``.

    state: the five model tensors (``user_factors`` float32 [U, d], ``item_factors`` [I, d],
    ``user_bias`` [U], ``item_bias`` [I], ``global_mean`` 0-d); idmap: the model's IdMap;
    info: extra ``model.json`` fields (model_sha256, …)."""
    import pyarrow.parquet as pq

    import svdfill

    P, Q = _np(state["user_factors"]), _np(state["item_factors"])
    pq.write_table(factor_table("user_id", idmap.user_ids, _np(state["user_bias"]), P),
                   folder / "users.parquet", compression="zstd")
    pq.write_table(factor_table("item_id", idmap.item_ids, _np(state["item_bias"]), Q),
                   folder / "items.parquet", compression="zstd")
    meta = {"format": FACTORS_FORMAT, "global_mean": float(_mu(state)),
            "factors": int(P.shape[1]), "n_users": int(P.shape[0]), "n_items": int(Q.shape[0]),
            "user_id_type": idmap.user_dtype, "item_id_type": idmap.item_dtype,
            "prediction": "global_mean + user.bias + item.bias + dot(user.factors, item.factors)",
            "svdfill_version": svdfill.__version__, **info}
    (folder / "model.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def spark_ids(ids: np.ndarray) -> tuple[np.ndarray, bool]:
    """The int32 ids Spark gets for raw ids ``ids``: (ids int32 [n], True) when they are
    integers within int32, else (contiguous ids 0..n-1, False)."""
    if ids.dtype == np.int64 and (ids.size == 0 or (ids.min() >= 0 and ids.max() <= INT32_MAX)):
        return ids.astype(np.int32), True
    return np.arange(ids.size, dtype=np.int32), False


def save_als_model(path: str | os.PathLike, user_factors: np.ndarray, item_factors: np.ndarray,
                   spark_version: str = SPARK_VERSION, *, user_ids: np.ndarray | None = None,
                   item_ids: np.ndarray | None = None) -> None:
    """Write float32 [U, r] / [I, r] factor matrices as the folder
    ``pyspark.ml.recommendation.ALSModel.load`` reads (``path`` is created; ids int32, by
    default 0..U-1 and 0..I-1). No biases: the caller folds them into the factors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    rank = int(user_factors.shape[1])
    if item_factors.shape[1] != rank:
        raise ValueError(f"factor widths differ: {user_factors.shape} vs {item_factors.shape}")
    (path / "metadata").mkdir(parents=True)
    meta = {"class": "org.apache.spark.ml.recommendation.ALSModel", "timestamp": int(time.time() * 1000),
            "sparkVersion": spark_version, "uid": "ALS_svdfill",
            "paramMap": {"userCol": "user", "itemCol": "item", "blockSize": 4096},
            "defaultParamMap": {"blockSize": 4096, "coldStartStrategy": "nan", "itemCol": "item",
                                "predictionCol": "prediction", "userCol": "user"},
            "rank": rank}
    (path / "metadata" / "part-00000").write_text(json.dumps(meta) + "\n")
    for name, mat, ids in (("userFactors", user_factors, user_ids), ("itemFactors", item_factors, item_ids)):
        mat = np.ascontiguousarray(mat, dtype=np.float32)
        ids = np.arange(mat.shape[0], dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
        features = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), rank).cast(
            pa.list_(pa.float32()))
        table = pa.table({"id": pa.array(ids, type=pa.int32()), "features": features})
        (path / name).mkdir()
        pq.write_table(table, path / name / "part-00000.parquet")


def fold_biases(state: dict) -> tuple[np.ndarray, np.ndarray]:
    """Spark's factors of a biased model: users ``[p_u, μ + b_u, 1]`` float32 [U, d+2],
    items ``[q_i, 1, b_i]`` float32 [I, d+2] (μ + b_u summed in float32, as the fill does)."""
    P, Q = _np(state["user_factors"]), _np(state["item_factors"])
    mu = _mu(state)
    u_shift = _np(state["user_bias"]) + mu
    users = np.hstack([P, u_shift[:, None], np.ones((P.shape[0], 1), np.float32)])
    items = np.hstack([Q, np.ones((Q.shape[0], 1), np.float32), _np(state["item_bias"])[:, None]])
    return users, items


def write_spark_factors(folder: Path, state: dict, idmap: Any, info: dict) -> None:
    """Spark's ALSModel folder of the biased model in ``folder`` (see the module docstring),
    plus ``svdfill.json`` (provenance, and how the ids were written) and, where Spark cannot
    take the raw ids, the id-map Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import svdfill

    users, items = fold_biases(state)
    u_ids, u_raw = spark_ids(idmap.user_ids)
    i_ids, i_raw = spark_ids(idmap.item_ids)
    folder.rmdir()  # save_als_model creates its folder, as ALSModel.save does
    save_als_model(folder, users, items, user_ids=u_ids, item_ids=i_ids)
    for name, ids, raw, kept in (("user", u_ids, idmap.user_ids, u_raw),
                                 ("item", i_ids, idmap.item_ids, i_raw)):
        if not kept:
            pq.write_table(pa.table({"id": pa.array(ids, type=pa.int32()), "raw_id": _raw_id_array(raw)}),
                           folder / f"svdfill_{name}_ids.parquet")
    meta = {"format": "svdfill-spark-als/1", "rank": int(users.shape[1]),
            "factors": int(users.shape[1]) - 2, "global_mean": float(_mu(state)),
            "folding": "user [p_u, mu + b_u, 1] . item [q_i, 1, b_i]",
            "user_ids": "raw" if u_raw else "contiguous (svdfill_user_ids.parquet)",
            "item_ids": "raw" if i_raw else "contiguous (svdfill_item_ids.parquet)",
            "svdfill_version": svdfill.__version__, **info}
    (folder / "svdfill.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def export_factors(state: dict, idmap: Any, out: str | os.PathLike, *, format: str = "parquet",
                   overwrite: bool = False, info: dict | None = None) -> Path:
    """Export the model's tables to the folder ``out`` as ``parquet`` or ``spark`` (see the
    module docstring); ``info``: provenance for the JSON file (model_sha256, …). Returns
    the folder."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    write = write_parquet_factors if format == "parquet" else write_spark_factors
    return build_dir_atomically(out, lambda tmp: write(tmp, state, idmap, dict(info or {})),
                                overwrite=overwrite)
