"""Training runs as users start them (`python -m traser_jax.train configs/tiny.yaml key=value ...`),
each in a process of its own, on 8 small toyworld videos:

- an uninterrupted run logs metrics.jsonl and TensorBoard events, and its checkpoints show the frozen
  vision tower untouched and without optimizer state while the merger trains;
- a run killed with SIGKILL after a checkpoint and started again logs the same losses, on the very
  same batches, as the uninterrupted run (also on cached tower tokens, data.cache_vision_tokens);
- a run whose loss turns non-finite stops naming the step, exits non-zero, and keeps the last good
  checkpoint (no checkpoint of the bad step).

The runs share a persistent compilation cache, so only the first compiles the step.
"""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from train_fixtures import (read_metrics, run_train, subprocess_env, train_command, train_overrides,
                            write_toyworld, REPO)

NUM_STEPS = 8
CHECKPOINT_EVERY = 3
RUN_ARGS = [f"optim.num_steps={NUM_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "data.global_batch_size=2", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_runs")
    return root, write_toyworld(root / "data"), subprocess_env(compile_cache=root / "jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    root, data, env = workspace
    run_dir = root / "uninterrupted"
    proc = run_train(train_overrides(data, run_dir, *RUN_ARGS), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def restore(run_dir: Path, step: int) -> dict:
    """The saved state of a run at `step`, restored in this process (one CPU device)."""
    import orbax.checkpoint as ocp

    from traser_jax import config as config_lib
    from traser_jax.train import Trainer, checkpoint_manager

    cfg = config_lib.load(run_dir / "config.json")
    mngr = checkpoint_manager(cfg)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
        Trainer(cfg).abstract_state())))
    mngr.close()
    return restored["state"]


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the run's TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    from data_gen.shards.tfrecord_io import read_record_at, record_offsets

    scalars: dict[str, dict[int, float]] = {}
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {run_dir / 'tensorboard'}"
    for path in files:
        with open(path, "rb") as f:
            for offset in record_offsets(path):
                event = Event.FromString(read_record_at(f, offset))
                for value in event.summary.value:
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_run_logs_metrics_jsonl_and_tensorboard(uninterrupted):
    metrics = read_metrics(uninterrupted)
    assert [m["step"] for m in metrics] == list(range(1, NUM_STEPS + 1))
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["loss"] > 0 and m["tokens"] > 0 and m["step_time"] > 0
    # Different batches every step: what makes the resume check below meaningful.
    assert len({m["batch_crc"] for m in metrics[:4]}) == 4, [m["batch_crc"] for m in metrics]
    scalars = tensorboard_scalars(uninterrupted)
    assert {"train/loss", "train/grad_norm", "train/tokens_per_s", "train/lr_llm"} <= set(scalars)
    np.testing.assert_allclose([scalars["train/loss"][m["step"]] for m in metrics], [m["loss"] for m in metrics],
                               rtol=1e-6)
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir()) == [3, 6, 8]


def test_frozen_vision_tower_has_no_optimizer_state_and_does_not_move(uninterrupted):
    """Between the checkpoints at steps 3 and 6 (three updates at non-zero learning rates)."""
    before, after = restore(uninterrupted, 3), restore(uninterrupted, 6)
    frozen = traverse_util.flatten_dict(before["frozen"])
    assert frozen and all(p[0] == "vision" and "merger" not in p for p in frozen), sorted(frozen)
    trainable = traverse_util.flatten_dict(before["params"])
    assert not any(p[0] == "vision" and "merger" not in p for p in trainable)
    assert any("merger" in p for p in trainable)
    opt_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(before["opt_state"])]
    assert not any("'vision'" in p and "merger" not in p for p in opt_paths), opt_paths
    assert any("'merger'" in p for p in opt_paths)
    for path, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(traverse_util.flatten_dict(after["frozen"])[path]),
                                      err_msg=str(path))
    after_trainable = traverse_util.flatten_dict(after["params"])
    for group in ("merger", "otr_resampler", "twr_resampler", "llm"):
        moved = [p for p in trainable if group in p and not np.array_equal(trainable[p], after_trainable[p])]
        assert moved, f"no {group} parameter changed between steps 3 and 6"
    assert all(np.asarray(v).dtype == np.float32 for v in trainable.values())  # fp32 master weights
    assert int(before["step"]) == 3 and int(after["step"]) == 6


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    committed = run_dir / "checkpoints" / str(step)  # orbax renames the finished save to its step
    deadline = time.monotonic() + timeout
    while not committed.is_dir():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before checkpoint {step}"
        assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.01)


# The tower and merger frozen, their output tokens computed once per video in the training process.
CACHED = ["data.cache_in_memory=true", "optim.lr_vision=0", "optim.lr_merger=0", "data.cache_vision_tokens=true"]


@pytest.fixture(scope="module")
def uninterrupted_cached(workspace):
    root, data, env = workspace
    run_dir = root / "uninterrupted_cached"
    proc = run_train(train_overrides(data, run_dir, *RUN_ARGS, *CACHED), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("name,extra", [("0_workers", ["data.worker_count=0"]),
                                        pytest.param("2_workers", ["data.worker_count=2"], marks=pytest.mark.slow),
                                        ("cached_vision_tokens", CACHED)])
def test_sigkill_and_restart_continues_on_the_same_batches(workspace, request, name, extra):
    """With grain worker processes too (their iterator state is checkpointed the same way), against the
    uninterrupted run without them: the batch order does not depend on the worker count. With cached
    tower tokens (re-encoded from the restored state's tower), against an uninterrupted cached run."""
    root, data, env = workspace
    uninterrupted = request.getfixturevalue("uninterrupted_cached" if extra is CACHED else "uninterrupted")
    run_dir = root / f"killed_{name}"
    overrides = train_overrides(data, run_dir, *RUN_ARGS, *extra)
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(train_command(overrides), cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            _wait_for_checkpoint(proc, run_dir, CHECKPOINT_EVERY)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / str(NUM_STEPS)).exists(), "the run finished before it was killed"

    restarted = run_train(overrides, env)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    resumed = int(re.search(r"resumed from step (\d+)", restarted.stderr).group(1))
    assert CHECKPOINT_EVERY <= resumed < NUM_STEPS

    expected = read_metrics(uninterrupted)
    got = read_metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, NUM_STEPS + 1))  # the killed job's extra lines dropped
    after = slice(resumed, NUM_STEPS)
    assert [m["batch_crc"] for m in got[after]] == [m["batch_crc"] for m in expected[after]]
    assert [m["tokens"] for m in got[after]] == [m["tokens"] for m in expected[after]]
    np.testing.assert_allclose([m["loss"] for m in got[after]], [m["loss"] for m in expected[after]], rtol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in got[after]], [m["grad_norm"] for m in expected[after]],
                               rtol=1e-6)
    # A fresh iterator would have fed the first batches again: they differ from those expected here.
    assert expected[resumed]["batch_crc"] != expected[0]["batch_crc"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(workspace):
    root, data, env = workspace
    run_dir = root / "diverged"
    # Update 0 has learning rate 0 (warmup); from update 1 on the language model's weights jump by
    # ~1e10 per step and its activations overflow within a few steps.
    proc = run_train(train_overrides(data, run_dir, "optim.num_steps=8", "train.checkpoint_every=1",
                                     "train.keep_checkpoints=10", "data.global_batch_size=2",
                                     "optim.lr_llm=1e10"), env)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    logged = read_metrics(run_dir)
    bad_step = len(logged) + 1
    assert 2 <= bad_step <= 8, logged
    assert re.search(rf"non-finite loss .* at step {bad_step}\b", proc.stderr), proc.stderr[-2000:]
    assert f"last good checkpoint, step {bad_step - 1}" in proc.stderr
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, bad_step)), saved
    assert not any(p.name.startswith(str(bad_step)) for p in (run_dir / "checkpoints").iterdir())
    state = restore(run_dir, bad_step - 1)
    assert int(state["step"]) == bad_step - 1
    assert all(np.isfinite(np.asarray(v)).all() for v in traverse_util.flatten_dict(state["params"]).values())


def test_init_from_takes_a_run_directory_or_a_converted_checkpoint(workspace, uninterrupted, tmp_path):
    """A curriculum's second stage starts from the first stage's run directory (its latest step) or from
    that checkpoint converted; parameters of another shape are refused, naming one."""
    from traser_jax import config as config_lib
    from traser_jax import optim
    from traser_jax.config import ConfigError
    from traser_jax.convert import save_checkpoint
    from traser_jax.train import load_init_params

    saved = restore(uninterrupted, NUM_STEPS)
    expected = traverse_util.flatten_dict(optim.merge(saved["params"], saved["frozen"]))
    cfg = config_lib.load(uninterrupted / "config.json", [f"train.init_from={uninterrupted}"])
    from_run = load_init_params(cfg)
    save_checkpoint(tmp_path / "converted", cfg, jax.device_get(from_run))
    from_converted = load_init_params(config_lib.load(uninterrupted / "config.json",
                                                      [f"train.init_from={tmp_path / 'converted'}"]))
    for params in (from_run, from_converted):
        flat = traverse_util.flatten_dict(params)
        assert flat.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(value), err_msg=str(key))
    wider = config_lib.load(uninterrupted / "config.json", [f"train.init_from={uninterrupted}",
                                                             "text.intermediate_size=128"])
    with pytest.raises(ConfigError, match=r"train.init_from .*parameter llm/layers/.* has shape"):
        load_init_params(wider)
    with pytest.raises(ConfigError, match="train.init_from: .*neither a training run directory"):
        load_init_params(config_lib.load(uninterrupted / "config.json", [f"train.init_from={tmp_path}"]))
