"""Shared pieces of the training tests: toyworld shards, the small training config, train runs as
subprocesses, and the sharded-versus-single-device comparison (run in a process of its own, since
the 8 fake CPU devices must be requested before jax is imported).

    python tests/train_fixtures.py sharding DATA_DIR RUN_DIR MESH [MESH ...]
        (MESH: data,fsdp,tensor[,grad_accum_steps[,loss_chunk[,unroll_layers]]]) prints one JSON line
        per mesh (see `compare_sharded`).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Every batch of the tiny runs falls in one shape bucket (one compilation per program).
SMALL_INPUTS = ["data.worker_count=0", "data.tokenizer_vocab_size=512", "tokens.frame_size=[56,56]",
                "tokens.bucket_grid_t=[4]", "tokens.bucket_selected=[16]", "tokens.bucket_length=[512]",
                "tokens.bucket_objects=[4]", "tokens.bucket_windows=[8]"]
TOYWORLD_KNOBS = dict(min_objects=2, max_objects=3, min_duration=4, max_duration=6, fps_choices=(1, 2),
                      min_side=112, max_side=168)


def write_toyworld(out: Path, num_videos: int = 8, seed: int = 0) -> Path:
    """`num_videos` small toyworld videos as ArrayRecord shards in `out`."""
    from data_gen.shards import ShardWriter
    from data_gen.toyworld import generate_video

    with ShardWriter(out, records_per_shard=num_videos) as writer:
        for index in range(num_videos):
            writer.write(*generate_video(seed, index, **TOYWORLD_KNOBS))
    return out


def train_overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_dir={data_dir}", f"train.run_dir={run_dir}", *SMALL_INPUTS, *extra]


def subprocess_env(compile_cache: Path | None = None, devices: int = 1) -> dict[str, str]:
    """A CPU-only environment with `devices` fake devices; a shared persistent compilation cache
    lets the runs of one test reuse each other's compiled programs."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    # LLVM's optimizations halve compile times; the programs compute the same (and are tiny).
    env["XLA_FLAGS"] = f"--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={devices}"
    if compile_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
    return env


def train_command(overrides: list[str]) -> list[str]:
    return [PYTHON, "-m", "traser_jax.train", "configs/tiny.yaml", *overrides]


def run_train(overrides: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(overrides), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# -- the sharded comparison (in its own process) ------------------------------------------------

# Parameters (and their optimizer moments) with at least this many elements must be split; below it,
# biases such as the vision tower's qkv bias (3 x heads x head_dim per layer) may stay whole under FSDP.
SHARDED_MIN_SIZE = 1024


def _relative_error(x, ref) -> float:
    """max |x - ref| over max |ref|, of one array (elementwise ratios blow up where ref is near 0)."""
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def _unsharded(state) -> list[str]:
    """Paths of large state arrays that every device holds whole."""
    import jax
    import numpy as np

    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if leaf.size >= SHARDED_MIN_SIZE:
            shard = leaf.addressable_shards[0].data.shape
            if leaf.sharding.is_fully_replicated or np.prod(shard) >= leaf.size:
                out.append(f"{jax.tree_util.keystr(path)} {leaf.shape} -> shard {shard}")
    return out


def compare_sharded(data_dir: str, run_dir: str, meshes: list[tuple[int, ...]]) -> list[dict]:
    """For each (data, fsdp, tensor[, grad_accum_steps[, loss_chunk[, unroll_layers]]]) mesh over the 8
    devices: the loss and gradients of one batch of 8 videos next to the single-device ones (one step,
    from the same state), the parameters the rules cannot shard on it, and the large state arrays left
    whole."""
    import jax
    import numpy as np

    from traser_jax import config as config_lib
    from traser_jax import data as data_lib
    from traser_jax import sharding
    from traser_jax.model import abstract_params
    from traser_jax.train import Trainer, make_mesh

    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
    cfg = config_lib.load("tiny", train_overrides(Path(data_dir), Path(run_dir), "train.compute_dtype=float32",
                                                  "data.global_batch_size=8"))
    batch = next(iter(data_lib.train_dataset(cfg, data_lib.run_tokenizer(cfg))))
    one = Trainer(cfg, make_mesh(config_lib.MeshConfig(data=1), devices=jax.devices()[:1]))
    host_state = jax.device_get(one.init_state(cfg.train.seed))
    ref_loss, ref_grads = jax.device_get(one.loss_and_grads(jax.device_put(host_state, one.state_shardings), batch))
    reports = []
    for data, fsdp, tensor, accum, loss_chunk, unroll in (tuple(m) + (1, 0, 0)[len(m) - 3:] for m in meshes):
        mesh_cfg = config_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
        accum_cfg = config_lib.apply_overrides(copy.deepcopy(cfg), {"data.grad_accum_steps": accum,
                                                                    "train.loss_chunk": loss_chunk,
                                                                    "train.unroll_layers": bool(unroll)})
        trainer = Trainer(accum_cfg, make_mesh(mesh_cfg))
        state = jax.device_put(host_state, trainer.state_shardings)
        loss, grads = trainer.loss_and_grads(state, batch)
        grad_errors = jax.tree.map(_relative_error, jax.device_get(grads), ref_grads)
        flat_errors = {jax.tree_util.keystr(p): e for p, e in jax.tree_util.tree_leaves_with_path(grad_errors)}
        reports.append({
            "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
            "grad_accum_steps": accum_cfg.data.grad_accum_steps, "loss_chunk": accum_cfg.train.loss_chunk,
            "unroll_layers": accum_cfg.train.unroll_layers,
            "devices_used": len({d.id for d in trainer.mesh.devices.flat}),
            "loss": float(loss), "ref_loss": float(ref_loss),
            "grad_rel_errors": flat_errors,
            "grads_nonzero": int(sum(np.count_nonzero(np.asarray(g)) for g in jax.tree.leaves(ref_grads))),
            "rule_problems": sharding.sharding_problems(abstract_params(cfg), trainer.rules,
                                                        {"data": data, "fsdp": fsdp, "tensor": tensor}),
            "unsharded": _unsharded(state),
            "batch_sharding": str(trainer.put_batch(batch)["input_ids"].sharding.spec),
        })
    return reports


if __name__ == "__main__" and sys.argv[1] == "sharding":
    _meshes = [tuple(int(v) for v in m.split(",")) for m in sys.argv[4:]]
    for _report in compare_sharded(sys.argv[2], sys.argv[3], _meshes):
        print(json.dumps(_report), flush=True)
