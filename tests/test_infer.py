"""Inference end to end from random weights: toyworld shards -> `python -m traser_jax.infer` -> JSONL.

Every prediction must parse and lay onto its video as a valid record (objects numbered
as the model saw them, spans inside the video), one line per video; a training run
directory and a converted checkpoint of the same weights must give the same output,
and batching must not change greedy decoding. Also the benchmark's FLOP count against
the real parameter tree.
"""
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from data_gen.record import from_traser_json
from data_gen.shards import ShardReader, ShardWriter
from data_gen.toyworld import generate_video
from traser_jax import bench, convert, infer, train
from traser_jax import config as config_lib
from traser_jax import data as data_lib
from traser_jax import tokens as tokens_lib
from traser_jax.model import abstract_params, init_params
from train_fixtures import REPO, subprocess_env

MAX_NEW = 160
MAX_CHARS = 16  # short strings so random outputs reach the relationships


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards of 3 small toyworld videos (one with more objects than the 2-object cap), a BPE trained
    on them, random weights saved as a training run directory and as a converted checkpoint."""
    root = tmp_path_factory.mktemp("infer")
    with ShardWriter(root / "data") as writer:
        for index, objects in enumerate((3, 2, 2)):
            record, frames = generate_video(5, index, min_objects=objects, max_objects=objects, min_duration=5,
                                            max_duration=8, fps_choices=(1,), min_side=112, max_side=112)
            writer.write(record, frames)
    run_dir = root / "run"
    run_dir.mkdir()
    cfg = config_lib.load("tiny", [f"data.train_dir={root / 'data'}", f"train.run_dir={run_dir}",
                                   "data.tokenizer_vocab_size=512", "train.compute_dtype=float32",
                                   "tokens.max_objects=2", "train.async_checkpointing=false"])
    data_lib.run_tokenizer(cfg)  # run_dir/tokenizer.json, as training leaves it
    # Random weights with 10x HF's init spread: varied enough that the outputs go past the objects.
    params = jax.tree.map(lambda x: 10 * x, init_params(cfg, jax.random.key(0)))
    # The run directory as train.run leaves it: config.json and the orbax "state" item (with the optimizer).
    state = train.Trainer(cfg).init_state(0, params)
    mngr = train.checkpoint_manager(cfg)
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    mngr.close()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    assets = root / "assets"
    assets.mkdir()
    shutil.copy(run_dir / "tokenizer.json", assets / "tokenizer.json")
    convert.save_checkpoint(root / "converted", cfg, params, assets_from=assets)
    return root, cfg


@pytest.fixture(scope="module")
def cli_predictions(setup):
    root, _ = setup
    out = root / "pred.jsonl"
    rc = infer.main(["--checkpoint", str(root / "run"), "--data", str(root / "data"), "--out", str(out),
                     "--batch-size", "2", "--max-new-tokens", str(MAX_NEW), "--max-chars", str(MAX_CHARS),
                     "--workers", "2"])
    assert rc == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_prediction_is_a_valid_scene_graph_of_its_video(setup, cli_predictions):
    assert_valid_predictions(*setup, cli_predictions)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_decodes_valid_scene_graphs_on_gpu(setup):
    """train.attention_impl=cudnn (bf16) through the whole CLI: the vision groups and the prefill with
    key lengths, the cached decoding steps with a mask broadcast over the heads."""
    root, cfg = setup
    out = root / "pred_cudnn.jsonl"
    assert infer.main(["--checkpoint", str(root / "run"), "--data", str(root / "data"), "--out", str(out),
                       "--batch-size", "2", "--max-new-tokens", str(MAX_NEW), "--max-chars", str(MAX_CHARS),
                       "--workers", "0", "train.attention_impl=cudnn", "train.compute_dtype=bfloat16"]) == 0
    assert_valid_predictions(root, cfg, [json.loads(line) for line in out.read_text().splitlines()])


def assert_valid_predictions(root, cfg, predictions):
    """One prediction per video, numbering the kept objects, valid in the TRASER format, some with relations."""
    reader = ShardReader(root / "data")
    assert sorted(p["video_id"] for p in predictions) == sorted(reader.ids())
    by_id = {p["video_id"]: p for p in predictions}
    tok = tokens_lib.as_token_fn(data_lib.load_tokenizer(root / "run" / "tokenizer.json"))
    capped = relations = 0
    for example in reader:
        features = data_lib.featurize(example, cfg, tok, with_target=False)
        pred = {k: v for k, v in by_id[example.video_id].items() if k != "video_id"}
        k = int(features.inputs.num_objects)
        template = infer.kept_template(example.record, features)
        assert [list(o)[0] for o in pred["objects"]] == [f"object {i + 1}" for i in range(k)]
        recovered = from_traser_json(pred, template, strict=True).validate()
        assert len(recovered.relations) == len(pred["relationships"])
        capped += k < len(example.record.visible_objects())
        relations += len(pred["relationships"])
    assert capped >= 1  # the 2-object cap was exercised: numbering follows the kept objects
    assert relations >= 1  # random outputs reached the relationships, not only the shortest close


def test_converted_checkpoint_and_batch_size_one_give_the_same_output(setup, cli_predictions):
    """Same weights through the other checkpoint kind, one video per batch, featurized in this process
    (the CLI used 2 worker processes): greedy decoding is deterministic and padding (prompt length,
    temporal grids, batch rows) is masked out."""
    root, _ = setup
    cfg, params, tok = infer.load_for_inference(root / "converted")
    predictor = infer.Predictor(cfg, params, tok, max_new_tokens=MAX_NEW, max_chars=MAX_CHARS)
    single = list(infer.predict(predictor, ShardReader(root / "data"), batch_size=1, workers=0))
    assert {p["video_id"]: p for p in single} == {p["video_id"]: p for p in cli_predictions}


def test_decoding_sharded_over_8_devices_gives_the_single_device_output(setup, cli_predictions):
    """Data x FSDP x tensor = 2 x 2 x 2 fake CPU devices, the batch split 4 ways: the same predictions."""
    root, _ = setup
    out = root / "pred_sharded.jsonl"
    cmd = [sys.executable, "-m", "traser_jax.infer", "--checkpoint", str(root / "run"), "--data", str(root / "data"),
           "--out", str(out), "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--max-chars", str(MAX_CHARS),
           "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices=8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "each batch is split 4 ways" in proc.stderr
    sharded = {p["video_id"]: p for p in map(json.loads, out.read_text().splitlines())}
    assert sharded == {p["video_id"]: p for p in cli_predictions}


def test_run_directory_restores_only_the_parameters(setup):
    root, cfg = setup
    mesh = train.make_mesh(cfg.mesh)
    step, params = infer.restore_run_params(root / "run", cfg, mesh)
    _, converted = convert.load_checkpoint(root / "converted")
    assert step == 7
    flat, ref = traverse_util.flatten_dict(params), traverse_util.flatten_dict(converted)
    assert flat.keys() == ref.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref[path]), err_msg=str(path))
    with pytest.raises(infer.InferenceError, match=r"--step 3: .* has steps \[7\]"):
        infer.restore_run_params(root / "run", cfg, mesh, step=3)


@pytest.mark.parametrize("args, message", [(["--max-new-tokens", "5"], "max_new_tokens 5 is below"),
                                           (["--workers", "-1"], "--workers must be >= 0, got -1")])
def test_a_budget_below_the_shortest_output_or_a_negative_worker_count_is_refused(setup, capsys, args, message):
    root, _ = setup
    rc = infer.main(["--checkpoint", str(root / "converted"), "--data", str(root / "data"),
                     "--out", str(root / "refused.jsonl"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_a_directory_that_is_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(infer.InferenceError, match="neither a training run directory"):
        infer.load_for_inference(tmp_path)


def test_benchmark_counts_six_flops_per_decoder_matmul_weight_per_token():
    """bench's MaxText-style decoder count = 6 x (decoder matmul weights, the tied output
    projection included once) x tokens + causal attention, from the real parameter tree."""
    cfg = config_lib.load("tiny")
    flat = traverse_util.flatten_dict(abstract_params(cfg, boxed=False)["llm"])
    matmul = sum(int(np.prod(v.shape)) for p, v in flat.items() if p[-1] in ("kernel", "embedding"))
    seq, batch = 96, 3
    flops = bench.decoder_flops(cfg, seq, batch)
    t = cfg.text
    head_dim = t.hidden_size // t.num_heads
    # MaxText: 4 s^2 h d per layer non-causal, halved for the causal mask, x 3 for fwd + bwd
    attention = 3 * 4 * t.num_layers * seq ** 2 * t.num_heads * head_dim * batch / 2
    assert flops["weights"] == 6 * matmul * seq * batch
    assert flops["attention"] == attention


def test_benchmark_vision_attention_follows_the_window_and_frame_groups():
    """tiny: 4 blocks, full attention (one temporal grid) in blocks 1 and 3, window attention in
    blocks 0 and 2 over 56 px windows (2 x 2 merged cells = 16 patches), width 32."""
    cfg = config_lib.load("tiny")
    cost = 4 * cfg.vision.hidden_size  # QK^T and AV per (query, key) pair
    # 8 x 8 patches: 4 whole windows of 16
    assert bench.vision_flops(cfg, (1, 8, 8))["attention"] == cost * (2 * 64 ** 2 + 2 * 4 * 16 ** 2)
    # 6 x 6 patches = 3 x 3 merged cells: windows of 2x2, 2x1, 1x2, 1x1 cells (16, 8, 8, 4 patches)
    assert bench.vision_flops(cfg, (1, 6, 6))["attention"] == cost * (2 * 36 ** 2 + 2 * (16 ** 2 + 2 * 8 ** 2 + 4 ** 2))
    # 2 temporal grids of 16 x 8 patches: full blocks attend within each grid (128 patches)
    assert bench.vision_flops(cfg, (2, 16, 8))["attention"] == cost * (2 * 2 * 128 ** 2 + 2 * 16 * 16 ** 2)


def test_benchmark_batch_has_exactly_the_requested_sizes():
    cfg = config_lib.load("tiny")
    batch, sizes = bench.synthetic_batch(cfg, seq=400, frames=6, res=112, objects=2, object_cells=3, batch=2)
    assert batch["input_ids"].shape == (2, 400) and batch["attention_mask"].all()  # no padding
    assert sizes["selected"] == 2 * 3 * 3 and batch["sel_token"].shape == (2, 18)  # objects x grids x cells
    assert sizes["windows"] == 2 * 2  # 3 temporal grids of 2 s in 4 s windows, per object
    assert batch["object_ids"].shape == (2, 2) and batch["window_object"].shape == (2, 4)
    answer = (batch["labels"] != tokens_lib.IGNORE_INDEX).sum(1)
    assert (answer == sizes["answer_tokens"]).all() and 0 < sizes["answer_tokens"] < 400
    with pytest.raises(ValueError, match="--seq 50 is too short"):
        bench.synthetic_batch(config_lib.load("tiny"), seq=50, frames=6, res=112, objects=2, object_cells=3, batch=1)


# slow: 91 s on the 2-core machine (session 11), two forward + backward compilations of the whole model
@pytest.mark.slow
def test_grounding_report_tells_a_reading_model_from_a_collapsed_one(setup, capsys):
    """`python -m traser_jax.grounding`: at init the answer loss depends on the pixels, the first
    object's latents differ between videos and every group gets gradient; with the resamplers'
    learned latents blown up (the collapse the demo's learning rates avoid) the spread is ~0."""
    from traser_jax import grounding

    root, cfg = setup
    assert grounding.main(["--checkpoint", str(root / "run"), "--data", str(root / "data"), "--videos", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["videos"] == 3
    assert abs(report["loss"] - report["loss_shuffled_video"]) > 1e-4
    assert report["latent_spread"] > 0.05
    assert set(report["grad_norm"]) == {"llm", "resampler", "merger", "vision"}
    assert all(v > 0 for v in report["grad_norm"].values())

    run_cfg, params, tok = infer.load_for_inference(root / "run")
    params = jax.device_get(params)
    token_fn = tokens_lib.as_token_fn(tok)
    batch = data_lib.collate([data_lib.featurize(ex, run_cfg, token_fn) for ex in ShardReader(root / "data")],
                             run_cfg)
    flat = traverse_util.flatten_dict(params)
    for path in flat:
        if path[-1] == "latents":
            flat[path] = flat[path] * 1e4
    collapsed = grounding.grounding_report(run_cfg, traverse_util.unflatten_dict(flat), batch)
    assert collapsed["latent_spread"] < 0.01 < report["latent_spread"]
    with pytest.raises(ValueError, match="at least 2 videos"):
        grounding.grounding_report(run_cfg, params, {k: v[:1] for k, v in batch.items()})


def write_baseline_stand_in(script):
    """A script standing in for the CUDA-only PyTorch baseline, with its output format: its language model
    steps 0.5 s at any --seq, its vision tower forward 0.25 s (16 frames/s)."""
    script.write_text(
        "import json, sys\n"
        "a = sys.argv\n"
        "seq = int(a[a.index('--seq') + 1])\n"
        "print(json.dumps({'what': 'hf_qwen25vl3b_lm_train_step', 'seq': seq, 'step_s': 0.5,"
        " 'tokens_per_s': seq / 0.5}))\n"
        "print(json.dumps({'what': 'hf_qwen25vl_vision_forward', 'forward_s': 0.25, 'frames_per_s': 16.0}))\n")
    return script


# slow: 106 s on the 2-core machine (session 11); the other bench tests run the CLI and bench() in CI
@pytest.mark.slow
def test_benchmark_cli_reports_the_step_its_parts_and_the_baseline_ratios(tmp_path, capsys):
    """`python -m traser_jax.bench` end to end on the tiny config: tokens/s and MFU follow from the
    step time and the FLOP count, the breakdown times a forward and a backward, --profile leaves a
    trace and lists its heaviest ops, --lm-step trains the decoder alone from its init loss, and with
    --baseline the ratios use the baseline script's JSON lines (here a script the test writes,
    standing in for the CUDA-only PyTorch one with its output format)."""
    script = write_baseline_stand_in(tmp_path / "baseline.py")
    out = tmp_path / "report.json"
    argv = ["--config", "tiny", "--seq", "400", "--frames", "4", "--res", "112", "--objects", "2", "--steps", "2",
            "--breakdown", "--profile", str(tmp_path / "trace"), "--lm-step", "--baseline", "--baseline-script",
            str(script), "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tokens_per_s"] == pytest.approx(400 / report["step_s"], rel=1e-3)
    assert report["mfu"] == pytest.approx(report["model_flops_per_step"] / report["step_s"]
                                          / (report["peak_tflops_per_device"] * 1e12), rel=0.01)
    parts = report["breakdown_s"]  # forward and forward + backward are timed apart from the step
    assert parts["forward"] > 0 and parts["backward"] > 0
    assert report["profile_by_kind"]["total"] == pytest.approx(sum(  # every kind's time, and only that
        v for k, v in report["profile_by_kind"].items() if k != "total"), abs=0.01)
    top = report["profile_top"]  # the traced steps' heaviest XLA ops, heaviest first
    assert len(top) >= 5 and all(row["ms_per_step"] > 0 and 0 < row["share_of_lane"] <= 1 for row in top)
    assert [row["ms_per_step"] for row in top] == sorted((row["ms_per_step"] for row in top), reverse=True)
    assert list((tmp_path / "trace").glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert report["tokens_per_s_vs_baseline"] == pytest.approx(report["tokens_per_s"] / 800, rel=1e-3)
    assert report["baseline_lm_plus_vision_tokens_per_s"] == pytest.approx(400 / 0.75, rel=1e-3)
    lm = report["lm_step"]  # the decoder alone on random tokens: at init its loss is about ln(vocab)
    assert abs(lm["loss"] - np.log(512)) < 0.5
    assert lm["tokens_per_s"] == pytest.approx(400 / lm["step_s"], rel=1e-3)
    decoder_flops = sum(bench.decoder_flops(config_lib.load("tiny"), 400, 1).values())
    assert lm["model_flops_per_step"] == pytest.approx(decoder_flops, rel=1e-3)
    peak = report["peak_tflops_per_device"] * 1e12
    assert lm["mfu"] == pytest.approx(decoder_flops / lm["step_s"] / peak, rel=0.01)
    assert lm["tokens_per_s_vs_baseline"] == pytest.approx(lm["tokens_per_s"] / 800, rel=1e-3)
    assert report["vision_frames_per_s_vs_baseline"] == pytest.approx(report["vision_frames_per_s"] / 16, rel=1e-3)
    assert bench.main(argv[:-4] + ["--baseline", "--baseline-script", str(tmp_path / "missing.py")]) == 2


# slow: 67 s on the 2-core machine (session 11); test_train's cached-token test checks the step's numbers in CI
@pytest.mark.slow
def test_benchmark_with_cached_vision_tokens_times_the_step_training_runs(capsys):
    """With data.cache_vision_tokens the benchmarked step reads the frozen tower's output, as a cached
    training run's does: the same losses as the step from pixels (same batch, same init), and model
    FLOPs without the tower. The settings the cache needs are checked as training checks them."""
    frozen = ["train.compute_dtype=float32", "optim.lr_vision=0", "optim.lr_merger=0", "data.cache_in_memory=true"]
    sizes = dict(seq=400, frames=4, res=112, objects=2, object_cells=3, batch=2, steps=2, warmup=1)
    pixels = bench.bench(config_lib.load("tiny", frozen), **sizes)
    cached = bench.bench(config_lib.load("tiny", [*frozen, "data.cache_vision_tokens=true"]), **sizes)
    assert cached["cached_vision_tokens"] and not pixels["cached_vision_tokens"]
    assert cached["loss"] == pytest.approx(pixels["loss"], rel=1e-5)
    parts = cached["model_flops_by_part"]
    assert parts["vision_weights"] == parts["vision_attention"] == parts["vision_merger"] == 0
    assert pixels["model_flops_by_part"]["vision_weights"] > 0
    assert cached["model_flops_per_step"] < pixels["model_flops_per_step"]
    argv = ["--config", "tiny", "--seq", "400", "--frames", "4", "--res", "112", "data.cache_in_memory=true",
            "data.cache_vision_tokens=true"]
    assert bench.main(argv) == 2
    assert "cache_vision_tokens needs" in capsys.readouterr().err


def test_lm_step_only_times_the_decoder_alone_against_the_baseline(tmp_path, capsys):
    """`bench --lm-step-only` skips the whole step: the report has the decoder's step, its MFU over the
    decoder's FLOPs, its ratio to the baseline's language model and (--profile) its trace's summary, and
    no whole-step figures. Each `--lm-variant` times the decoder again in the same run, with its row's
    batch, figures, XLA's memory plan and ratio: two micro-batches of 1 (data.grad_accum_steps=2) give
    the loss of one batch of 2 after the same updates (float32 compute), where the first video alone
    gives another; a variant that cannot run gets its error."""
    script = write_baseline_stand_in(tmp_path / "baseline.py")
    argv = ["--config", "tiny", "--seq", "256", "--batch", "2", "--steps", "2", "--lm-step-only", "--profile",
            str(tmp_path / "trace"), "--baseline", "--baseline-script", str(script),
            "--lm-variant", "batch=3 data.grad_accum_steps=2", "--lm-variant", "data.grad_accum_steps=2",
            "--lm-variant", "batch=1 optim.mu_dtype=bfloat16", "train.remat=dots_saveable",
            "train.compute_dtype=float32"]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert "step_s" not in report and "tokens_per_s_vs_baseline" not in report and report["remat"] == "dots_saveable"
    lm = report["lm_step"]
    assert lm["tokens_per_s"] == pytest.approx(2 * 256 / lm["step_s"], rel=1e-3)
    decoder_flops = sum(bench.decoder_flops(config_lib.load("tiny"), 256, 2).values())
    assert lm["mfu"] == pytest.approx(decoder_flops / lm["step_s"] / (report["peak_tflops_per_device"] * 1e12),
                                      rel=0.01)
    assert lm["tokens_per_s_vs_baseline"] == pytest.approx(lm["tokens_per_s"] / 512, rel=1e-3)
    assert lm["planned_peak_gib"] > 0
    bad, accum, first = report["lm_variants"]
    assert bad["batch"] == 3 and "not a multiple of data.grad_accum_steps=2" in bad["error"]
    assert accum["batch"] == 2 and accum["variant"] == "data.grad_accum_steps=2" and first["batch"] == 1
    assert accum["tokens_per_s_vs_baseline"] == pytest.approx(2 * 256 / accum["step_s"] / 512, rel=1e-3)
    # update 0 has learning rate 0, update 1 moves the weights; the first video alone (micro-batch 0) is
    # about 1e-3 off, so this tolerance sees an accumulation that drops a micro-batch
    assert accum["loss"] == pytest.approx(lm["loss"], rel=1e-5) and accum["planned_peak_gib"] > 0
    assert first["loss"] != pytest.approx(lm["loss"], rel=1e-4)
    assert captured.err.count("lm variant: ") == 3 and captured.err.count("lm step: ") == 1  # as they came
    assert "decoder alone" in captured.err and "the baseline's language model" in captured.err
    assert lm["profile_by_kind"]["total"] > 0 and lm["profile_top"]  # the decoder's steps were traced
    assert list((tmp_path / "trace").glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert "by kernel kind" in captured.err
    with pytest.raises(SystemExit):  # the whole step's breakdown has no meaning without the whole step
        bench.main(["--config", "tiny", "--lm-step-only", "--breakdown"])
    assert "--lm-step-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--config", "tiny", "--memory-plan", "--lm-variant", "batch=2"])
    assert "--lm-variant" in capsys.readouterr().err


def test_memory_plan_counts_the_state_and_shrinks_with_the_loss_in_chunks(capsys):
    """`bench --memory-plan` compiles the step without running it: the plan's arguments hold at least the
    train state, and with a vocabulary large enough for the logits to dominate (32,768 words x 1,024
    positions: 128 MiB of float32 logits per copy) the loss in chunks of 128 positions needs a fraction
    of the whole-sequence loss's temporaries."""
    from traser_jax.train import Trainer

    argv = ["--config", "tiny", "--seq", "1024", "--frames", "4", "--res", "112", "--objects", "2", "--memory-plan",
            "text.vocab_size=32768", "train.compute_dtype=float32"]
    plans = {}
    for chunk in (0, 128):
        assert bench.main(argv + [f"train.loss_chunk={chunk}"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["loss_chunk"] == chunk and report["seq"] == 1024
        plans[chunk] = report["memory_plan_gib"]
    cfg = config_lib.load("tiny", ["text.vocab_size=32768"])
    state_gib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(Trainer(cfg).abstract_state())) / 2 ** 30
    logits_gib = 1024 * 32768 * 4 / 2 ** 30
    for plan in plans.values():
        assert plan["argument"] >= state_gib * 0.999
    assert plans[0]["temp"] >= logits_gib  # the whole sequence's logits exist at least once
    assert plans[128]["temp"] < plans[0]["temp"] / 2


def test_memory_plan_of_the_decoder_alone_and_for_a_gpu_without_one(capsys):
    """`bench --lm-step-only --memory-plan` plans the decoder-alone step: its arguments hold the decoder's
    parameters and optimizer state, its temporaries at least the float32 logits (2 x 1,024 positions x
    32,768 words). `--gpu-target` compiles for the GPU a target config describes (configs/gpu/h100.pbtxt)
    where jax's CUDA plugin is installed, and otherwise says that it needs the plugin."""
    import importlib.util

    argv = ["--config", "tiny", "--seq", "1024", "--batch", "2", "--lm-step-only", "--memory-plan",
            "text.vocab_size=32768", "train.compute_dtype=float32"]
    assert bench.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "step_s" not in report and report["backend"] == "cpu"
    plan = report["lm_step"]["memory_plan_gib"]
    cfg = config_lib.load("tiny", ["text.vocab_size=32768"])
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("one",)),
                                          jax.sharding.PartitionSpec())
    _, params, opt_state, _ = bench.lm_step_program(cfg, seq=1024, batch=2, sharding=sharding)
    state_gib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, opt_state))) / 2 ** 30
    # the report rounds to 1/1000 GiB
    assert plan["argument"] >= state_gib - 5e-4 and plan["temp"] >= 2 * 1024 * 32768 * 4 / 2 ** 30 - 5e-4

    gpu = ["--gpu-target", str(REPO / "configs" / "gpu" / "h100.pbtxt")]
    with pytest.raises(SystemExit):  # it compiles; it cannot run
        bench.main(["--config", "tiny", "--lm-step-only", *gpu])
    assert "--memory-plan" in capsys.readouterr().err
    plugin = importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.xla_{cuda}") for cuda in ("cuda12", "cuda13"))
    argv = ["--config", "tiny", "--seq", "256", "--batch", "2", "--lm-step-only", "--memory-plan", *gpu]
    if plugin:  # in a process of its own: the plugin must load before jax's backends start
        proc = subprocess.run([sys.executable, "-m", "traser_jax.bench", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode == 0 and report["device"] == "NVIDIA H100 80GB HBM3"
        assert report["lm_step"]["memory_plan_gib"]["argument"] > 0
    else:
        assert bench.main(argv) == 2 and "CUDA plugin" in capsys.readouterr().err


def test_trace_summary_counts_self_time_of_device_events_per_step(tmp_path):
    """bench.trace_summary on a Perfetto trace the test writes (device lanes as a GPU trace names them):
    an enclosing wrapper keeps only its self time, host lanes do not count; time is per step and lane."""
    import gzip

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python"}}]
    ops = []
    for step in range(2):  # a wrapper around fusion.1 and dot.2, then fusion.1 again
        t = 1000.0 * step
        ops += [{"ph": "X", "pid": 1, "tid": 7, "name": "wrapper", "ts": t, "dur": 45.0},
                {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.1", "ts": t + 1, "dur": 30.0,
                 "args": {"tf_op": "jit(step)/transpose(jvp(llm))/log_softmax"}},
                {"ph": "X", "pid": 1, "tid": 7, "name": "dot.2", "ts": t + 32, "dur": 10.0,  # as a GPU trace
                 "args": {"tf_op": "XlaModule:", "name": "jit(step)/while/body/llm/mlp"}},
                {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.1", "ts": t + 50, "dur": 20.0},
                # the next kernel starts 1 us before fusion.1 ends: it follows it, it is not inside it
                {"ph": "X", "pid": 1, "tid": 7, "name": "dot.2", "ts": t + 69, "dur": 4.0},
                {"ph": "X", "pid": 2, "tid": 1, "name": "host_only", "ts": t, "dur": 500.0}]
    path = tmp_path / "perfetto_trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": meta + ops}).encode()))
    summary = bench.trace_summary(path, steps=2)
    rows = summary["top"]
    # per step: fusion.1 30 + 20 us, dot.2 10 + 4 us, the wrapper 45 - 30 - 10 = 5 us of its own; 69 us in all
    assert [(r["event"], r["ms_per_step"], r["share_of_lane"]) for r in rows] == [
        ("fusion.1", 0.05, 0.7246), ("dot.2", 0.014, 0.2029), ("wrapper", 0.005, 0.0725)]
    assert rows[0]["lane"] == "/device:GPU:0 XLA Ops"
    assert rows[0]["source"] == "jit(step)/transpose(jvp(llm))/log_softmax"
    assert rows[1]["source"] == "jit(step)/while/body/llm/mlp" and rows[2]["source"] == ""
    assert summary["by_kind"] == {"elementwise": 0.05, "matmul": 0.014, "other": 0.005, "total": 0.069}


def test_kernel_kinds_of_the_kernels_an_h200_trace_names():
    """bench.kernel_kind on kernel names read off a traser_3b step's trace on an H200 (2026-11-26)."""
    kinds = {"nvjet_sm90_tst_128x128_64x6_1x2_h_bz_NTT": "matmul", "gemm_fusion_dot_281": "matmul",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128": "attention",
             "void cudnn::fusion::compute_dot_do_o_specialized": "attention",
             "MemcpyD2D": "copy", "Memset 0": "copy", "loop_dynamic_update_slice_fusion_6": "dynamic_update_slice",
             "input_reduce_fusion_54": "reduction", "loop_add_fusion_22": "elementwise",
             "wrapped_transpose_4": "elementwise", "fusion_853": "elementwise",
             "stream_executor::gpu::DelayKernel": "other", "ynn_fusion.118": "xnnpack"}  # the last on CPU
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds
