"""launch/sweep.sh: one run per value, each trained, predicted and evaluated, then one table + plot."""
import csv
import subprocess
import sys

import pytest
import yaml
from train_fixtures import REPO, SMALL_INPUTS, subprocess_env, write_toyworld

from traser_jax import config as config_lib
from traser_jax import sweep


def write_sweep(path, sweep_spec, fixed=None, base="configs/tiny.yaml"):
    path.write_text(yaml.safe_dump({"base": base, "sweep": sweep_spec, "fixed": fixed or {}}))
    return path


def test_an_unknown_key_fails_before_any_run(tmp_path, capsys):
    spec = write_sweep(tmp_path / "bad.yaml", {"tokens.window_secs": [2, 4]})
    assert sweep.main([str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "tokens.window_seconds" in capsys.readouterr().err  # the closest valid key
    assert not (tmp_path / "out").exists()
    two = write_sweep(tmp_path / "two.yaml", {"tokens.window_seconds": [2], "optim.lr_llm": [1e-3]})
    with pytest.raises(config_lib.ConfigError, match="one key"):
        sweep.load_sweep(two)


def test_missing_data_outside_the_demo_defaults_is_named(tmp_path, capsys):
    spec = write_sweep(tmp_path / "s.yaml", {"tokens.window_seconds": [2]},
                       {"data.train_dir": str(tmp_path / "nope"), "data.eval_dir": str(tmp_path / "nope2")})
    assert sweep.main([str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "data.train_dir" in err


def test_a_missing_checkpoint_outside_the_demo_tower_is_named(tmp_path, capsys):
    train = write_toyworld(tmp_path / "train", num_videos=1, seed=0)
    spec = write_sweep(tmp_path / "s.yaml", {"tokens.window_seconds": [2]},
                       {"data.train_dir": str(train), "data.eval_dir": str(train),
                        "train.init_from": str(tmp_path / "no_tower")})
    assert sweep.main([str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no_tower" in err and sweep.DEMO_VISION in err
    assert not (tmp_path / "out").exists()


def test_window_length_sweep_end_to_end(tmp_path):
    """Two window lengths on toyworld: each run trains, predicts and is evaluated; the table, CSV
    and plot list both, with every metric a fraction."""
    train = write_toyworld(tmp_path / "train", num_videos=4, seed=0)
    held_out = write_toyworld(tmp_path / "eval", num_videos=2, seed=1)
    fixed = {"data.train_dir": str(train), "data.eval_dir": str(held_out), "optim.num_steps": 2,
             "data.global_batch_size": 2, "train.checkpoint_every": 2, "train.max_new_tokens": 48}
    fixed.update(dict(o.split("=", 1) for o in SMALL_INPUTS))
    spec = write_sweep(tmp_path / "window_length.yaml", {"tokens.window_seconds": [2, 4]}, fixed)
    out = tmp_path / "sweep"
    proc = subprocess.run(["launch/sweep.sh", str(spec), "--out", str(out)], cwd=REPO,
                          env={**subprocess_env(), "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["tokens.window_seconds"] for r in rows] == ["2", "4"]
    for r in rows:
        for m in sweep.METRICS:
            assert 0.0 <= float(r[m]) <= 1.0
    for value in (2, 4):
        run = out / f"tokens.window_seconds={value}"
        assert (run / "eval.json").exists() and len((run / "predictions.jsonl").read_text().splitlines()) == 2
        assert config_lib.load(run / "config.json").tokens.window_seconds == value
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3  # header + two runs
    assert (out / "results.png").stat().st_size > 1000
