"""Scene graphs from videos: batched, grammar-constrained greedy decoding with a KV cache.

    python -m traser_jax.infer --checkpoint DIR --data SHARD_DIR --out PRED.jsonl
        [--batch-size 8] [--max-new-tokens N] [--step S] [--tokenizer FILE] [--workers W] [key=value ...]

`--checkpoint` is either
- a training run directory (`python -m traser_jax.train`: config.json, tokenizer.json,
  checkpoints/<step>/state): the latest step (or `--step`) is restored partially, only
  the `params` and `frozen` subtrees of the saved state, so the optimizer state is
  never read; or
- a converted checkpoint (`python -m traser_jax.convert from-hf`, or
  `convert.save_checkpoint`: config.yaml + params/); its tokenizer is
  hf_assets/tokenizer.json unless `--tokenizer` names one.
`key=value` overrides apply to the stored config (e.g. `train.compute_dtype=float32`,
`train.repetition_penalty=1.0`, `mesh.tensor=8`); parameters are laid out on the
devices by the config's logical-axis rules, as in training, and each batch is split
over the mesh's (data, fsdp) axes when they divide the batch size.

Per batch (videos of one frame size, featurized as for training but without the
answer, in `--workers` processes while the devices decode): the vision tower and
both resamplers run per video (vmapped), the packed
prompts are right-padded to one shape bucket and prefilled into the decoder's KV
cache, then `traser_jax.decode.greedy_decode` steps under one `jax.jit`. The
output is constrained while decoding (`traser_jax.constrained`): always valid TRASER
JSON, objects numbered 1..K where K is the number of objects in the model input
(`TraserInputs.num_objects`; past the 40-object or token cap the trailing objects
have no block, and `tokens.kept_record` numbers the rest as the model saw them),
subjects and objects in 1..K (or -1, the camera), spans within [0, floor(duration)];
with `train.no_repeat_relations=true`, no relation (subject, predicate, object) twice while
another object id is left for its subject and predicate.
The last batch of a frame size is padded with copies so every batch has one shape.

Each output line: the TRASER output JSON plus "video_id", in the order batches
finish (the reader's order when all videos share a frame size, e.g. with
`tokens.frame_size` set).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from data_gen.record import Record
from data_gen.shards import Example, ShardError, ShardReader
from traser_jax import config as config_lib
from traser_jax import constrained, decode, optim, sharding
from traser_jax import tokens as tokens_lib
from traser_jax.config import Config
from traser_jax.convert import ASSETS_DIR, load_checkpoint
from traser_jax.data import Features, apply_special_ids, collate, featurize, in_workers
from traser_jax.model import Traser, abstract_params, embed_batch, init_cache
from traser_jax.modules.layers import dtype_of
from traser_jax.tokenizer import TokenizerError, TraserTokenizer, load_tokenizer
from traser_jax.train import checkpoint_manager, make_mesh

PROMPT_KEYS = ("pixel_values", "sel_token", "otr_segment", "twr_segment", "input_ids", "latent_index",
               "positions", "attention_mask", "length")


class InferenceError(ValueError):
    """A bad checkpoint, budget or input, named in the message."""


# -- loading ------------------------------------------------------------------------------

def checkpoint_kind(path: Path) -> str:
    """'run' (a training run directory) or 'converted' (config.yaml + params/)."""
    if (path / "config.yaml").is_file() and (path / "params").is_dir():
        return "converted"
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return "run"
    raise InferenceError(f"--checkpoint {path}: neither a training run directory (config.json and checkpoints/) "
                         f"nor a converted checkpoint (config.yaml and params/)")


def param_shardings(cfg: Config, mesh: jax.sharding.Mesh) -> tuple[Any, dict]:
    """(the boxed abstract parameter tree, NamedShardings of its unboxed leaves) from the config's rules."""
    boxed = abstract_params(cfg, boxed=True)
    return boxed, sharding.logical_shardings(boxed, mesh, sharding.rules_from_config(cfg.mesh.rules))


def _target(boxed: Any, shardings: Any, dtype) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), nn.meta.unbox(boxed),
                        shardings)


def restore_run_params(run_dir: Path, cfg: Config, mesh: jax.sharding.Mesh,
                       step: int | None = None) -> tuple[int, dict]:
    """(step, full parameters) of a training run: only params + frozen of the saved state are read."""
    # The run's own layout, wherever the directory now lives (config.json keeps the training-time path).
    mngr = checkpoint_manager(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir))))
    steps = mngr.all_steps()
    if not steps:
        raise InferenceError(f"{run_dir}/checkpoints holds no saved step")
    step = mngr.latest_step() if step is None else step
    if step not in steps:
        raise InferenceError(f"--step {step}: {run_dir}/checkpoints has steps {sorted(steps)}")
    boxed, shardings = param_shardings(cfg, mesh)
    trainable, frozen = optim.split_frozen(boxed, cfg.optim)
    sh_trainable, sh_frozen = optim.split_frozen(shardings, cfg.optim)
    dtype = dtype_of(cfg.train.param_dtype)
    target = {"params": _target(trainable, sh_trainable, dtype), "frozen": _target(frozen, sh_frozen, dtype)}
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    mngr.close()
    state = restored["state"]
    return step, optim.merge(state["params"], state["frozen"])


def load_for_inference(checkpoint: str | Path, overrides: Sequence[str] | dict | None = None,
                       tokenizer: str | Path | None = None, step: int | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> tuple[Config, dict, TraserTokenizer]:
    """(config, parameters placed on the devices, tokenizer) of a run directory or a converted checkpoint."""
    path = Path(checkpoint)
    kind = checkpoint_kind(path)
    cfg = config_lib.load(path / ("config.json" if kind == "run" else "config.yaml"), overrides)
    default_tok = path / "tokenizer.json" if kind == "run" else path / ASSETS_DIR / "tokenizer.json"
    tok_path = Path(tokenizer) if tokenizer else default_tok
    if not tok_path.exists() and kind == "run" and cfg.data.tokenizer:
        tok_path = Path(cfg.data.tokenizer)
    if not tok_path.exists():
        raise InferenceError(f"no tokenizer at {tok_path}: pass --tokenizer FILE")
    tok = load_tokenizer(tok_path)
    apply_special_ids(cfg, tok)
    mesh = mesh or make_mesh(cfg.mesh)
    if kind == "run":
        _, params = restore_run_params(path, cfg, mesh, step)
    else:
        if step is not None:
            raise InferenceError("--step applies to training run directories only")
        _, shardings = param_shardings(cfg, mesh)
        _, params = load_checkpoint(path, shardings=shardings, dtype=cfg.train.param_dtype)
    return cfg, params, tok


# -- the model side of decoding --------------------------------------------------------------

Statics = tuple[tuple[int, int, int], int, int]


class Predictor:
    """Decodes collated batches of one checkpoint; compiled functions are kept per batch shape."""

    def __init__(self, cfg: Config, params: dict, tokenizer: TraserTokenizer, *, max_new_tokens: int | None = None,
                 max_chars: int = 100, mesh: jax.sharding.Mesh | None = None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.mesh = mesh or make_mesh(cfg.mesh)
        self.rules = sharding.rules_from_config(cfg.mesh.rules)
        self.model = Traser(cfg)
        self.max_new_tokens = int(max_new_tokens or cfg.train.max_new_tokens)
        if self.max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # The model's vocabulary may be larger than the tokenizer's (Qwen2.5: 151,936 rows for 151,665
        # ids): the extra rows are never text, so the grammar forbids them.
        extra = cfg.text.vocab_size - tokenizer.vocab_size
        self.grammar = constrained.compile_tokens(tokenizer.token_bytes() + [None] * extra,
                                                  tokenizer.special.im_end, max_chars=max_chars)
        self.cache_dtype = dtype_of(cfg.train.compute_dtype)
        self._prefill: dict[tuple, Any] = {}
        self._step = self._make_step()

    def _make_prefill(self, statics: Statics, length: int):
        key = (statics, length)
        if key not in self._prefill:
            model, cache_len = self.model, length + self.max_new_tokens

            def prefill(params, batch):
                embeds = embed_batch(model, params, batch, statics)
                b = embeds.shape[0]
                cache = init_cache(self.cfg.text, b, cache_len, self.cache_dtype)
                hidden, cache = model.apply({"params": params}, embeds, batch["positions"], batch["attention_mask"],
                                            cache, 0, return_hidden=True, method=Traser.decode)
                last = hidden[jnp.arange(b), batch["length"] - 1]  # each row's last prompt token
                logits = model.apply({"params": params}, last[:, None], method=Traser.logits)[:, 0]
                return logits, {"kv": cache, "index": jnp.int32(length)}

            self._prefill[key] = prefill
        return self._prefill[key]

    def _make_step(self):
        model = self.model

        def step(params, token, cache, position):
            embeds = model.apply({"params": params}, token[:, None], method=Traser.embed_tokens)
            ones = jnp.ones((token.shape[0], 1), jnp.int32)
            logits, kv = model.apply({"params": params}, embeds, position[:, None], ones, cache["kv"],
                                     cache["index"], method=Traser.decode)
            return logits[:, 0], {"kv": kv, "index": cache["index"] + 1}

        return step

    def splits(self, batch_size: int) -> bool:
        """A batch splits over the mesh's (data, fsdp) axes, as in training, when they divide it;
        otherwise every device decodes the whole batch."""
        return batch_size % sharding.batch_shards(self.mesh) == 0

    def input_sharding(self, ndim: int, batch_size: int) -> jax.sharding.NamedSharding:
        if self.splits(batch_size):
            return sharding.batch_sharding(self.mesh, ndim)
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def check_budget(self, video_id: str, num_objects: int) -> None:
        need = self.grammar.min_new_tokens(num_objects)
        if self.max_new_tokens < need:
            raise InferenceError(f"video {video_id}: max_new_tokens {self.max_new_tokens} is below {need}, the "
                                 f"tokens a valid output needs for its {num_objects} objects; raise --max-new-tokens")

    def decode_batch(self, videos: Sequence[Features], records: Sequence[Record]) -> list[dict[str, Any]]:
        """TRASER output JSON (dicts) of videos sharing one frame size, in order."""
        batch = collate(videos, self.cfg)
        grid = tuple(int(v) for v in batch["grid_thw"][0])
        statics = (grid, int(batch["object_ids"].shape[-1]), int(batch["window_object"].shape[-1]))
        length = int(batch["input_ids"].shape[-1])
        limit = self.cfg.text.max_position_embeddings
        if length + self.max_new_tokens > limit:
            raise InferenceError(f"prompt bucket {length} + max_new_tokens {self.max_new_tokens} exceeds "
                                 f"text.max_position_embeddings {limit}")
        num_objects = [int(v.inputs.num_objects) for v in videos]
        for v, k in zip(videos, num_objects):
            self.check_budget(v.video_id, k)
        max_second = [constrained.video_limits(r)[1] for r in records]
        constraint = decode.make_constraint(self.grammar, num_objects, max_second, self.max_new_tokens)
        device_batch = {k: jax.device_put(batch[k], self.input_sharding(np.ndim(batch[k]), len(videos)))
                        for k in PROMPT_KEYS}
        first = batch["positions"][np.arange(len(videos)), batch["length"] - 1] + 1
        with sharding.activate(self.mesh, self.rules):
            out = decode.greedy_decode(self._step, self._make_prefill(statics, length), self.params, device_batch,
                                       jnp.asarray(first, jnp.int32), constraint, self.max_new_tokens,
                                       end_id=self.tokenizer.special.im_end,
                                       repetition_penalty=self.cfg.train.repetition_penalty,
                                       no_repeat_relations=self.cfg.train.no_repeat_relations)
        finished = np.asarray(out.finished)
        if not finished.all():  # the grammar closes every row within the budget: a bug if not
            raise RuntimeError(f"decoding did not finish for videos "
                               f"{[v.video_id for v, f in zip(videos, finished) if not f]}")
        return [json.loads(text) for text in decode.texts(self.tokenizer, out)]


def kept_template(record: Record, features: Features) -> Record:
    """The record as the model saw it: only the objects that got a block, numbered 1..K."""
    k = int(features.inputs.num_objects)
    return tokens_lib.kept_record(record, features.inputs.object_ids[:k].tolist())


class FeaturizeVideo:
    """grain map: Example -> (Features without the answer, Record); picklable (the tokenizer travels as
    its JSON and is rebuilt once per worker)."""

    def __init__(self, cfg: Config, tokenizer: TraserTokenizer):
        self.cfg, self.tokenizer_json, self._token_fn = cfg, tokenizer.tokenizer.to_str(), None

    def __call__(self, example: Example) -> tuple[Features, Record]:
        if self._token_fn is None:
            from tokenizers import Tokenizer
            self._token_fn = tokens_lib.as_token_fn(TraserTokenizer(Tokenizer.from_str(self.tokenizer_json)))
        return featurize(example, self.cfg, self._token_fn, with_target=False), example.record

    def __getstate__(self):
        return {**self.__dict__, "_token_fn": None}


def featurized(source: Sequence[Example], cfg: Config, tokenizer: TraserTokenizer,
               workers: int = 0) -> Iterator[tuple[Features, Record]]:
    """(Features, Record) of each example in order; frames decoded and tokens arranged in `workers`
    processes (0: in this one) while the accelerator decodes."""
    if workers < 0:
        raise InferenceError(f"--workers must be >= 0, got {workers}")
    fn = FeaturizeVideo(cfg, tokenizer)
    if workers == 0:
        return map(fn, source)
    import grain
    return iter(in_workers(grain.MapDataset.source(source).map(fn), workers))


def predict(predictor: Predictor, source: Sequence[Example], batch_size: int, progress: Any = None,
            workers: int = 0) -> Iterator[dict[str, Any]]:
    """Prediction dicts ({"video_id", "objects", "relationships"}) for a source of examples (a
    ShardReader), batched per frame size."""
    if batch_size < 1:
        raise InferenceError(f"--batch-size must be >= 1, got {batch_size}")
    pending: dict[tuple[int, int], list[tuple[Features, Record]]] = {}

    def flush(group: list[tuple[Features, Record]]) -> Iterator[dict[str, Any]]:
        real = len(group)
        group = group + [group[-1]] * (batch_size - real)  # one batch shape: pad with copies
        payloads = predictor.decode_batch([f for f, _ in group], [r for _, r in group])
        for (features, _), payload in zip(group[:real], payloads[:real]):
            if progress is not None:
                progress.update(1)
            yield {"video_id": features.video_id, **payload}

    for features, record in featurized(source, predictor.cfg, predictor.tokenizer, workers):
        key = features.grid_thw[1:]
        pending.setdefault(key, []).append((features, record))
        if len(pending[key]) == batch_size:
            yield from flush(pending.pop(key))
    for key in list(pending):
        yield from flush(pending.pop(key))


def run(checkpoint: str | Path, data: str | Path, out: str | Path, *, batch_size: int = 8,
        max_new_tokens: int | None = None, overrides: Sequence[str] | None = None, tokenizer: str | None = None,
        step: int | None = None, max_chars: int = 100, progress: bool = True, workers: int | None = None) -> int:
    """Write one prediction line per video of the shard directory `data`; returns the count.
    workers: featurizing processes (default: the config's data.worker_count)."""
    from tqdm import tqdm

    cfg, params, tok = load_for_inference(checkpoint, overrides, tokenizer, step)
    predictor = Predictor(cfg, params, tok, max_new_tokens=max_new_tokens, max_chars=max_chars)
    shards = sharding.batch_shards(predictor.mesh)
    split = ("batches are not split (data x fsdp = 1)" if shards == 1 else
             f"each batch is split {shards} ways over (data, fsdp)" if predictor.splits(batch_size) else
             f"batches of {batch_size} are not split: data x fsdp = {shards} does not divide them")
    print(f"mesh {dict(predictor.mesh.shape)}: {split}", file=sys.stderr)
    workers = cfg.data.worker_count if workers is None else workers
    reader = ShardReader(data)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tqdm(total=len(reader), desc="infer", unit="video", disable=not progress, dynamic_ncols=True) as bar, \
            open(out, "w") as f:
        for line in predict(predictor, reader, batch_size, bar, workers=workers):
            f.write(json.dumps(line) + "\n")
            f.flush()
            count += 1
    reader.close()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traser_jax.infer", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training run directory or a converted checkpoint")
    parser.add_argument("--data", required=True, help="a shard directory (data_gen.shards)")
    parser.add_argument("--out", required=True, help="the predictions JSONL to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: train.max_new_tokens")
    parser.add_argument("--max-chars", type=int, default=100, help="longest name, attribute or predicate")
    parser.add_argument("--step", type=int, default=None, help="a run directory's step (default: the latest)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding frames and arranging tokens (default: data.worker_count)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        count = run(args.checkpoint, args.data, args.out, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, overrides=args.overrides, tokenizer=args.tokenizer,
                    step=args.step, max_chars=args.max_chars, workers=args.workers)
    except (InferenceError, config_lib.ConfigError, constrained.GrammarError, TokenizerError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {count} predictions to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
