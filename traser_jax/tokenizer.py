"""Tokenizer, chat prompt and training target of TRASER.

One Hugging Face `tokenizer.json` (the `tokenizers` library, no transformers): the
real Qwen2.5-VL tokenizer for real weights, or a small byte-level BPE trained on
toyworld texts with `train_bpe` and saved with the run. Either way the TRASER
special tokens exist and their ids are exposed (`SpecialIds`, `token_config_overrides`)
for `traser_jax.config.TokenConfig`.

Prompt layout (the released inference script: the user content is the prompt,
"\\n", the video, "\\n"; TRASER's arrangement puts the object-trajectory blocks of
`traser_jax.tokens` where the video was):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nOutput the Video Scene Graph from the video and object trajectories:\\n
    [object blocks]\\n<|im_end|>\\n<|im_start|>assistant\\n

`TraserTokenizer.chat_ids(task)` gives the ids before and after the blocks (the
`prefix_ids` / `suffix_ids` of `traser_jax.tokens.arrange`), `target_ids(payload)`
the answer: the canonical TRASER JSON (`serialize_target`) then `<|im_end|>`; the
loss covers exactly the answer.

Canonical serialization: `json.dumps(payload, separators=(",", ":"), ensure_ascii=True)`
(compact, no spaces; non-ASCII and quotes escaped), keys in the order of
`data_gen.record.to_traser_json`. The constrained decoder (`traser_jax.constrained`)
accepts exactly this style (or json.dumps' default ", " / ": " style when built with
compact=False).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from traser_jax.tokens import SYSTEM_PROMPT, chat_texts
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Order = the fixed ids of a toy tokenizer from `train_bpe` (0..7).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|video_pad|>", "<obj_traj_start>", "<obj_traj_end>")
TRASER_TOKENS = ("<obj_traj_start>", "<obj_traj_end>")  # added to the Qwen tokenizer when missing

SYSTEM_MESSAGE = SYSTEM_PROMPT
PROMPTS = {  # the four training prompts of the release
    "scene_graph": "Output the Video Scene Graph from the video and object trajectories:",
    "relationships": "List all objects and their relationships from the video and object trajectories:",
    "attributes": "List all objects and their attributes from the video and object trajectories:",
    "objects": "List all objects from the video and object trajectories:",
}
JSON_SEPARATORS = (",", ":")

# Qwen2's pre-tokenization: letters runs, single digits, punctuation runs, whitespace.
# Single digits matter: the constrained decoder counts on numbers being written one
# digit per token (true of Qwen2 and of every tokenizer `train_bpe` makes).
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class SpecialIds:
    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    video_pad: int
    obj_traj_start: int
    obj_traj_end: int


@lru_cache(maxsize=1)
def byte_level_decoding() -> dict[str, int]:
    """The ByteLevel (GPT-2) map from the printable stand-in character to the byte it encodes.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to
    code points 256.. in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


class TraserTokenizer:
    """A `tokenizers.Tokenizer` with the TRASER special tokens and byte-level token strings."""

    def __init__(self, tokenizer: Tokenizer):
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise TokenizerError(f"tokenizer decoder is {decoder.get('type')!r}; TRASER needs a byte-level BPE "
                                 "(decoder 'ByteLevel', as Qwen2 and train_bpe)")
        missing = [t for t in SPECIAL_TOKENS if t not in TRASER_TOKENS and tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks the Qwen special tokens {missing}")
        absent = [t for t in TRASER_TOKENS if tokenizer.token_to_id(t) is None]
        if absent:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in absent])
        self.tokenizer = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.special = SpecialIds(*(ids[t] for t in SPECIAL_TOKENS))

    # -- io ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "TraserTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json at {path}")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    # -- text -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (the model's vocab must be at least this)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; special tokens written in it (e.g. "<|im_end|>") map to their ids.
        (`add_special_tokens` is accepted for transformers-style callers; nothing is added.)"""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    __call__ = encode

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def added_token_ids(self) -> set[int]:
        return set(self.tokenizer.get_added_tokens_decoder())

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id stands for; None for added tokens (special or not), which are no text."""
        table = byte_level_decoding()
        added = self.added_token_ids()
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            piece = self.tokenizer.id_to_token(i)
            if i in added or piece is None:
                out.append(None)
            else:
                try:
                    out.append(bytes(table[c] for c in piece))
                except KeyError as err:
                    raise TokenizerError(f"token {i} {piece!r} is not a byte-level string") from err
        return out

    def token_config_overrides(self) -> dict[str, int]:
        """`key=value` overrides of traser_jax.config for these ids (and the vocab size to cover)."""
        s = self.special
        return {"tokens.vision_start_id": s.vision_start, "tokens.vision_end_id": s.vision_end,
                "tokens.video_token_id": s.video_pad, "tokens.obj_traj_start_id": s.obj_traj_start,
                "tokens.obj_traj_end_id": s.obj_traj_end}

    # -- prompt and target --------------------------------------------------------
    def chat_ids(self, task: str = "scene_graph") -> tuple[list[int], list[int]]:
        """Ids of the prompt text before and after the object blocks (`chat_text`): the
        `prefix_ids` / `suffix_ids` of traser_jax.tokens.arrange."""
        head, tail = chat_text(task)
        return self.encode(head), self.encode(tail)

    def target_ids(self, payload: dict[str, Any], compact: bool = True) -> list[int]:
        """The answer: the canonical TRASER JSON, then <|im_end|> (the loss covers exactly these)."""
        return [*self.encode(serialize_target(payload, compact)), self.special.im_end]


def chat_text(task: str = "scene_graph") -> tuple[str, str]:
    """The prompt text before and after the object blocks (Qwen chat template, traser_jax.tokens)."""
    if task not in PROMPTS:
        raise TokenizerError(f"task {task!r} is not one of {sorted(PROMPTS)}")
    return chat_texts(PROMPTS[task], SYSTEM_MESSAGE)


def serialize_target(payload: dict[str, Any], compact: bool = True) -> str:
    """The canonical text of a TRASER output JSON (see the module docstring)."""
    return json.dumps(payload, separators=JSON_SEPARATORS if compact else None, ensure_ascii=True)


def load_tokenizer(path: str | Path) -> TraserTokenizer:
    """A tokenizer.json (file or the folder holding it), TRASER tokens added when missing."""
    return TraserTokenizer.from_file(path)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path | None = None,
              min_frequency: int = 2) -> TraserTokenizer:
    """A byte-level BPE (Qwen2 pre-tokenization) trained on `texts` (target JSONs, prompt
    texts, block labels), deterministic.

    The special tokens take ids 0..7 in SPECIAL_TOKENS order, then the 256 byte
    tokens, then merges up to `vocab_size` ids in all (fewer when the texts run out
    of pairs). Saved to `out_path` (a tokenizer.json path or a folder) when given."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise TokenizerError(f"vocab_size {vocab_size} is below {len(SPECIAL_TOKENS) + 256} "
                             "(special tokens + 256 byte tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False)
                                                  for t in SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Special tokens are never text: train on the pieces between them. A sorted list:
    # the merges must not depend on the order the caller's texts came in.
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    tok.train_from_iterator(sorted(p for t in texts for p in split.split(t) if p), trainer=trainer)
    out = TraserTokenizer(tok)
    if out_path is not None:
        out.save(out_path)
    return out
