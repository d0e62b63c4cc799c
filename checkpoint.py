"""Run-directory I/O: the trained model, seen sets, resumable training state, config echo.

Layout of ``runs/NAME/`` (see ARCHITECTURE.md, "Run directory"):

- ``model.pt``: ``{"format": "svdfill-model/1", "state": {five tensors}, "idmap": IdMap
  state, "config": dict, "metrics": dict}``
- ``seen.pt``: ``{"format": "svdfill-seen/1", "train": CSR, "all": CSR}``, a CSR being
  ``{"indptr": int64 [U+1], "indices": int32 [nnz]}``
- ``checkpoint.pt``: ``{"format": "svdfill-training/1", "state": TrainingState.to_dict()}``,
  the resumable training state (:class:`TrainingState`), written by ``svdfill.train``
- ``config.toml``: the effective config, loadable again with :func:`svdfill.config.load_config`

Every file is written to a temporary name in the same folder, fsynced and renamed
(:func:`atomic_write`), so a kill at any moment leaves either the old file or the new one.
Everything loads with ``torch.load(weights_only=True)``: no pickled classes, only tensors
and plain containers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from svdfill.data.durable import fsync_dir as _fsync_dir
from svdfill.data.errors import DataError
from svdfill.kernels.model import STATE_KEYS

MODEL_FILE = "model.pt"
SEEN_FILE = "seen.pt"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
RUN_FILES = (MODEL_FILE, SEEN_FILE, CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE,
             "learning_curve.png")
"""Files svdfill writes into a run directory (``--overwrite`` removes exactly these)."""

MODEL_FORMAT = "svdfill-model/1"
SEEN_FORMAT = "svdfill-seen/1"
TRAINING_FORMAT = "svdfill-training/1"


class CheckpointError(DataError):
    """A run directory or file that is missing, corrupt or not an svdfill file.

    A subclass of :class:`~svdfill.data.errors.DataError` (hence ``ValueError``) so the CLI
    reports it as one ``svdfill: error: <path>: <problem>`` line.
    """


# -- atomic files ---------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write_fn(tmp)`` writes the whole file at ``tmp`` (a
    fresh name in the same folder), which is then fsynced and renamed over ``path``; the
    folder is fsynced too. On any error the temporary file is removed and ``path`` is left
    as it was. Returns ``path`` as a :class:`Path`.

    Example: ``atomic_write(p, lambda tmp: torch.save(obj, tmp))``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """:func:`atomic_write` of ``torch.save(obj)``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _load(path: Path, what: str) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no {what} here (missing file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated/foreign file
        raise CheckpointError(f"{path}: cannot read {what}: {type(e).__name__}: {e}") from None


def _run_dir(run_dir: str | os.PathLike, *, must_exist: bool) -> Path:
    d = Path(run_dir)
    if must_exist and not d.is_dir():
        raise CheckpointError(f"{d}: no such run directory")
    return d


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


# -- model ----------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A trained model read back from ``model.pt``.

    state: the five tensors (``user_factors`` float32 [U, d], ``item_factors`` [I, d],
    ``user_bias`` [U], ``item_bias`` [I], ``global_mean`` 0-d) on CPU; idmap: the
    :class:`~svdfill.data.idmap.IdMap`; config: the :class:`~svdfill.config.Config` it was
    trained with; metrics: the summary metrics saved with it.
    """

    state: dict[str, torch.Tensor]
    idmap: Any
    config: Any
    metrics: dict
    path: Path

    @property
    def n_users(self) -> int:
        return int(self.state["user_factors"].shape[0])

    @property
    def n_items(self) -> int:
        return int(self.state["item_factors"].shape[0])

    def to_module(self, device: str | torch.device = "cpu"):
        """A :class:`svdfill.kernels.model.BiasedMF` holding these weights on ``device``."""
        from svdfill.kernels.model import BiasedMF

        return BiasedMF.from_state(self.state, device=device)


def save_model(run_dir: str | os.PathLike, state: dict[str, torch.Tensor], idmap: Any,
               config: Any, metrics: dict) -> Path:
    """Write ``run_dir/model.pt`` atomically.

    state: the five model tensors (any device; saved on CPU). idmap: an IdMap or its
    ``to_state()`` dict. config: a Config or its plain dict. metrics: a JSON-like dict.
    """
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_model: state lacks {missing}")
    from svdfill.config import to_dict

    cfg = config if isinstance(config, dict) else to_dict(config)
    obj = {
        "format": MODEL_FORMAT,
        "state": _cpu_state({k: state[k] for k in STATE_KEYS}),
        "idmap": idmap if isinstance(idmap, dict) else idmap.to_state(),
        "config": cfg,
        "metrics": dict(metrics),
    }
    return atomic_torch_save(_run_dir(run_dir, must_exist=False) / MODEL_FILE, obj)


def _is_remote(path: str | os.PathLike) -> bool:
    from svdfill.data.sources import is_uri

    s = os.fspath(path)
    return is_uri(s) and not s.lower().startswith("file://")


def _fetch_remote_run(uri: str) -> Path:
    """The files of a run on an object store that the commands reading a model use (the
    model, the seen sets, the config echo, the summary), copied to a local cache folder."""
    from svdfill.data.errors import DataError
    from svdfill.data.sources import fetch_run

    try:
        return fetch_run(uri, (MODEL_FILE, SEEN_FILE, CONFIG_FILE, SUMMARY_FILE), required=MODEL_FILE)
    except DataError as e:
        raise CheckpointError(str(e)) from None


def load_model(run_dir: str | os.PathLike) -> LoadedModel:
    """Read ``run_dir/model.pt`` (or a path to a ``model.pt`` file itself). A URI
    (``s3://bucket/runs/x``, ``gs://…``) is read through ``pyarrow.fs`` into a local cache
    (``$SVDFILL_CACHE``), so every command that takes ``--model`` reads a run from a store.

    Raises :class:`CheckpointError` naming the path when the directory or file is missing,
    unreadable, or not a consistent svdfill model.
    """
    if _is_remote(run_dir):  # s3://…/run or …/run/model.pt: the run's files, cached locally
        run_dir = _fetch_remote_run(os.fspath(run_dir))
    p = Path(run_dir)
    path = p if p.is_file() else _run_dir(p, must_exist=True) / MODEL_FILE
    if not path.exists() and (p / "grid_model" / "layout.json").is_file():
        raise CheckpointError(
            f"{p}: a grid-layout run ([dist] layout = 'grid'): its model is split into per-rank "
            "blocks in grid_model/, with no model.pt; this command reads model.pt only (the grid "
            "model is read block by block by svdfill.distributed.grid_checkpoint)")
    obj = _load(path, "svdfill model")
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not an svdfill model (format "
                              f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r})")
    for key in ("state", "idmap", "config", "metrics"):
        if key not in obj:
            raise CheckpointError(f"{path}: model file lacks {key!r}")
    state = obj["state"]
    _check_state(state, path)
    from svdfill.config import ConfigError, Config, from_dict, upgrade_moved_keys
    from svdfill.data.idmap import IdMap

    try:
        idmap = IdMap.from_state(obj["idmap"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad id map: {e}") from None
    if (idmap.n_users, idmap.n_items) != (state["user_factors"].shape[0], state["item_factors"].shape[0]):
        raise CheckpointError(
            f"{path}: id map has {idmap.n_users} users × {idmap.n_items} items but the tables "
            f"are {tuple(state['user_factors'].shape)} and {tuple(state['item_factors'].shape)}")
    try:
        # svdfill wrote this config: keys an earlier version kept elsewhere are mapped
        config = from_dict(Config, upgrade_moved_keys(obj["config"]), f"{path} [config]")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return LoadedModel(state=state, idmap=idmap, config=config, metrics=dict(obj["metrics"]),
                       path=path)


def _check_state(state: Any, path: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: model state is not a dict")
    missing = [k for k in STATE_KEYS if k not in state or not isinstance(state[k], torch.Tensor)]
    if missing:
        raise CheckpointError(f"{path}: model state lacks tensors {missing}")
    P, Q, bu, bi, mu = (state[k] for k in STATE_KEYS)
    ok = (P.dim() == 2 and Q.dim() == 2 and P.shape[1] == Q.shape[1] and bu.shape == (P.shape[0],)
          and bi.shape == (Q.shape[0],) and mu.dim() == 0)
    if not ok:
        raise CheckpointError(
            f"{path}: inconsistent model shapes: user_factors {tuple(P.shape)}, item_factors "
            f"{tuple(Q.shape)}, user_bias {tuple(bu.shape)}, item_bias {tuple(bi.shape)}, "
            f"global_mean {tuple(mu.shape)}")


# -- seen sets ------------------------------------------------------------------------------

def _csr_state(csr: Any, name: str) -> dict[str, torch.Tensor]:
    indptr, indices = csr
    indptr = torch.as_tensor(indptr).to("cpu", torch.int64).contiguous()
    indices = torch.as_tensor(indices).to("cpu", torch.int32).contiguous()
    if indptr.dim() != 1 or indices.dim() != 1 or int(indptr[-1]) != indices.numel():
        raise ValueError(f"save_seen: {name} is not a CSR (indptr [U+1], indices [nnz])")
    return {"indptr": indptr, "indices": indices}


def save_seen(run_dir: str | os.PathLike, train_csr: Any, all_csr: Any) -> Path:
    """Write ``run_dir/seen.pt``: ``train_csr`` = pairs the model was trained on,
    ``all_csr`` = every rated pair of the input (what the export fill excludes). Each is
    ``(indptr int64 [U+1], indices int32 [nnz])`` (tensors or numpy arrays)."""
    obj = {"format": SEEN_FORMAT, "train": _csr_state(train_csr, "train"),
           "all": _csr_state(all_csr, "all")}
    return atomic_torch_save(_run_dir(run_dir, must_exist=False) / SEEN_FILE, obj)


def load_seen(run_dir: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (indptr, indices), "all": (indptr, indices)}`` from ``run_dir/seen.pt``
    (indptr int64 [U+1], indices int32 [nnz], CPU)."""
    path = _run_dir(run_dir, must_exist=True) / SEEN_FILE
    obj = _load(path, "seen sets")
    if not isinstance(obj, dict) or obj.get("format") != SEEN_FORMAT:
        raise CheckpointError(f"{path}: not an svdfill seen-set file")
    out = {}
    for key in ("train", "all"):
        c = obj.get(key)
        if not isinstance(c, dict) or "indptr" not in c or "indices" not in c:
            raise CheckpointError(f"{path}: lacks the {key!r} CSR")
        out[key] = (c["indptr"], c["indices"])
    return out


# -- resumable training state ---------------------------------------------------------------

@dataclass
class BestEpoch:
    """The best epoch so far of a selection phase.

    epoch: 1-based. metrics: its validation ``{"mse", "rmse", "mae"}``. state: its five
    model tensors (full item tables in a checkpoint, the rank's shard in memory), or
    ``None`` when there is no validation set to pick by.
    """

    epoch: int
    metrics: dict[str, float]
    state: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "metrics": self.metrics, "state": self.state}

    @classmethod
    def from_dict(cls, d: dict) -> "BestEpoch":
        return cls(epoch=d["epoch"], metrics=d["metrics"], state=d.get("state"))


@dataclass
class TrainingState:
    """What ``checkpoint.pt`` holds: everything a resumed run needs to continue as if it
    had never stopped, with full item tables (any world size can resume it).

    phase: ``"select"`` or ``"refit"``; epoch: the last epoch done (1-based).
    model: the five model tensors (float32 ``user_factors`` [U, d], ``item_factors`` [I, d],
    ``user_bias`` [U], ``item_bias`` [I], 0-d ``global_mean``).
    optimizer: the optimizer state by parameter name (``{"item_factors": {"exp_avg": …}}``;
    empty without an optimizer). solver: the solver's own tensors (the Gibbs chain) or None.
    best: the best epoch so far; bad_epochs: epochs since it (early stopping); seconds:
    training time so far; history: the ``metrics.jsonl`` rows so far; rng: how shuffles are
    seeded (no generator state is carried: every epoch reseeds); world_size: of the writer.
    extra: more plain entries kept at the top level of the file (``config``, ``idmap``,
    ``select`` during a refit).
    """

    phase: str
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, Any]]
    solver: dict[str, torch.Tensor] | None
    best: BestEpoch | None
    bad_epochs: int
    seconds: float
    history: list[dict]
    rng: dict[str, Any]
    world_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("phase", "epoch", "model", "optimizer", "solver", "best", "bad_epochs",
               "seconds", "history", "rng", "world_size")

    def to_dict(self) -> dict:
        """The plain dict stored in the file (tensors, numbers, str, lists, dicts only)."""
        out = {k: getattr(self, k) for k in self._FIELDS}
        out["best"] = self.best.to_dict() if self.best is not None else None
        out["history"] = [dict(r) for r in self.history]
        clash = set(self.extra) & set(out)
        if clash:
            raise ValueError(f"TrainingState.extra repeats the fields {sorted(clash)}")
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict, where: str = "checkpoint") -> "TrainingState":
        missing = [k for k in ("phase", "epoch", "model", "bad_epochs", "seconds", "history")
                   if k not in d]
        if missing:
            raise CheckpointError(f"{where}: training state lacks {missing}")
        best = d.get("best")
        return cls(phase=d["phase"], epoch=int(d["epoch"]), model=d["model"],
                   optimizer=d.get("optimizer") or {}, solver=d.get("solver"),
                   best=BestEpoch.from_dict(best) if best is not None else None,
                   bad_epochs=int(d["bad_epochs"]), seconds=float(d["seconds"]),
                   history=list(d["history"]), rng=d.get("rng") or {},
                   world_size=int(d.get("world_size", 1)),
                   extra={k: v for k, v in d.items() if k not in cls._FIELDS})


def save_training_state(run_dir: str | os.PathLike, state: TrainingState) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (tensors saved on CPU)."""
    obj = {"format": TRAINING_FORMAT, "state": _to_cpu_tree(state.to_dict())}
    return atomic_torch_save(_run_dir(run_dir, must_exist=False) / CHECKPOINT_FILE, obj)


def load_training_state(run_dir: str | os.PathLike) -> TrainingState | None:
    """The state given to :func:`save_training_state`, or ``None`` when the run directory
    has no ``checkpoint.pt``. A corrupt or foreign file raises :class:`CheckpointError`."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    obj = _load(path, "training checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != TRAINING_FORMAT or "state" not in obj:
        raise CheckpointError(f"{path}: not an svdfill training checkpoint")
    if not isinstance(obj["state"], dict):
        raise CheckpointError(f"{path}: training state is not a dict")
    return TrainingState.from_dict(obj["state"], str(path))


def _to_cpu_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").clone() if x.device.type != "cpu" else x.detach().clone()
    if isinstance(x, dict):
        return {k: _to_cpu_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_cpu_tree(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_to_cpu_tree(v) for v in x)
    return x


# -- small text files -----------------------------------------------------------------------

def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic pretty JSON (NaN/inf written as null: strict JSON readers accept it)."""
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def save_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Atomic JSON-lines file, one object per row (rewritten whole: a resumed run's
    metrics file never holds lines of epochs it rolled back)."""
    return atomic_write_text(path, "".join(json.dumps(_json_safe(r)) + "\n" for r in rows))


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def save_config_echo(run_dir: str | os.PathLike, config: Any) -> Path:
    """Write ``run_dir/config.toml``: the effective config (a Config or its dict) as TOML
    that :func:`svdfill.config.load_config` reads back to an equal Config."""
    from svdfill.config import to_dict

    cfg = config if isinstance(config, dict) else to_dict(config)
    return atomic_write_text(Path(run_dir) / CONFIG_FILE, to_toml(cfg))


def to_toml(d: dict) -> str:
    """TOML text of a nested dict of str/int/float/bool values (tables for sub-dicts)."""
    lines: list[str] = []
    _toml_table(d, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_table(d: dict, prefix: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append("")
        lines.append("[" + ".".join(prefix) + "]")
    for k, v in scalars.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables.items():
        _toml_table(v, prefix + [k], lines)
