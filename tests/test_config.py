"""svdfill.config: presets, unknown keys, types, overrides, validation, data paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from svdfill.config import (BUILTIN_DIR, Config, ConfigError, apply_overrides, load_config,
                            resolve_config_path, resolve_data_path, to_dict)


def test_defaults_and_builtin_presets_load():
    cfg = load_config(None)
    assert cfg == Config() or repr(cfg) == repr(Config())
    assert math.isnan(cfg.data.scale_min)
    names = sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))
    assert "demo" in names
    for name in names:
        c = load_config(name)  # by preset name
        assert isinstance(c, Config)
        assert repr(load_config(BUILTIN_DIR / f"{name}.toml")) == repr(c)
    assert load_config("demo").data.path == ""  # synthetic
    assert resolve_config_path("demo.toml") == BUILTIN_DIR / "demo.toml"


def test_unknown_keys_and_bad_types_are_errors_naming_file_and_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlr = 0.1\nlearnin_rate = 3\n")
    with pytest.raises(ConfigError, match=r"c\.toml.*learnin_rate"):
        load_config(p)
    p.write_text("[trian]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(p)
    p.write_text('[train]\nepochs = "ten"\n')
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        load_config(p)
    p.write_text("[train]\nepochs = true\n")
    with pytest.raises(ConfigError, match="expected int"):
        load_config(p)
    p.write_text("[train\nlr=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    p.write_text("[train]\noptimizer = \"rmsprop\"\n")
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(p)
    p.write_text("[train]\nlr = -1\n")
    with pytest.raises(ConfigError, match="train.lr is out of range"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config file or built-in preset"):
        load_config(tmp_path / "missing.toml")


def test_ints_become_floats_and_nan_is_accepted(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlr = 1\n[data]\nscale_min = nan\nscale_max = 5\n")
    cfg = load_config(p)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert math.isnan(cfg.data.scale_min) and cfg.data.scale_max == 5.0


def test_overrides_apply_dotted_keys_and_skip_none():
    cfg = apply_overrides(Config(), {"train.seed": 4, "data.path": None, "data.synthetic.rank": 3})
    assert cfg.train.seed == 4 and cfg.data.path == "" and cfg.data.synthetic.rank == 3
    assert Config().train.seed == 0  # the input is not modified
    with pytest.raises(ConfigError, match="unknown setting 'train.sed'"):
        apply_overrides(Config(), {"train.sed": 1})
    with pytest.raises(ConfigError, match="unknown setting"):
        apply_overrides(Config(), {"nope.x": 1})
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(Config(), {"train.epochs": "3"})
    assert to_dict(cfg)["train"]["seed"] == 4


def test_resolve_data_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.csv").write_text("x")
    assert resolve_data_path("here.csv") == Path("here.csv")
    repo_rel = resolve_data_path("configs/demo.toml")
    assert repo_rel.exists() and repo_rel.is_absolute()
    assert resolve_data_path("no/such.csv") == Path("no/such.csv")
