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


def test_solver_tables_load_and_old_flat_keys_name_the_new_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nsolver = \"gibbs\"\n[train.als]\nreg_exponent = 0.6\n"
                 "[train.gibbs]\nburn_in = 4\nwarm_start = 2\noverrelax = -0.5\n")
    cfg = load_config(p)
    assert cfg.train.als.reg_exponent == 0.6 and cfg.train.als.bias_reg_exponent == 1.0
    assert (cfg.train.gibbs.burn_in, cfg.train.gibbs.warm_start) == (4, 2)
    assert cfg.train.gibbs.overrelax == -0.5 and cfg.train.gibbs.beta0 == 2.0
    from svdfill.config import MOVED_KEYS

    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        p.write_text(f"[{section}]\n{key} = 1\n")
        with pytest.raises(ConfigError, match=rf"c\.toml.*{old} moved to {new}"):
            load_config(p)
        with pytest.raises(ConfigError, match=rf"command line: {old} moved to {new}"):
            apply_overrides(Config(), {old: 1})
    with pytest.raises(ConfigError, match=r"train\.gibbs\.overrelax is out of range"):
        apply_overrides(Config(), {"train.gibbs.overrelax": 1.0})
    with pytest.raises(ConfigError, match="unknown key 'burnin'"):
        p.write_text("[train.gibbs]\nburnin = 3\n")
        load_config(p)


def test_files_svdfill_wrote_with_old_flat_keys_are_mapped(tmp_path):
    """A run directory's config.toml (and a model's config) from before [train.gibbs]:
    read with upgrade=True, the old keys land in their tables."""
    from svdfill.config import upgrade_moved_keys

    p = tmp_path / "config.toml"
    p.write_text("[train]\nsolver = \"gibbs\"\nburn_in = 3\ngibbs_warm_start = 2\n"
                 "als_reg_exponent = 0.5\n")
    with pytest.raises(ConfigError, match="train.burn_in moved to train.gibbs.burn_in"):
        load_config(p)
    cfg = load_config(p, upgrade=True)
    assert cfg.train.gibbs.burn_in == 3 and cfg.train.gibbs.warm_start == 2
    assert cfg.train.als.reg_exponent == 0.5
    raw = {"train": {"burn_in": 7, "gibbs": {"burn_in": 9}}, "model": {"factors": 3}}
    assert upgrade_moved_keys(raw) == {"train": {"gibbs": {"burn_in": 9}}, "model": {"factors": 3}}
    assert raw["train"]["burn_in"] == 7  # the input is not modified


def test_every_field_has_a_docstring_line():
    import ast
    import inspect

    import svdfill.config as C

    tree = ast.parse(inspect.getsource(C))
    missing = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "ConfigError":
            body = node.body
            for i, st in enumerate(body):
                if isinstance(st, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                            and isinstance(nxt.value.value, str)):
                        missing.append(f"{node.name}.{st.target.id}")
    assert not missing, missing


def test_time_split_settings(tmp_path):
    from svdfill.config import parse_split_time

    cfg = apply_overrides(Config(), {"data.split": "time", "data.split_time": "2020-01-01"})
    assert cfg.data.time_col == "timestamp" and parse_split_time(cfg.data.split_time) == 1577836800
    assert parse_split_time("2020-01-01T02:00:00+02:00") == 1577836800
    assert parse_split_time(1577836800) == parse_split_time("1577836800") == 1577836800
    f = tmp_path / "t.toml"
    f.write_text('[data]\nsplit = "time"\nsplit_time = 1577836800\n')  # a TOML integer
    assert load_config(f).data.split_time == 1577836800
    with pytest.raises(ConfigError, match="data.split_time = 'soon' is neither"):
        apply_overrides(Config(), {"data.split": "time", "data.split_time": "soon"})
    with pytest.raises(ConfigError, match="set data.split = 'time'"):
        apply_overrides(Config(), {"data.split_time": "2020-01-01"})
