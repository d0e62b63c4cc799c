"""Spark MLlib ALS as a measured peer: `svdfill bench accuracy --peer spark` (ALS fit and
test RMSE on the same triples) and `svdfill bench fill --peer spark`
(``ALSModel.recommendForAllUsers`` on the same factor matrices, written to Parquet).

A local Spark (``local[N]``, all traffic on 127.0.0.1, no UI, its scratch space in a
temporary folder removed afterwards) is started per bench run; the JVM start is reported
apart and never timed. Needs ``pyspark`` (``pip install 'svdfill[bench]'``) and a Java 17+
runtime on PATH or in ``JAVA_HOME``; data crosses to Spark as Arrow tables (Spark ≥ 4.0).

The fill peer loads the factors through Spark's own model format (``metadata`` JSON plus
``userFactors``/``itemFactors`` Parquet with ``id int, features array<float>``, what
``ALSModel.save`` writes), so Spark scores exactly the matrices svdfill scores. Spark has no
biases and no seen-item filter: the biases are folded in as ``[p_u, 1]·[q_i, b_i]`` (the
same ranking as ``μ + b_u + b_i + p_u·q_i``), and the comparison is with ``fill_topk``
without seen exclusion. The folder writer is :func:`svdfill.data.factors.save_als_model`,
shared with ``svdfill export-factors --format spark`` (which folds μ too, to predict).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from svdfill.data.factors import save_als_model  # Spark's model folder (also export-factors --format spark)


def spark_available() -> str | None:
    """None when pyspark imports and a Java runtime is found, else why not."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark not installed (pip install 'svdfill[bench]')"
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") is None and not (java_home and Path(java_home, "bin", "java").exists()):
        return "no Java runtime (java on PATH or JAVA_HOME) for Spark"
    return None


@contextlib.contextmanager
def local_spark(threads: int | None = None, memory: str = "8g") -> Iterator[Any]:
    """A local SparkSession on loopback with ``threads`` cores (default: all), stopped and
    its scratch folder removed on exit. Yields the session; ``session.start_seconds`` is
    the JVM start-up time."""
    from pyspark.sql import SparkSession

    cores = threads or os.cpu_count() or 1
    scratch = tempfile.mkdtemp(prefix="svdfill-spark-")
    saved = {k: os.environ.get(k) for k in ("SPARK_LOCAL_IP", "PYSPARK_PYTHON")}
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # the driver binds and advertises loopback only
    os.environ["PYSPARK_PYTHON"] = sys.executable  # Python workers from this interpreter
    t0 = time.perf_counter()
    spark = None
    try:
        spark = (SparkSession.builder
                 .master(f"local[{cores}]")
                 .appName("svdfill-bench-peer")
                 .config("spark.driver.memory", memory)
                 .config("spark.driver.host", "127.0.0.1")
                 .config("spark.driver.bindAddress", "127.0.0.1")
                 .config("spark.ui.enabled", "false")
                 .config("spark.ui.showConsoleProgress", "false")
                 .config("spark.local.dir", scratch)
                 .config("spark.sql.warehouse.dir", os.path.join(scratch, "warehouse"))
                 .config("spark.sql.shuffle.partitions", str(2 * cores))
                 .getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        spark.start_seconds = time.perf_counter() - t0
        yield spark
    finally:
        if spark is not None:
            spark.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(scratch, ignore_errors=True)


def _ratings_frame(spark: Any, users: np.ndarray, items: np.ndarray, ratings: np.ndarray | None = None):
    """A Spark DataFrame (row, user, item[, rating]) made from Arrow (Spark ≥ 4: no pandas)."""
    import pyarrow as pa

    cols = {"row": np.arange(users.size, dtype=np.int64), "user": users.astype(np.int32),
            "item": items.astype(np.int32)}
    if ratings is not None:
        cols["rating"] = ratings.astype(np.float32)
    return spark.createDataFrame(pa.table(cols))


def fit_als(spark: Any, train: Any, test: Any, lo: float, hi: float, *, rank: int = 10,
            max_iter: int = 10, reg: float = 0.1, seed: int = 0) -> dict:
    """Spark ``ALS(rank, maxIter, regParam, seed)`` (explicit ratings) fit on ``train``'s
    triples and scored on ``test``'s: ``{"predictions" float64 [n_test], "fit_seconds",
    "cold"}``. Test pairs whose user or item Spark never saw (NaN from Spark) get the
    training mean, as Surprise predicts for unknowns; predictions clipped to [lo, hi]."""
    from pyspark.ml.recommendation import ALS

    tr_u, tr_i = train.users.cpu().numpy(), train.items.cpu().numpy()
    tr_r = train.ratings.cpu().numpy()
    df = _ratings_frame(spark, tr_u, tr_i, tr_r).drop("row").cache()
    df.count()  # materialize the cached input so the fit time is the fit's
    als = ALS(rank=rank, maxIter=max_iter, regParam=reg, seed=seed, userCol="user", itemCol="item",
              ratingCol="rating", coldStartStrategy="nan", nonnegative=False)
    t0 = time.perf_counter()
    model = als.fit(df)
    model.userFactors.count()  # ALS.fit is eager, but make sure the factors exist
    seconds = time.perf_counter() - t0
    te = _ratings_frame(spark, test.users.cpu().numpy(), test.items.cpu().numpy())
    out = model.transform(te).select("row", "prediction").toArrow().sort_by("row")
    pred = out.column("prediction").to_numpy().astype(np.float64)
    if pred.size != len(test):
        raise RuntimeError(f"Spark ALS returned {pred.size} predictions for {len(test)} test pairs")
    cold = ~np.isfinite(pred)
    pred[cold] = float(np.mean(tr_r, dtype=np.float64))
    df.unpersist()
    return {"predictions": np.clip(pred, lo, hi), "fit_seconds": seconds, "cold": int(cold.sum())}


def recommend_all(spark: Any, state: dict, k: int) -> dict:
    """Spark's ``recommendForAllUsers(k)`` of the biased model ``state`` (the five tensors),
    written to Parquet as a Spark job would: ``{"seconds", "items" int64 [U, k]}``.
    Timed: loading the model and computing + writing the recommendations."""
    import pyarrow.parquet as pq
    from pyspark.ml.recommendation import ALSModel

    P = state["user_factors"].cpu().float().numpy()
    Q = state["item_factors"].cpu().float().numpy()
    U = P.shape[0]
    aug_p = np.hstack([P, np.ones((U, 1), np.float32)])
    aug_q = np.hstack([Q, state["item_bias"].cpu().float().numpy()[:, None]])
    work = tempfile.mkdtemp(prefix="svdfill-spark-fill-")
    try:
        save_als_model(os.path.join(work, "model"), aug_p, aug_q, spark.version)
        t0 = time.perf_counter()
        model = ALSModel.load(os.path.join(work, "model"))
        model.recommendForAllUsers(k).write.parquet(os.path.join(work, "recs"))
        seconds = time.perf_counter() - t0
        table = pq.read_table(os.path.join(work, "recs")).sort_by("user")
        if table.num_rows != U:
            raise RuntimeError(f"Spark recommended for {table.num_rows} of {U} users")
        recs = table.column("recommendations").combine_chunks()
        items = recs.flatten().field("item").to_numpy(zero_copy_only=False).astype(np.int64)
        return {"seconds": seconds, "items": items.reshape(U, k)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
