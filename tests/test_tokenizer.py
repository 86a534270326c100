"""Tokenizer: toy BPE training (deterministic, fixed special ids), loading a Qwen-style
tokenizer.json, byte-level token strings, the chat prompt and the training target."""
import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from traser_jax.tokenizer import (PROMPTS, SPECIAL_TOKENS, SYSTEM_MESSAGE, TokenizerError, chat_text, load_tokenizer,
                                  serialize_target, train_bpe)

NAMES = ["person", "dog", "red ball", "blue cube", "café sign", 'say "hi"', "back\\slash"]


def random_payload(rng: random.Random, k: int, d: int) -> dict:
    objects = [{f"object {i + 1}": rng.choice(NAMES), "attributes": rng.sample(["red", "small", "striped"], 2)}
               for i in range(k)]
    rels = []
    for _ in range(rng.randint(0, 3) if k else 0):
        a = rng.randint(0, d)
        rels.append([rng.randint(1, k), rng.choice(["next to", "riding"]), rng.choice([-1, rng.randint(1, k)]),
                     [[a, rng.randint(a, d)]]])
    return {"objects": objects, "relationships": rels}


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    texts = [serialize_target(random_payload(rng, rng.randint(0, 12), 40)) for _ in range(150)]
    return texts + [t for task in PROMPTS for t in chat_text(task)]


@pytest.fixture(scope="module")
def toy(corpus):
    return train_bpe(corpus, 600)


def test_train_bpe_is_deterministic_with_fixed_special_ids(corpus, toy, tmp_path):
    again = train_bpe(list(reversed(corpus)), 600, out_path=tmp_path)
    assert again.tokenizer.to_str() == toy.tokenizer.to_str()
    assert [toy.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert 264 < toy.vocab_size <= 600
    assert not any("<|" in piece and piece not in SPECIAL_TOKENS for piece in toy.tokenizer.get_vocab())
    loaded = load_tokenizer(tmp_path)  # the folder holding tokenizer.json
    assert loaded.tokenizer.to_str() == toy.tokenizer.to_str()
    s = toy.special
    assert toy.token_config_overrides() == {
        "tokens.vision_start_id": s.vision_start, "tokens.vision_end_id": s.vision_end,
        "tokens.video_token_id": s.video_pad, "tokens.obj_traj_start_id": s.obj_traj_start,
        "tokens.obj_traj_end_id": s.obj_traj_end}


def test_token_bytes_round_trip_and_single_digits(corpus, toy):
    pieces = toy.token_bytes()
    assert all(pieces[i] is None for i in range(len(SPECIAL_TOKENS)))
    assert sorted(p for p in pieces if p is not None and len(p) == 1) == [bytes([b]) for b in range(256)]
    for text in corpus[:40] + ["naïve 東京 ✓ 0123456789"]:
        ids = toy.encode(text)
        assert toy.decode(ids) == text
        if "<|" not in text:
            assert b"".join(pieces[i] for i in ids) == text.encode()
    # Digits are single tokens: the grammar writes numbers one digit per token.
    for p in pieces:
        if p is not None and any(c in b"0123456789" for c in p):
            assert len(p) == 1, p


def test_qwen_style_tokenizer_gets_traser_tokens(tmp_path):
    # A tokenizer.json laid out like Qwen2's: BPE, Qwen specials after the vocabulary, no TRASER tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a person riding a horse"] * 3, trainer=trainer)
    base = tok.get_vocab_size()
    qwen = [t for t in SPECIAL_TOKENS if not t.startswith("<obj")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in qwen])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    assert loaded.special.im_start == base + qwen.index("<|im_start|>")
    assert (loaded.special.obj_traj_start, loaded.special.obj_traj_end) == (base + len(qwen), base + len(qwen) + 1)
    assert loaded.encode("<obj_traj_start>Object 1: <obj_traj_end>")[0] == loaded.special.obj_traj_start
    assert loaded.vocab_size == base + len(qwen) + 2


def test_bad_tokenizers_are_rejected(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "wl.json"))
    with pytest.raises(TokenizerError, match="ByteLevel"):
        load_tokenizer(tmp_path / "wl.json")
    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "bare.json"))
    with pytest.raises(TokenizerError, match="<\\|im_start\\|>"):
        load_tokenizer(tmp_path / "bare.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_bpe(["x"], 100)


def test_chat_prompt_layout(toy):
    head, tail = toy.chat_ids()
    blocks = [toy.special.obj_traj_start, *toy.encode("Object 1: "), toy.special.vision_start,
              toy.special.video_pad, toy.special.video_pad, toy.special.vision_end, toy.special.obj_traj_end]
    text = toy.decode(head + blocks + tail)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nOutput the Video Scene Graph from the video and object trajectories:\n"
                    "<obj_traj_start>Object 1: <|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
                    "<obj_traj_end>\n<|im_end|>\n<|im_start|>assistant\n")
    assert SYSTEM_MESSAGE == "You are a helpful assistant."
    assert head[0] == toy.special.im_start
    assert toy.special.im_end in head and toy.special.im_end in tail
    for task, prompt in PROMPTS.items():
        assert prompt in toy.decode(toy.chat_ids(task)[0])
    with pytest.raises(TokenizerError, match="task 'captions'"):
        chat_text("captions")


def test_target_is_canonical_json_then_im_end(toy):
    payload = {"objects": [{"object 1": "café", "attributes": ['a "red" one']}],
               "relationships": [[1, "looking at", -1, [[0, 2], [4, 5]]]]}
    ids = toy.target_ids(payload)
    assert ids[-1] == toy.special.im_end and toy.special.im_end not in ids[:-1]
    text = toy.decode(ids[:-1])
    assert text == ('{"objects":[{"object 1":"caf\\u00e9","attributes":["a \\"red\\" one"]}],'
                    '"relationships":[[1,"looking at",-1,[[0,2],[4,5]]]]}')
    assert json.loads(text) == payload
    assert serialize_target(payload, compact=False) == json.dumps(payload)
