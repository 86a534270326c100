"""Grammar-constrained greedy decoding: every output is valid TRASER JSON for its video.

From random weights (random logits), with a token-budget per row down to the
shortest valid output, the jitted batched decoder must always close the JSON;
the same decoder without the constraint must not; and the jitted decoder must
equal a step-by-step host reference of the same machine (HostConstraint), with
a logits table and with the real Qwen2.5 decoder (modules/text.py) and its KV cache;
with `no_repeat_relations` too, and then a loopy logits table repeats far fewer relations.
"""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from data_gen import rle
from data_gen.record import Object, Record, Video, from_traser_json, sample_frame_indices
from traser_jax import constrained, decode
from traser_jax.config import TextConfig
from traser_jax.constrained import GrammarError, HostConstraint, compile_grammar
from traser_jax.modules.text import TextDecoder, init_cache
from traser_jax.tokenizer import PROMPTS, chat_text, serialize_target, train_bpe

MAX_CHARS = 12  # short strings so random outputs reach the relationships
NAMES = ["person", "dog", "red ball", "blue cube", "café", 'a "b"', "x\\y", "/"]


def random_payload(rng: random.Random, k: int, d: int) -> dict:
    objects = [{f"object {i + 1}": rng.choice(NAMES), "attributes": rng.sample(NAMES + ["striped"], rng.randint(0, 3))}
               for i in range(k)]
    rels = []
    for _ in range(rng.randint(0, 4) if k else 0):
        spans = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randint(0, d)
            spans.append([a, rng.randint(a, d)])
        subject, predicate = rng.randint(1, k), rng.choice(["next to", "riding", "looking at"])
        other = rng.randint(1, k)  # never the subject: the camera instead
        rels.append([subject, predicate, rng.choice([-1, other if other != subject else -1]), spans])
    return {"objects": objects, "relationships": rels}


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [serialize_target(random_payload(rng, rng.randint(0, 14), 130)) for _ in range(200)]
    return train_bpe(texts + [t for task in PROMPTS for t in chat_text(task)], 700)


@pytest.fixture(scope="module")
def grammar(tok):
    return compile_grammar(tok, max_chars=MAX_CHARS)


def template(k: int, d: int) -> Record:
    """A record with k visible objects (ids 10, 11, ...) and duration d + 0.5 s (span limit d)."""
    fps, h, w = 2.0, 4, 4
    num_frames = 2 * d + 1
    frames = sample_frame_indices(num_frames, fps)
    video = Video(id=f"k{k}d{d}", source="test", fps=fps, num_frames=num_frames, width=w, height=h,
                  frame_indices=frames, timestamps=[f / fps for f in frames])
    objects = []
    for i in range(k):
        masks = []
        for j in range(len(frames)):
            m = np.zeros((h, w), np.uint8)
            m[(i + j) % h, i % w] = 1
            masks.append(rle.encode(m))
        objects.append(Object(id=10 + i, name=f"thing{i}", attributes=[], masks=masks))
    return Record(video, objects, []).validate()


def check_output(text: str, k: int, d: int) -> None:
    """The text is TRASER JSON for k objects and span limit d, and lays onto the video as a valid record."""
    payload = json.loads(text)
    assert list(payload) == ["objects", "relationships"]
    for i, entry in enumerate(payload["objects"]):
        assert list(entry) == [f"object {i + 1}", "attributes"]
        name = entry[f"object {i + 1}"]
        assert isinstance(name, str) and name.strip() and len(name) <= MAX_CHARS
        assert all(isinstance(a, str) and a.strip() and len(a) <= MAX_CHARS for a in entry["attributes"])
    assert len(payload["objects"]) == k
    for s, pred, o, spans in payload["relationships"]:
        assert type(s) is int and 1 <= s <= k and type(o) is int and (o == -1 or 1 <= o <= k) and o != s
        assert isinstance(pred, str) and pred.strip() and len(pred) <= MAX_CHARS
        assert spans and all(type(a) is int and type(b) is int and 0 <= a <= b <= d for a, b in spans)
    rec = template(k, d)
    assert constrained.video_limits(rec) == (k, d)
    from_traser_json(payload, rec, strict=True).validate()


def is_valid(text: str, k: int, d: int) -> bool:
    try:
        check_output(text, k, d)
        return True
    except Exception:  # noqa: BLE001 - any failure means invalid
        return False


# -- the machine ------------------------------------------------------------------------

def test_table_is_small_and_compressed(grammar, tok):
    assert grammar.vocab_size == tok.vocab_size
    assert grammar.table.shape[0] == grammar.num_states < 150
    assert grammar.table.shape[1] < tok.vocab_size  # token classes
    assert grammar.nbytes() < 200_000
    assert grammar.min_new_tokens(0) < grammar.min_new_tokens(1) < grammar.min_new_tokens(12)


@pytest.mark.parametrize("compact", [True, False])
def test_canonical_targets_are_accepted(tok, compact):
    g = compile_grammar(tok, max_chars=MAX_CHARS, compact=compact)
    rng = random.Random(1)
    for case in range(60):
        k, d = rng.randint(0, 14), rng.randint(0, 130)
        payload = random_payload(rng, k, d)
        ids = tok.target_ids(payload, compact=compact)
        assert g.min_new_tokens(k) <= len(ids)
        machine = HostConstraint(g, k, d)
        for i, t in enumerate(ids):
            machine.advance(t, remaining=len(ids) - i)  # the exact budget suffices
        assert machine.finished, (case, tok.decode(ids))


OBJ1 = '{"objects":[{"object 1":"a","attributes":[]}'
REL = OBJ1 + '],"relationships":[[1,"r",-1,['


@pytest.mark.parametrize("text, k, d, offense", [
    ('{"objects":[{"object 2', 2, 5, "2"),  # objects must come 1..K in order
    (OBJ1 + "]", 2, 5, "]"),  # closing the list before object K
    (OBJ1 + ",{", 1, 5, ",{"),  # an object beyond K
    ('{"objects":[{"object 1":" a', 1, 5, " a"),  # a blank-led name
    ('{"objects":[{"object 1":""', 1, 5, '"'),  # an empty name
    ('{"objects":[{"object 1":"abcdefghijklm', 1, 5, "m"),  # a name over max_chars
    ('{"objects":[{"object 1":"é', 1, 5, "é"),  # raw non-ASCII (must be \\u00e9)
    (OBJ1 + '],"relationships":[[2', 1, 5, "2"),  # subject id > K
    (OBJ1 + '],"relationships":[[0', 1, 5, "0"),  # subject id 0
    (OBJ1 + '],"relationships":[[1,"r",-2', 1, 5, "2"),  # only -1 is negative
    (OBJ1 + '],"relationships":[[1,"r",1', 1, 5, "1"),  # an object related to itself
    ('{"objects":[{"object 1":"a","attributes":[]},{"object 2":"b","attributes":[]}],"relationships":[[2,"r",2',
     2, 5, "2"),  # the same with two objects
    (REL + "]", 1, 5, "]"),  # a relation without spans
    (REL + "[3,2", 1, 5, "2"),  # end < start
    (REL + "[3,6", 1, 5, "6"),  # end > D
    (REL + "[05", 1, 5, "5"),  # a leading zero
    ('{"objects":[],"relationships":[]} ', 0, 5, " "),  # anything but the end token after the JSON
])
def test_invalid_continuations_are_refused(tok, grammar, text, k, d, offense):
    """Walking the text's tokens, the machine refuses the token holding the offending character."""
    ids = tok.encode(text)
    machine = HostConstraint(grammar, k, d)
    consumed = 0
    with pytest.raises(GrammarError, match="not allowed"):
        for t in ids:
            machine.advance(t)
            consumed += len(tok.decode([t]))
    refused = len(tok.decode([ids[len(tok.encode(text[:consumed]))]]))
    assert consumed <= len(text) - len(offense) < consumed + refused, (text[:consumed], offense)


@pytest.mark.parametrize("compact", [True, False])
def test_device_candidates_equal_host_reference(tok, compact):
    """`candidates` (jnp, batched) = HostConstraint.step (Python, brute-force number bounds) in
    states reached by random valid walks, at random budgets."""
    grammar = compile_grammar(tok, max_chars=MAX_CHARS, compact=compact)
    rng = np.random.default_rng(2)
    g = grammar.device()
    fn = jax.jit(constrained.candidates)
    rows = []
    for _ in range(24):
        k, d = int(rng.integers(0, 13)), int(rng.integers(0, 120))
        machine = HostConstraint(grammar, k, d)
        for _ in range(int(rng.integers(0, 60))):
            allowed = np.flatnonzero(machine.allowed(10_000))
            if machine.finished:
                break
            machine.advance(int(rng.choice(allowed)))
        remaining = int(rng.integers(1, 40))
        rows.append((machine, k, d, remaining))
    ms = constrained.MachineState(*(jnp.asarray([getattr(m, f) for m, *_ in rows], jnp.int32)
                                    for f in ("state", "num", "span_start", "objects", "chars", "subject")))
    allowed_classes, after = fn(g, ms, *(jnp.asarray([r[i] for r in rows], jnp.int32) for i in (1, 2, 3)))
    allowed = np.asarray(allowed_classes)[:, grammar.token_class]  # classes -> tokens
    bias = np.asarray(jax.jit(constrained.token_bias)(g, allowed_classes))
    np.testing.assert_array_equal(bias == 0, allowed)
    assert (bias[~allowed] == -np.inf).all()
    after = [np.asarray(x) for x in after]
    for r, (machine, k, d, remaining) in enumerate(rows):
        host = [machine.step(t, remaining) for t in range(grammar.vocab_size)]
        np.testing.assert_array_equal(allowed[r], [h is not None for h in host], err_msg=f"row {r}")
        for t in np.flatnonzero(allowed[r]):
            assert tuple(int(x[r, grammar.token_class[t]]) for x in after) == host[t], (r, t)


# -- decoding ---------------------------------------------------------------------------------

MAX_NEW = 256


def table_model(vocab: int, batch: int, seed: int = 0, position_scale: float = 3.0):
    """Random logits from tables: f(position) + g(previous token) + h(row), exact in any order of ops."""
    rng = np.random.default_rng(seed)
    params = {"pos": jnp.asarray(rng.normal(size=(MAX_NEW + 1, vocab)) * position_scale, jnp.float32),
              "tok": jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32),
              "row": jnp.asarray(rng.normal(size=(batch, vocab)), jnp.float32)}

    def prefill(p, batch_inputs):
        return p["pos"][0] + p["row"][batch_inputs["rows"]], {"rows": batch_inputs["rows"]}

    def step(p, token, cache, position):
        return p["pos"][position + 1] + p["tok"][token] + p["row"][cache["rows"]], cache

    def host_logits(row, history):
        p = {k: np.asarray(v) for k, v in params.items()}
        return p["pos"][len(history)] + (p["tok"][history[-1]] if history else 0) + p["row"][row]

    return params, prefill, step, host_logits


def host_greedy(grammar, k, d, budget, logits_fn, penalty=1.05, no_repeat=False):
    """The reference: one token at a time, numpy logits, HostConstraint mask, HF repetition penalty; with
    `no_repeat`, a token closing a relation head (subject's first digit .. the token deciding the object id) as a
    copy of an earlier one (the same tokens before it, a closing token of the same class) is refused unless
    nothing else is allowed."""
    machine = HostConstraint(grammar, k, d)
    out: list[int] = []
    heads: list[tuple[int, ...]] = []
    start = -1  # where the open head starts in `out`
    slots = MAX_NEW // 5 + 1

    def closes(token):  # `token` decides the object id (the camera's "-", a last digit) or passes it
        nxt = machine.step(token, INF_BUDGET)
        state, num = nxt[0], nxt[1]
        last_digit = grammar.field[state] == constrained.OBJECT and grammar.nonempty[state] and num * 10 > k
        return start >= 0 and bool(grammar.object_decided[state] or last_digit)

    while len(out) < budget and not machine.finished:
        scores = logits_fn(out).astype(np.float32)
        seen = np.zeros(scores.shape, bool)
        seen[out] = True
        scores = np.where(seen, np.where(scores > 0, scores / np.float32(penalty), scores * np.float32(penalty)),
                          scores)
        allowed = machine.allowed(budget - len(out))
        if no_repeat and start >= 0:
            copies = {grammar.token_class[h[-1]] for h in heads
                      if len(h) <= constrained.HEAD_TOKENS and list(h[:-1]) == out[start:]}
            banned = np.asarray([bool(a) and grammar.token_class[t] in copies and closes(t)
                                 for t, a in enumerate(allowed)])
            if (allowed & ~banned).any():
                allowed &= ~banned
        token = int(np.argmax(np.where(allowed, scores, -np.inf)))
        state = machine.state
        closed = no_repeat and closes(token)
        machine.advance(token, budget - len(out))
        out.append(token)
        if grammar.field[state] == constrained.SUBJECT and not grammar.nonempty[state]:
            start = len(out) - 1
        if closed:
            if len(heads) < slots:
                heads.append(tuple(out[start:]))
            start = -1
    return out


INF_BUDGET = 1 << 20


def repeated_relations(text: str, k: int | None = None) -> int:
    """Relations of the output whose (subject, predicate, object) came before; with `k`, only those for which
    some other object id was still free (the subject's other objects and the camera)."""
    triples = [tuple(r[:3]) for r in json.loads(text)["relationships"]]
    count = 0
    for n, (s, p, o) in enumerate(triples):
        if (s, p, o) not in triples[:n]:
            continue
        used = {x for s2, p2, x in triples[:n] if (s2, p2) == (s, p)}
        count += k is None or bool({*range(1, k + 1), -1} - {s} - used)
    return count


@pytest.fixture(scope="module")
def random_batch(grammar):
    rng = np.random.default_rng(3)
    b = 48
    k = rng.integers(1, 5, b)
    k[8:12] = [0, 0, 6, 12]
    d = rng.integers(0, 40, b)
    need = np.asarray([grammar.min_new_tokens(int(x)) for x in k])
    budget = np.asarray([int(rng.integers(n, MAX_NEW + 1)) for n in need])
    budget[:8] = need[:8]  # the tightest budgets: the shortest valid output exactly
    return k, d, budget


@pytest.mark.parametrize("seed, position_scale, penalty", [(0, 3.0, 1.05), (2, 0.0, 1.0)])
def test_constrained_decoding_is_always_valid(tok, grammar, random_batch, seed, position_scale, penalty):
    """The second table loops on relations with spans from second 11 on, its budget nearly spent: a row stopped
    after a span's start "11" before a span's end was owed its start's digits (2026-11-26)."""
    k, d, budget = random_batch
    params, prefill, step, _ = table_model(grammar.vocab_size, len(k), seed, position_scale)
    constraint = decode.make_constraint(grammar, k, d, budget)
    out = decode.greedy_decode(step, prefill, params, {"rows": jnp.arange(len(k))}, jnp.zeros(len(k), jnp.int32),
                               constraint, MAX_NEW, end_id=tok.special.im_end, budget=jnp.asarray(budget),
                               repetition_penalty=penalty)
    lengths, tokens = np.asarray(out.lengths), np.asarray(out.tokens)
    assert np.asarray(out.finished).all()
    assert (lengths <= budget).all() and (lengths[:8] == budget[:8]).all()
    relations = 0
    for r, text in enumerate(decode.texts(tok, out)):
        assert tokens[r, lengths[r] - 1] == tok.special.im_end
        assert (tokens[r, lengths[r]:] == tok.special.im_end).all()  # padding after the end
        check_output(text, int(k[r]), int(d[r]))
        relations += len(json.loads(text)["relationships"])
    assert relations >= 10  # the outputs reach past the objects, not just the shortest close


def test_unconstrained_random_decoding_is_not_valid(tok, grammar, random_batch):
    k, d, budget = random_batch
    params, prefill, step, _ = table_model(grammar.vocab_size, len(k))
    out = decode.greedy_decode(step, prefill, params, {"rows": jnp.arange(len(k))}, jnp.zeros(len(k), jnp.int32),
                               None, MAX_NEW, end_id=tok.special.im_end, budget=jnp.asarray(budget))
    valid = [is_valid(text, int(k[r]), int(d[r])) for r, text in enumerate(decode.texts(tok, out))]
    assert not any(valid)


def test_jitted_decode_equals_host_reference(tok, grammar, random_batch):
    k, d, budget = random_batch
    params, prefill, step, host_logits = table_model(grammar.vocab_size, len(k))
    constraint = decode.make_constraint(grammar, k, d, budget)
    for penalty in (1.05, 1.0):
        out = decode.greedy_decode(step, prefill, params, {"rows": jnp.arange(len(k))}, jnp.zeros(len(k), jnp.int32),
                                   constraint, MAX_NEW, end_id=tok.special.im_end, budget=jnp.asarray(budget),
                                   repetition_penalty=penalty)
        for r in (0, 1, 8, 9, 10):  # two at the tightest budget
            ref = host_greedy(grammar, int(k[r]), int(d[r]), int(budget[r]), lambda h: host_logits(r, h), penalty)
            assert np.asarray(out.tokens)[r, :int(out.lengths[r])].tolist() == ref, (penalty, r)


def test_no_repeated_relations_equals_host_reference(tok, grammar, random_batch):
    """`no_repeat_relations`: the logits table loops on relations; with the flag a row repeats one only when
    no other object id is left for its subject and predicate, and the jitted decoder equals the host loop token
    for token."""
    k, d, budget = random_batch
    # without the position term, the next token depends on the last one alone: the relations loop
    params, prefill, step, host_logits = table_model(grammar.vocab_size, len(k), seed=2, position_scale=0.0)
    constraint = decode.make_constraint(grammar, k, d, budget)
    outs = {flag: decode.greedy_decode(step, prefill, params, {"rows": jnp.arange(len(k))},
                                       jnp.zeros(len(k), jnp.int32), constraint, MAX_NEW, end_id=tok.special.im_end,
                                       budget=jnp.asarray(budget), repetition_penalty=1.0, no_repeat_relations=flag)
            for flag in (False, True)}
    texts = {flag: decode.texts(tok, out) for flag, out in outs.items()}
    # Repeats written while another object id was free for the relation's subject and predicate (K < 10: a
    # longer id may start with a written one's digit): the flag leaves those whose earlier copy was tokenized
    # otherwise (1 of 22 here).
    free = {flag: sum(repeated_relations(text, int(k[r])) for r, text in enumerate(texts[flag]) if k[r] < 10)
            for flag in texts}
    assert free[False] >= 10 and free[True] * 10 <= free[False], free
    out = outs[True]
    assert np.asarray(out.finished).all()
    for r, text in enumerate(decode.texts(tok, out)):
        check_output(text, int(k[r]), int(d[r]))
    loopiest = np.argsort([repeated_relations(text) for text in texts[False]])[-4:]
    for r in [int(x) for x in loopiest] + [0, 10]:  # and a tight budget
        ref = host_greedy(grammar, int(k[r]), int(d[r]), int(budget[r]), lambda h: host_logits(r, h), 1.0,
                          no_repeat=True)
        assert np.asarray(out.tokens)[r, :int(out.lengths[r])].tolist() == ref, r
    with pytest.raises(ValueError, match="needs the grammar"):
        decode.greedy_decode(step, prefill, params, {"rows": jnp.arange(len(k))}, jnp.zeros(len(k), jnp.int32),
                             None, MAX_NEW, end_id=tok.special.im_end, no_repeat_relations=True)


def test_budget_below_the_shortest_output_is_refused(grammar):
    need = grammar.min_new_tokens(3)
    with pytest.raises(GrammarError, match=f"row 1: max_new_tokens {need - 1} is below {need}"):
        decode.make_constraint(grammar, [0, 3], [5, 5], [need, need - 1])


def test_qwen_decoder_with_kv_cache(tok, grammar):
    """The real decoder (random weights) through prefill + cached steps, right-padded prompts:
    valid outputs, equal to a host loop that reruns the whole sequence without a cache."""
    cfg = TextConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    model = TextDecoder(cfg)
    rng = np.random.default_rng(4)
    batch, prompt_len, max_new = 3, 9, 96
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 32)), jnp.zeros((1, 4), jnp.int32),
                            jnp.ones((1, 4), jnp.int32))["params"]

    def random_weight(path, x):  # without compiling init: normal(0.02), norm scales around 1
        is_norm = getattr(path[-1], "key", "") == "scale"
        return jnp.asarray(rng.normal(1.0 if is_norm else 0.0, 0.1 if is_norm else 0.02, x.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(random_weight, nn.meta.unbox(shapes))
    lengths = np.asarray([9, 6, 7])
    prompts = rng.integers(10, tok.vocab_size, (batch, prompt_len)).astype(np.int32)
    mask = np.arange(prompt_len)[None] < lengths[:, None]
    k, d = np.asarray([2, 0, 4]), np.asarray([7, 3, 30])
    budget = np.asarray([grammar.min_new_tokens(2) + 20, 40, grammar.min_new_tokens(4)])

    def embed(p, ids):
        return model.apply({"params": p}, ids, method=TextDecoder.embed)

    def prefill(p, inputs):
        cache = init_cache(cfg, batch, prompt_len + max_new)
        pos = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
        logits, cache = model.apply({"params": p}, embed(p, inputs["ids"]), pos, inputs["mask"], cache=cache,
                                    cache_index=0)
        return logits[jnp.arange(batch), inputs["lengths"] - 1], {"kv": cache, "index": jnp.int32(prompt_len)}

    def step(p, token, cache, position):
        logits, kv = model.apply({"params": p}, embed(p, token[:, None]), position[:, None],
                                 jnp.ones((batch, 1), jnp.int32), cache=cache["kv"], cache_index=cache["index"])
        return logits[:, 0], {"kv": kv, "index": cache["index"] + 1}

    constraint = decode.make_constraint(grammar, k, d, budget)
    out = decode.greedy_decode(step, prefill, params, {"ids": jnp.asarray(prompts), "mask": jnp.asarray(mask),
                                                       "lengths": jnp.asarray(lengths)},
                               jnp.asarray(lengths), constraint, max_new, end_id=tok.special.im_end,
                               budget=jnp.asarray(budget))
    assert np.asarray(out.finished).all()
    for r, text in enumerate(decode.texts(tok, out)):
        check_output(text, int(k[r]), int(d[r]))

    full = prompt_len + max_new

    @jax.jit
    def forward(ids, n):  # no cache: the whole sequence, logits at position n - 1
        pos = jnp.arange(full)[None]
        logits, _ = model.apply({"params": params}, embed(params, ids[None]), pos, (pos < n).astype(jnp.int32))
        return logits[0, n - 1]

    for r in range(batch):
        def logits_fn(history, r=r):
            seq = np.zeros(full, np.int32)
            seq[:lengths[r]] = prompts[r, :lengths[r]]
            seq[lengths[r]:lengths[r] + len(history)] = history
            return np.asarray(forward(jnp.asarray(seq), lengths[r] + len(history)))

        ref = host_greedy(grammar, int(k[r]), int(d[r]), int(budget[r]), logits_fn)
        assert np.asarray(out.tokens)[r, :int(out.lengths[r])].tolist() == ref, r


def test_span_limit_is_the_last_whole_second_inside_the_video():
    assert [constrained.span_limit(x) for x in (8.0, 7.6, 0.4)] == [8, 7, 0]
    with pytest.raises(GrammarError, match="duration must be positive"):
        constrained.span_limit(0.0)
