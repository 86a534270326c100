"""The sharded train step on 8 fake CPU devices computes what one device computes.

For each mesh, from the same state and the same batch of 8 toyworld videos (float32 compute), the
loss and every gradient of `Trainer.loss_and_grads` (the step's own gradient code, under the step's
shardings) equal the single-device ones within a relative error of 1e-5, and on meshes that split
the model (fsdp or tensor > 1) every parameter and optimizer moment of SHARDED_MIN_SIZE elements or
more is actually split across devices. Gradient accumulation over micro-batches gives the gradients
of the whole batch, and the loss in chunks (train.loss_chunk) that of the whole sequence.

The comparison runs in a process of its own (tests/train_fixtures.py): the device count must be set
before jax is imported, and this process has imported it already.
"""
import json
import subprocess
import sys

import pytest

from train_fixtures import REPO, SHARDED_MIN_SIZE, subprocess_env, write_toyworld

TOLERANCE = 1e-5
# (data, fsdp, tensor[, grad_accum_steps[, loss_chunk[, unroll_layers]]]): pure data parallel, FSDP,
# FSDP x tensor with accumulation over 2 micro-batches of 4 and the loss in chunks of 16 positions
# (against one device without accumulation, the loss over whole sequences), and FSDP x tensor with the
# layer loops unrolled (against the loops).
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2, 2, 16), (1, 4, 2, 1, 0, 1)]
SLOW_MESHES = [(2, 2, 2), (1, 8, 1), (1, 4, 2), (4, 1, 2)]


def compare(tmp_path, meshes) -> dict[tuple, dict]:
    data = write_toyworld(tmp_path / "data")
    cmd = [sys.executable, "tests/train_fixtures.py", "sharding", str(data), str(tmp_path / "run"),
           *(",".join(map(str, m)) for m in meshes)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices=8), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(meshes), proc.stdout
    return dict(zip(meshes, reports))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return compare(tmp_path_factory.mktemp("sharding"), MESHES)


def check(report: dict) -> None:
    mesh = report["mesh"]
    assert report["devices_used"] == 8
    assert report["rule_problems"] == []
    assert abs(report["loss"] - report["ref_loss"]) <= TOLERANCE * abs(report["ref_loss"]), report
    assert report["grads_nonzero"] > 0
    errors = report["grad_rel_errors"]
    for group in ("['llm']", "['otr_resampler']", "['twr_resampler']", "['merger']"):  # the trained groups
        assert any(group in path for path in errors), (group, sorted(errors))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{mesh}: gradient of {worst} off by {errors[worst]:.2e} (relative)"
    assert "data" in report["batch_sharding"] or "fsdp" in report["batch_sharding"]
    if mesh["fsdp"] > 1:
        assert report["unsharded"] == [], (f"{mesh}: state arrays of >= {SHARDED_MIN_SIZE} elements held whole "
                                           f"by every device: {report['unsharded']}")
    elif mesh["tensor"] > 1:  # tensor parallelism alone splits the heads, the MLPs and the vocabulary
        split = ("q_proj']['kernel", "o_proj']['kernel", "mlp']['gate_proj", "mlp']['up_proj", "embed_tokens")
        whole = [u for u in report["unsharded"] if "['llm']" in u and any(name in u for name in split)]
        assert whole == [], f"{mesh}: {whole}"
    else:  # pure data parallelism: every device holds the whole state
        assert report["unsharded"]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "data{}-fsdp{}-tensor{}".format(*m) +
                         (f"-accum{m[3]}" if len(m) > 3 else "") + (f"-losschunk{m[4]}" if len(m) > 4 else "") +
                         ("-unrolled" if len(m) > 5 and m[5] else ""))
def test_sharded_step_matches_one_device(reports, mesh):
    check(reports[mesh])
    assert reports[mesh]["grad_accum_steps"] == (mesh[3] if len(mesh) > 3 else 1)
    assert reports[mesh]["loss_chunk"] == (mesh[4] if len(mesh) > 4 else 0)


@pytest.mark.slow
def test_more_meshes(tmp_path):
    for report in compare(tmp_path, SLOW_MESHES).values():
        check(report)
