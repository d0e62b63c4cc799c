"""Typed run configuration, loaded from TOML.

One file per scenario lives in ``configs/``; every field has a default and a docstring
line (the string literal right under it). Unknown keys are errors that name the file
and the key, never silently ignored: a typo in a config must not train the wrong model.

CLI options override config fields through :func:`apply_overrides` with dotted keys
(``{"train.seed": 3}``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file and key."""


@dataclass
class SynthConfig:
    """Planted low-rank data, used when ``data.path`` is empty."""

    n_users: int = 2000
    """Number of users."""
    n_items: int = 500
    """Number of items."""
    n_ratings: int = 100_000
    """Number of (user, item, rating) triples; duplicates are dropped, so slightly fewer."""
    rank: int = 8
    """Rank of the planted factors."""
    noise: float = 0.5
    """Gaussian noise σ added to each rating: the RMSE floor a perfect model reaches."""
    zipf: float = 0.8
    """Exponent of the item-popularity power law (0 = uniform)."""
    user_skew: float = 0.5
    """Exponent of the user-activity power law (0 = uniform)."""
    mean: float = 3.5
    """Global mean of the planted ratings."""
    seed: int = 0
    """Seed of the generator."""


@dataclass
class DataConfig:
    """Where the ratings come from and how they are split."""

    path: str = ""
    """Ratings file (u.data, ratings.dat, ratings.csv, .csv, .parquet); empty = synthetic."""
    format: str = "auto"
    """auto | ml-100k | ml-dat | csv | plain | parquet (plain: headerless user item rating[ ts]); auto: name + first line."""
    sep: str = ""
    """Field separator for csv-like text; empty = the format's own."""
    user_col: str = "user"
    """Column of user ids (csv with header, parquet)."""
    item_col: str = "item"
    """Column of item ids (csv with header, parquet)."""
    rating_col: str = "rating"
    """Column of ratings (csv with header, parquet)."""
    scale_min: float = float("nan")
    """Lowest valid rating; NaN = take it from the format (MovieLens 1) or do not check."""
    scale_max: float = float("nan")
    """Highest valid rating; NaN = take it from the format (MovieLens 5) or do not check."""
    dedupe: str = "error"
    """Duplicate (user, item) pairs: error | last | mean."""
    split: str = "random"
    """Hold-out: random (over all ratings) | per_user (a fraction of each user's ratings) | time (each user's latest val_fraction by timestamp, ≥ 1 kept in train; or, with split_time, every rating at or after that time)."""
    val_fraction: float = 0.1
    """Fraction held out for validation (the original work used 10%); unused with split_time."""
    split_seed: int = 0
    """Seed of the hold-out split, independent of the training seed (split time: the stochastic rounding of each user's count)."""
    split_time: str | int = ""
    """split = "time" only: a global cut-off, Unix seconds or an ISO date/time ("2020-01-01", UTC unless an offset is given); "" = each user's latest val_fraction."""
    time_col: str = "timestamp"
    """Column of rating times (csv with header, parquet; headerless text: the 4th field), read only for split = "time"; Unix seconds or ISO dates; left at the default, time/ts/date/... are recognised."""
    synthetic: SynthConfig = field(default_factory=SynthConfig)
    """Generator settings used when ``path`` is empty."""


@dataclass
class ModelConfig:
    """Shape and initialization of r̂ = μ + b_u + b_i + p_u·q_i."""

    factors: int = 64
    """Latent dimension d."""
    init_std: float = 0.01
    """Std of the normal init of p and q (biases start at 0, μ at the global mean)."""


@dataclass
class ALSConfig:
    """Alternating least squares (``train.solver = "als"``; the Gibbs warm start too)."""

    reg_exponent: float = 1.0
    """A row with n ratings gets the factor penalty reg_factors·n^α (1 = per rating, as SGD)."""
    bias_reg_exponent: float = 1.0
    """Bias penalty reg_bias·n^β (0 = a fixed shrinkage, as Koren's baseline estimates)."""


@dataclass
class GibbsConfig:
    """Bayesian MF by Gibbs sampling (``train.solver = "gibbs"``)."""

    burn_in: int = 10
    """Sweeps (epochs) drawn before the posterior mean starts averaging them."""
    warm_start: int = 3
    """ALS sweeps (with reg_factors, reg_bias and ``[train.als]``) that start the chain."""
    beta0: float = 2.0
    """Normal-Wishart prior strength β₀ of the factor means."""
    w0: float = 1.0
    """Normal-Wishart scale W₀ = w₀·I of the factor precisions."""
    noise_precision: float = 0.0
    """Fixed noise precision α (1/σ²); 0 = sample it."""
    overrelax: float = -0.9
    """Over-relaxation ρ in (−1, 1) of each draw (0 = plain Gibbs; ρ < 0 anticorrelates successive draws, so their average converges in fewer sweeps)."""
    mean_rank: int = 0
    """Rank kept by the running posterior mean before export at model.factors; 0 = 2·factors."""


@dataclass
class TrainConfig:
    """Solver, optimizer and schedule."""

    solver: str = "sgd"
    """sgd (minibatch gradient steps with ``optimizer``) | als (alternating least squares) | gibbs (Bayesian MF, posterior mean by Gibbs sampling)."""
    optimizer: str = "sgd"
    """sgd | adam | adagrad | sparse_adam (gradient solvers only)."""
    kernel: str = "torch"
    """torch | fused (Triton kernels on CUDA for solver sgd with optimizer sgd, sparse_adam or adagrad; elsewhere the torch twin, with a warning)."""
    lr: float = 0.01
    """Learning rate."""
    lr_decay: float = 1.0
    """Multiply the learning rate by this after every epoch."""
    reg_factors: float = 0.05
    """L2 weight on p_u and q_i (per rating, as in Funk/Surprise SVD)."""
    reg_bias: float = 0.01
    """L2 weight on b_u and b_i."""
    weight_decay: float = 0.0
    """Optimizer weight decay on every parameter (the original recipe used 1e-5 with Adam)."""
    batch_size: int = 1024
    """Ratings per gradient step."""
    epochs: int = 50
    """Maximum epochs."""
    patience: int = 5
    """Stop after this many epochs without a better validation RMSE; 0 = never stop early."""
    min_delta: float = 0.0
    """An epoch counts as better only if it lowers validation RMSE by more than this."""
    refit: bool = False
    """After early stopping, retrain on train+validation for the best epoch count."""
    seed: int = 0
    """Seed of init and shuffling."""
    init_from: str = ""
    """Warm start: a run directory (or model.pt) whose user/item rows and biases start the users and items it knows (matched by raw id); new ones are initialized as usual; "" = cold start."""
    device: str = "cpu"
    """cpu | cuda | cuda:N."""
    checkpoint_every: int = 1
    """Write a resumable checkpoint every this many epochs."""
    metrics_sample: int = 1_000_000
    """Training ratings behind each epoch's train_* metrics: a fixed seeded sample when there are more (on a CPU all 90M of a large run cost seconds an epoch); 0 = all. The summary's train metrics use all."""
    als: ALSConfig = field(default_factory=ALSConfig)
    """ALS settings (``[train.als]``)."""
    gibbs: GibbsConfig = field(default_factory=GibbsConfig)
    """Gibbs sampler settings (``[train.gibbs]``)."""


@dataclass
class FillConfig:
    """Top-k fill of the unseen user-item pairs."""

    k: int = 100
    """Items kept per user."""
    exclude_seen: bool = True
    """Drop items the user already rated."""
    dtype: str = "float32"
    """Compute dtype of the score GEMM: float32 | tf32 | bfloat16."""
    memory_budget_mb: int = 0
    """Memory for score tiles in MiB; 0 = from free device memory."""
    user_block: int = 0
    """Users per export block (one Parquet row group); 0 = automatic."""
    device: str = "cpu"
    """cpu | cuda | cuda:N."""


@dataclass
class DistConfig:
    """Several processes: torchrun or Ray."""

    num_workers: int = 1
    """World size (Ray workers / actors)."""
    use_gpu: bool = False
    """One GPU per worker."""
    backend: str = "auto"
    """auto (nccl on GPU, gloo on CPU) | gloo | nccl."""
    max_failures: int = 1
    """Ray Train FailureConfig.max_failures: worker restarts from the last checkpoint."""
    threads_per_worker: int = 0
    """Torch intra-op threads of each Ray Train worker; 0 = the node's cores shared among its workers (Ray alone would give each 1)."""
    layout: str = "items"
    """items (each rank owns an item shard, every rank the whole user table) | grid (each rank owns one block of users and one of items, and only their ratings; solvers als, gibbs and sgd with optimizer sgd or adagrad (DSGD; Adagrad's per-row sums travel with the item blocks and it needs train.weight_decay = 0))."""


@dataclass
class Config:
    """A whole scenario: data, model, training, fill, distribution."""

    name: str = "run"
    """Human-readable name of the scenario."""
    data: DataConfig = field(default_factory=DataConfig)
    """Ratings source and split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    fill: FillConfig = field(default_factory=FillConfig)
    """Top-k fill."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distribution."""


MOVED_KEYS = {
    "train.als_reg_exponent": "train.als.reg_exponent",
    "train.als_bias_reg_exponent": "train.als.bias_reg_exponent",
    "train.burn_in": "train.gibbs.burn_in",
    "train.gibbs_warm_start": "train.gibbs.warm_start",
    "train.gibbs_beta0": "train.gibbs.beta0",
    "train.gibbs_w0": "train.gibbs.w0",
    "train.gibbs_noise_precision": "train.gibbs.noise_precision",
    "train.gibbs_overrelax": "train.gibbs.overrelax",
    "train.gibbs_mean_rank": "train.gibbs.mean_rank",
}
"""Flat keys of earlier versions → their key now. Refused in what a person writes (a TOML
file, an override: the message names the new key); mapped by :func:`upgrade_moved_keys` in
what svdfill wrote itself (a run directory's ``config.toml``, a model file's config)."""


def parse_split_time(value: str | int, where: str = "config") -> int:
    """Unix seconds of ``data.split_time``: an int (or integer text) as it is, an ISO
    date/time ("2020-01-01", "2020-01-01T12:00:00+02:00") in UTC unless it gives an offset."""
    import datetime as dt

    if isinstance(value, bool):
        raise ConfigError(f"{where}: data.split_time = {value!r}; expected Unix seconds or an ISO date")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{where}: data.split_time = {value!r} is neither Unix seconds nor an ISO "
                          "date such as '2020-01-01'") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp() // 1)


def _moved(dotted: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: {dotted} moved to {MOVED_KEYS[dotted]}")


def upgrade_moved_keys(raw: dict) -> dict:
    """A copy of a nested config dict with the :data:`MOVED_KEYS` of earlier versions put
    where they live now (a key already at its new place wins)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        node = out.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        *path, leaf = new.split(".")
        dest = out
        for part in path:
            dest[part] = dict(dest.get(part) or {})
            dest = dest[part]
        dest.setdefault(leaf, value)
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and value.lower() == "nan":
        return float("nan")
    expected = {int: int, float: float, str: str, bool: bool}.get(tp)
    if expected is None:
        return value
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, raw: dict, where: str, *, _path: tuple[str, ...] = ()) -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise :class:`ConfigError`
    (a key of :data:`MOVED_KEYS` names its new place)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = ".".join(_path + (key,))
        if dotted in MOVED_KEYS:
            raise _moved(dotted, where)
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})"
            )
        tp = hints[key]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table")
            kwargs[key] = from_dict(tp, value, f"{where}.{key}", _path=_path + (key,))
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (TOML/JSON/`torch.save(weights_only)` safe) of a config."""
    return dataclasses.asdict(cfg)


BUILTIN_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A path as given, or the name of a built-in preset (``demo`` → ``configs/demo.toml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = BUILTIN_DIR / (p.name if p.suffix == ".toml" else p.name + ".toml")
    if builtin.exists():
        return builtin
    presets = ", ".join(sorted(x.stem for x in BUILTIN_DIR.glob("*.toml")))
    raise ConfigError(f"{name_or_path}: no such config file or built-in preset (presets: {presets})")


PACKAGE_ROOT = Path(__file__).resolve().parent


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A ratings path as given (relative to the working directory), else relative to the
    repository root, so ``../shared/data/...`` in ``configs/`` works from any folder of a
    checkout. Returns the path as given when neither exists (the reader then names it)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = PACKAGE_ROOT / p
    return alt if alt.exists() else p


def load_config(path: str | os.PathLike | None = None, *, upgrade: bool = False) -> Config:
    """Load a TOML config (a path or a built-in preset name); ``None`` gives the defaults.

    Relative ``data.path`` values are kept as written; :func:`resolve_data_path` finds them.
    ``upgrade``: map the :data:`MOVED_KEYS` of earlier versions instead of refusing them
    (for a ``config.toml`` svdfill wrote into a run directory).
    """
    if path is None:
        return Config()
    p = resolve_config_path(path)
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    cfg = from_dict(Config, upgrade_moved_keys(raw) if upgrade else raw, str(p))
    validate(cfg, str(p))
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any], where: str = "command line") -> Config:
    """Return a copy of ``cfg`` with dotted-key overrides applied (None values are skipped)."""
    raw = to_dict(cfg)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in MOVED_KEYS:
            raise _moved(key, where)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"{where}: unknown setting {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        node[parts[-1]] = value
    out = from_dict(Config, raw, where)
    validate(out, where)
    return out


_CHOICES = {
    ("data", "format"): {"auto", "ml-100k", "ml-dat", "csv", "plain", "parquet"},
    ("data", "dedupe"): {"error", "last", "mean"},
    ("data", "split"): {"random", "per_user", "time"},
    ("train", "solver"): {"sgd", "als", "gibbs"},
    ("train", "optimizer"): {"sgd", "adam", "adagrad", "sparse_adam"},
    ("train", "kernel"): {"torch", "fused"},
    ("fill", "dtype"): {"float32", "tf32", "bfloat16"},
    ("dist", "backend"): {"auto", "gloo", "nccl"},
    ("dist", "layout"): {"items", "grid"},
}


def validate(cfg: Config, where: str) -> None:
    """Check value ranges and choices; raise :class:`ConfigError` naming the key."""
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{where}: {section}.{key} = {value!r}; expected one of {sorted(allowed)}")
    checks = [
        ("data.val_fraction", 0.0 <= cfg.data.val_fraction < 1.0),
        ("model.factors", cfg.model.factors >= 1),
        ("model.init_std", cfg.model.init_std >= 0),
        ("train.lr", cfg.train.lr > 0),
        ("train.batch_size", cfg.train.batch_size >= 1),
        ("train.epochs", cfg.train.epochs >= 1),
        ("train.patience", cfg.train.patience >= 0),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 1),
        ("train.metrics_sample", cfg.train.metrics_sample >= 0),
        ("train.reg_factors", cfg.train.reg_factors >= 0),
        ("train.reg_bias", cfg.train.reg_bias >= 0),
        ("train.als.reg_exponent", 0.0 <= cfg.train.als.reg_exponent <= 2.0),
        ("train.als.bias_reg_exponent", 0.0 <= cfg.train.als.bias_reg_exponent <= 2.0),
        ("train.gibbs.burn_in", cfg.train.gibbs.burn_in >= 0),
        ("train.gibbs.warm_start", cfg.train.gibbs.warm_start >= 0),
        ("train.gibbs.beta0", cfg.train.gibbs.beta0 > 0),
        ("train.gibbs.w0", cfg.train.gibbs.w0 > 0),
        ("train.gibbs.noise_precision", cfg.train.gibbs.noise_precision >= 0),
        ("train.gibbs.mean_rank", cfg.train.gibbs.mean_rank >= 0),
        ("train.gibbs.overrelax", -1.0 < cfg.train.gibbs.overrelax < 1.0),
        ("fill.k", cfg.fill.k >= 1),
        ("dist.num_workers", cfg.dist.num_workers >= 1),
        ("dist.threads_per_worker", cfg.dist.threads_per_worker >= 0),
        ("data.synthetic.n_users", cfg.data.synthetic.n_users >= 1),
        ("data.synthetic.n_items", cfg.data.synthetic.n_items >= 1),
        ("data.synthetic.n_ratings", cfg.data.synthetic.n_ratings >= 1),
    ]
    for key, ok in checks:
        if not ok:
            raise ConfigError(f"{where}: {key} is out of range")
    if cfg.data.split_time != "":
        if cfg.data.split != "time":
            raise ConfigError(f"{where}: data.split_time = {cfg.data.split_time!r} is a cut-off of "
                              f"the time split; set data.split = 'time' (it is {cfg.data.split!r})")
        parse_split_time(cfg.data.split_time, where)
    t = cfg.train
    if t.kernel == "fused" and (t.solver != "sgd"
                                or t.optimizer not in ("sgd", "sparse_adam", "adagrad")):
        what = t.solver if t.solver != "sgd" else f"optimizer {t.optimizer!r}"
        raise ConfigError(f"{where}: train.kernel = 'fused' has kernels for solver 'sgd' with "
                          f"optimizer 'sgd', 'sparse_adam' or 'adagrad', not {what}; use "
                          "kernel = 'torch'")
    if cfg.dist.layout == "grid" and t.solver == "sgd" and t.optimizer not in ("sgd", "adagrad"):
        raise ConfigError(f"{where}: dist.layout = 'grid' trains solver 'sgd' with optimizer "
                          f"'sgd' or 'adagrad' (DSGD), not {t.optimizer!r}: Adam's step counts do "
                          "not decompose into DSGD's blocks; use layout 'items'")
    if cfg.dist.layout == "grid" and t.optimizer == "adagrad" and t.weight_decay > 0:
        raise ConfigError(f"{where}: dist.layout = 'grid' with optimizer 'adagrad' needs "
                          "train.weight_decay = 0 (reg_factors / reg_bias regularize per rating)")
    if t.kernel == "fused" and t.optimizer == "adagrad" and t.weight_decay > 0:
        # torch's Adagrad decays every row every step; the fused step moves touched rows only
        raise ConfigError(f"{where}: train.kernel = 'fused' with optimizer 'adagrad' needs "
                          "train.weight_decay = 0 (reg_factors / reg_bias regularize per rating)")
