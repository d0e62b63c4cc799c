"""A newcomer's own file (issue 20): `svdfill train --ratings FILE` with no config, what is
detected and printed, the file-reading options, and every option an error suggests exists."""

from __future__ import annotations

import argparse
import ast
import builtins
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svdfill.config import load_config
from svdfill.data.errors import DataError
from svdfill.data.readers import detect_layout, read_ratings
from svdfill.launch import cmd_train
from svdfill.launch.cli import build_parser, main as cli_main
from svdfill.launch.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _movielens_csv(path: Path, n_users: int = 60, n_items: int = 40) -> Path:
    """A MovieLens-latest-style ratings.csv: header, CRLF line ends, half stars."""
    import random

    rng = random.Random(0)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(1, n_users + 1):
        for i in rng.sample(range(1, n_items + 1), 15):
            lines.append(f"{u},{i * 10},{rng.choice([0.5, 1, 2.5, 3, 3.5, 4, 4.5, 5])},{964982703 + u}")
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def test_detects_a_movielens_csv_with_crlf(tmp_path):
    d = detect_layout(_movielens_csv(tmp_path / "ratings.csv"))
    assert (d.format, d.sep, d.header, d.crlf) == ("csv", ",", True, True)
    assert d.columns == ("userId", "movieId", "rating")
    assert d.scale == (0.5, 5.0)
    assert "comma-separated, header row, CRLF line ends; user='userId'" in d.describe()


def test_detects_headerless_space_separated(tmp_path):
    p = tmp_path / "ratings.txt"
    p.write_text("1 10 3.5\n2 10 4\n")
    d = detect_layout(p)
    assert (d.format, d.sep, d.header, d.crlf, d.scale) == ("plain", " ", False, False, None)
    assert "fields 1, 2, 3" in d.describe()


@pytest.mark.parametrize("header,cols", [
    ("user_id;item_id;score", ("user_id", "item_id", "score")),
    ("reviewerID|asin|overall", ("reviewerID", "asin", "overall")),
    ("UserId\tProductId\tRating", ("UserId", "ProductId", "Rating")),
])
def test_common_column_names_are_recognized(tmp_path, header, cols):
    sep = next(s for s in (";", "|", "\t") if s in header)
    p = tmp_path / "r.csv"
    p.write_text(header + "\n" + sep.join(["a", "b", "4"]) + "\n" + sep.join(["c", "b", "2"]) + "\n")
    assert detect_layout(p).columns == cols
    raw = read_ratings(p)
    assert list(raw.users) == ["a", "c"] and list(raw.ratings) == [4.0, 2.0]


def test_parquet_columns_are_recognized_too(tmp_path):
    p = tmp_path / "r.parquet"
    pq.write_table(pa.table({"userId": [1, 2], "movieId": [5, 6], "rating": [3.5, 4.0]}), p)
    raw = read_ratings(p)
    assert list(raw.users) == [1, 2] and list(raw.items) == [5, 6]
    assert detect_layout(p).columns == ("userId", "movieId", "rating")
    with pytest.raises(DataError, match=r"missing user column 'uid'.*data.user_col \(--user-col\)"):
        read_ratings(p, user_col="uid")  # a name the user chose is taken literally


def test_train_without_config_detects_and_trains(tmp_path, capsys):
    csv = _movielens_csv(tmp_path / "ratings.csv")
    assert cli_main(["train", "--ratings", str(csv), "--out", str(tmp_path / "x"), "--epochs", "4"]) == 0
    out = capsys.readouterr().out
    assert "detected " in out and "csv text, comma-separated, header row, CRLF line ends" in out
    assert "scale 0.5–5 (the format's)" in out
    cfg = load_config(tmp_path / "x" / "config.toml", upgrade=True)
    assert cfg.name == "default" and cfg.train.solver == "gibbs"


def test_scale_from_the_data_is_printed(tmp_path, capsys):
    p = tmp_path / "r.tsv"
    p.write_text("user\titem\tscore\n" + "".join(f"u{u}\ti{i}\t{(u + i) % 7 + 1}\n"
                                                  for u in range(30) for i in range(0, 20, 2)))
    assert cli_main(["train", "--ratings", str(p), "--out", str(tmp_path / "x"), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "tab-separated, header row; user='user', item='item', rating='score'" in out
    assert "scale 1–7 taken from the data" in out


def test_data_options_override_the_config(tmp_path):
    p = argparse.ArgumentParser()
    cmd_train.add_arguments(p)
    args = p.parse_args(["--ratings", "r.txt", "--out", "o", "--format", "csv", "--sep", "tab",
                         "--user-col", "u", "--item-col", "i", "--rating-col", "r", "--scale", "0.5:4"])
    cfg = cmd_train.train_config(args)
    d = cfg.data
    assert (d.format, d.sep, d.user_col, d.item_col, d.rating_col) == ("csv", "\t", "u", "i", "r")
    assert (d.scale_min, d.scale_max) == (0.5, 4.0)
    assert cfg.name == "default"
    assert cmd_train.train_config(p.parse_args(["--config", "ml-100k", "--out", "o"])).name == "ml-100k"


@pytest.mark.parametrize("bad", ["5", "a:b", "5:1", ":4", "1:inf"])
def test_bad_scale_is_one_clear_error(bad):
    with pytest.raises(UserError, match=r"--scale .*expected MIN:MAX"):
        cmd_train.parse_scale(bad)


def test_no_config_and_no_ratings_is_refused(tmp_path, capsys):
    assert cli_main(["train", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert "give --ratings FILE" in err and not (tmp_path / "x").exists()


def test_scale_outside_is_an_error_naming_the_option(tmp_path, capsys):
    p = tmp_path / "r.txt"
    p.write_text("1 10 3.5\n2 10 9\n")
    rc = cli_main(["train", "--ratings", str(p), "--scale", "0.5:4", "--out", str(tmp_path / "x")])
    assert rc != 0 and "(--scale MIN:MAX)" in capsys.readouterr().err


def test_default_recipe_is_a_valid_preset():
    cfg = load_config("default")
    assert cfg.data.path == "" and cfg.data.format == "auto" and cfg.train.patience == 0


def test_run_without_config_uses_the_general_recipe_for_a_file(tmp_path):
    from svdfill.launch import cmd_run

    p = argparse.ArgumentParser()
    cmd_run.add_arguments(p)
    args = p.parse_args(["--ratings", "x.csv", "--sep", ";"])
    assert args.config is None and args.sep == ";"


# -- every option an error message suggests exists -------------------------------------------

_ERRORS = {"DataError", "ConfigError", "UserError"}
_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


_ROLES = ("user", "item", "rating")  # what ``{role}`` stands for in the readers' loops


def _text(node) -> str | None:
    """A string constant's text, or an f-string's with each ``{expr}`` kept as written."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    return None


def _suggestions():
    """(file:line, --option) for every option named in a message: a string inside a call of
    DataError/ConfigError/UserError, or a "(--option)" hint built beside one. ``--{role}-col``
    stands for --user-col, --item-col and --rating-col."""
    for py in sorted(ROOT.rglob("*.py")):
        rel = py.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or rel.parts[0].startswith("."):
            continue
        tree = ast.parse(py.read_text(), str(py))
        texts = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in _ERRORS:
                for sub in ast.walk(node):
                    if (t := _text(sub)) is not None:
                        texts[id(sub)] = (sub.lineno, t)
            elif (t := _text(node)) is not None and "(--" in t:
                texts[id(node)] = (node.lineno, t)
        for lineno, t in texts.values():
            for text in ([t.replace("{role}", r) for r in _ROLES] if "--{role}" in t else [t]):
                for m in _OPTION.finditer(text):
                    yield f"{rel}:{lineno}", "--" + m.group(1)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out


def _all_parsers():
    from svdfill.launch import ray_job, torchrun_fill, torchrun_train

    return [build_parser(), torchrun_train.build_parser(), torchrun_fill.build_parser(),
            ray_job.build_parser()]


def test_every_suggested_option_exists():
    known = set().union(*(_options(p) for p in _all_parsers()))
    found = list(_suggestions())
    assert any(opt == "--sep" for _, opt in found)  # the walk does see the readers' messages
    missing = sorted({f"{where}: {opt}" for where, opt in found if opt not in known})
    assert not missing, "options suggested by error messages that no parser accepts:\n" + "\n".join(missing)


def test_options_the_readers_suggest_exist_where_ratings_are_read():
    """A reading error can come from train, run or eval (and the torchrun/Ray trainers): each
    must accept every option the readers' messages suggest."""
    from svdfill.launch import ray_job, torchrun_train

    data_opts = {opt for where, opt in _suggestions() if where.startswith("data")}
    assert {"--sep", "--format", "--scale", "--dedupe", "--user-col"} <= data_opts
    cli = {name: sub for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
           for name, sub in a.choices.items()}
    ray_train = next(sub for a in ray_job.build_parser()._actions
                     if isinstance(a, argparse._SubParsersAction) for n, sub in a.choices.items()
                     if n == "train")
    reading = {"--sep", "--format", "--scale", "--dedupe", "--user-col", "--item-col", "--rating-col"}
    for name, parser in [("train", cli["train"]), ("run", cli["run"]), ("eval", cli["eval"]),
                         ("torchrun_train", torchrun_train.build_parser()), ("ray_job train", ray_train)]:
        assert (data_opts & reading) <= _options(parser), name


# -- Ray Train workers print each line once --------------------------------------------------

def test_worker_log_bypasses_a_patched_print(monkeypatch, capsys):
    from svdfill.distributed.ray_train import worker_log

    calls = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: calls.append(a))  # Ray Train v2's patch
    worker_log("wall time: data 0.1 s")
    assert calls == [] and capsys.readouterr().out == "wall time: data 0.1 s\n"


# -- the accuracy bench names the data it ran on ---------------------------------------------

def test_bench_accuracy_title_names_the_config_data(tmp_path):
    from svdfill.bench import accuracy as ba

    cfg_path = tmp_path / "my.toml"
    cfg_path.write_text('name = "mine"\n[data]\npath = "/data/filmtrust/ratings.txt"\n')
    p = argparse.ArgumentParser()
    ba.add_arguments(p)
    _, _, label = ba._configs(p.parse_args(["--config", str(cfg_path)]))
    assert label == "filmtrust/ratings.txt"
    _, _, label = ba._configs(p.parse_args([]))
    assert label == "ml-100k"
