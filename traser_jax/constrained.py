"""Grammar-constrained greedy decoding: TRASER output JSON that is always valid.

The released TRASER sometimes stops mid-JSON at the token limit or writes invalid
JSON. Here every decoding step masks the logits with a token-level state machine,
so greedy decoding can only produce

    {"objects":[{"object 1":"<name>","attributes":["<attr>",...]},...],
     "relationships":[[s,"<predicate>",o,[[a,b],...]],...]}<|im_end|>

in the canonical compact style of `traser_jax.tokenizer.serialize_target`
(or json.dumps' default ", " / ": " style with compact=False), where, per video:
- the objects are exactly "object 1" .. "object K", in order (K = the visible
  objects of the input, `Record.visible_objects()`);
- subject ids are in 1..K, object ids in 1..K or -1 (the camera), never the
  relation's own subject (no object is related to itself; toyworld never does it);
- a span [a, b] has integers 0 <= a <= b <= D, D = floor(duration in seconds)
  (`span_limit`): the largest whole second `Record.validate` accepts, and what
  `data_gen.record.to_traser_json` writes for spans inside the video; every
  relation has at least one span;
- strings (names, attributes, predicates) are printable ASCII with JSON escapes
  (\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX: non-ASCII text is written \\uXXXX, as
  ensure_ascii=True does), start with a non-space character (so a name or
  predicate is never blank), and hold at most `max_chars` characters, an escape
  counting as one;
- numbers have no leading zeros and no sign except the camera's -1;
- the output ends with the end token once the JSON closes, and always within the
  token budget: a move is allowed only if the JSON can still be closed in the
  tokens left (see "Budget" below), so truncation cannot happen.

Design
------
A character-level machine (states for the JSON skeleton, 7 per string kind, 2 per
number field: 111 states compact, 125 spaced) is compiled against the tokenizer's
byte strings into one dense table `table[state, token_class]` (int32; -1 =
forbidden) whose entries pack the next state and what the token did on the way:
it ended a number, opened an object, closed the objects list, and how many string
characters it added. Per-video quantities (K, D) and the few unbounded counts live
in six int32 registers per row instead of in the states:

    num   the number being written (-1: none yet)   a     the current span's start
    nobj  objects opened so far                      slen  characters of the open string
    subj  the current relation's subject id

so one table serves every video and a batch shares it. A decode step is

    packed = table[state]                                   # [B, C] gather
    ok     = packed >= 0 & register checks & budget check    # elementwise, per class
    tok    = argmax(logits + where(ok, 0, -inf)[:, token_class])   # then the registers move

with no host round trip (`candidates`, `token_bias`, `take`). Numbers are written
one digit per token, as Qwen2's pre-tokenizer (and `train_bpe`) splits digits; a
token that mixes a number's digits with other characters is never allowed where a
number is written (inside strings digits are ordinary characters).

Budget: `upper_bound(state, registers)` is the token count of a fixed way to close
the JSON from there (shortest paths over the table, computed on the host, plus the
digits and objects the registers still require). It is exact for that strategy and
drops by one along it, so allowing a token only when upper_bound(next) <= tokens
left - 1 keeps a valid close always reachable. With K = 1 a relation's object can only be the
camera, "-1", a token more than a digit: the states of a relation before its object
(`owes_object`) count it. A span's end is at least its start, so a start being written owes
the end the start's extra digits too (before 2026-11-26 it did not: a start of 10 or more written
with the budget nearly spent could leave the end no room). Every row's budget must cover
`min_new_tokens(K)` (that strategy from the start), checked on the host.

Memory: table S x C int32 plus token_class [V] int32. Tokens that act alike in
every state (and digits, one class each) share a class. A 4k-vocab toy BPE: the
dense S x V table would be 111 x 4096 x 4 B = 1.8 MB; with classes it is 170
columns, 0.09 MB in all (measured, compiled in 0.6 s). The 151,936-token Qwen vocab: dense 67 MB (built on the
host in chunks while compiling, never sent to the device); on device the class
table (a few hundred to a few thousand columns: string-content tokens differ only
in length and first character) is 0.2-2 MB plus 0.6 MB of token_class, and a step
costs one [B, C] computation and one [B, V] gather. Measured on CPU with a
synthetic 151,936-token vocabulary: compile 6-10 s (tokens with the same byte
classes are walked once), 405 classes, 0.8 MB; a constrained greedy step at B = 8
took the same time as an unconstrained one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

INF = 1 << 28

# Number fields: the object key "object N", relation subject and object ids, span start and end.
KEY, SUBJECT, OBJECT, SPAN_START, SPAN_END = range(5)
FIELD_NAMES = ("object key", "subject id", "object id", "span start", "span end")

# What a token did on its way (bits of the packed entry).
EV_NUM_EXIT = 1  # it ended a number (always at its first character)
EV_OBJ_OPEN = 2  # it opened an object of the objects list
EV_OBJS_CLOSE = 4  # it closed the objects list

_STATE_BITS, _EVENT_SHIFT, _CONT_SHIFT, _FIRST_SHIFT, _LAST_SHIFT = 12, 12, 15, 16, 24
MAX_STATES = 1 << _STATE_BITS
MAX_CHARS_LIMIT = 127  # slen counts fit 7 bits in the packed entry

_DIGITS = b"0123456789"
_HEX = b"0123456789abcdefABCDEF"
_CONTENT = bytes(b for b in range(0x20, 0x7F) if b not in b'"\\')  # printable ASCII, bare in a JSON string
_CONTENT_NO_SPACE = _CONTENT.replace(b" ", b"")


class GrammarError(ValueError):
    pass


# -- the character-level machine ------------------------------------------------------

class _CharMachine:
    """States and byte edges of the output grammar; each edge may carry an event and add string chars."""

    def __init__(self):
        self.names: list[str] = []
        self.in_string: list[bool] = []
        self.string_start: list[bool] = []
        self.field: list[int] = []  # number field written in this state, -1 if none
        self.nonempty: list[bool] = []  # a number state with at least one digit
        self.pending: list[int] = []  # number field whose digits are still owed (its empty state and the way to it)
        self.owes_object: list[bool] = []  # a relation's states before its object id is written
        self.object_decided: list[bool] = []  # a relation's states one token reaches once its object id is decided
        self.edges: dict[tuple[int, int], tuple[int, int, int]] = {}

    def state(self, name: str, *, in_string=False, string_start=False, field=-1, nonempty=False,
              pending=-1) -> int:
        self.names.append(name)
        self.in_string.append(in_string)
        self.string_start.append(string_start)
        self.field.append(field)
        self.nonempty.append(nonempty)
        self.pending.append(field if (field >= 0 and not nonempty) else pending)
        self.owes_object.append(False)
        self.object_decided.append(False)
        return len(self.names) - 1

    def edge(self, src: int, chars: bytes | str, dst: int, event: int = 0, add: int = 0) -> None:
        for b in (chars.encode() if isinstance(chars, str) else chars):
            if (src, b) in self.edges:
                raise AssertionError(f"grammar: two edges on {chr(b)!r} from {self.names[src]}")
            self.edges[(src, b)] = (dst, event, add)

    def lit(self, src: int, text: str, end: int | None = None, pending: int = -1) -> int:
        """A fixed text from `src`; returns its last state (`end` if given)."""
        cur = src
        for i, ch in enumerate(text):
            last = i == len(text) - 1
            nxt = end if (last and end is not None) else self.state(f"{self.names[src]}+{text[:i + 1]}",
                                                                    pending=pending)
            self.edge(cur, ch, nxt)
            cur = nxt
        return cur

    def number(self, field: int) -> tuple[int, int]:
        empty = self.state(f"#{FIELD_NAMES[field]}", field=field)
        full = self.state(f"#{FIELD_NAMES[field]}+", field=field, nonempty=True)
        self.edge(empty, _DIGITS, full)
        self.edge(full, _DIGITS, full)
        return empty, full

    def string(self, kind: str) -> tuple[int, int]:
        """(start state, state after the closing quote) of a JSON string."""
        kw = dict(in_string=True)
        start = self.state(f'"{kind}', string_start=True, **kw)
        body = self.state(f'"{kind}~', **kw)
        esc0 = self.state(f'"{kind}\\first', **kw)
        esc = self.state(f'"{kind}\\', **kw)
        hexes = [self.state(f'"{kind}\\u{i}', **kw) for i in range(4)]
        after = self.state(f'"{kind}"')
        self.edge(start, _CONTENT_NO_SPACE, body, add=1)
        self.edge(start, "\\", esc0, add=1)  # first char escaped: only \" \\ \/ (never blank)
        self.edge(esc0, '"\\/', body)
        self.edge(body, _CONTENT, body, add=1)
        self.edge(body, "\\", esc, add=1)  # an escape counts one char, at its backslash
        self.edge(body, '"', after)
        self.edge(esc, '"\\/bfnrt', body)
        self.edge(esc, "u", hexes[0])
        for i in range(3):
            self.edge(hexes[i], _HEX, hexes[i + 1])
        self.edge(hexes[3], _HEX, body)
        return start, after


@dataclass
class _Skeleton:
    machine: _CharMachine
    start: int
    list_open: int  # after '{"objects":['
    after_object: int  # after an object's '}'
    done: int  # after the final '}'
    final: int  # after the end token


def _build_machine(compact: bool) -> _Skeleton:
    item = "," if compact else ", "
    key = ":" if compact else ": "
    m = _CharMachine()
    start = m.state("start")
    list_open = m.lit(start, '{"objects"' + key + "[")
    obj = m.state("{object", pending=KEY)
    after_object = m.state("object}")
    m.edge(list_open, "{", obj, EV_OBJ_OPEN)
    separator = m.lit(after_object, item)
    m.edge(separator, "{", obj, EV_OBJ_OPEN)

    key_empty, key_full = m.number(KEY)
    m.lit(obj, '"object ', end=key_empty, pending=KEY)
    after_key = m.state('key"')
    m.edge(key_full, '"', after_key, EV_NUM_EXIT)
    name_start, name_end = m.string("name")
    m.lit(after_key, key + '"', end=name_start)
    attrs_open = m.lit(name_end, item + '"attributes"' + key + "[")
    attr_start, attr_end = m.string("attribute")
    attrs_closed = m.state("attributes]")
    m.edge(attrs_open, '"', attr_start)
    m.edge(attrs_open, "]", attrs_closed)
    m.lit(attr_end, item + '"', end=attr_start)
    m.edge(attr_end, "]", attrs_closed)
    m.edge(attrs_closed, "}", after_object)

    objects_closed = m.state("objects]")
    m.edge(list_open, "]", objects_closed, EV_OBJS_CLOSE)
    m.edge(after_object, "]", objects_closed, EV_OBJS_CLOSE)
    rels_open = m.lit(objects_closed, item + '"relationships"' + key + "[")
    rels_closed = m.state("relationships]")
    m.edge(rels_open, "]", rels_closed)

    subj_empty, subj_full = m.number(SUBJECT)
    m.edge(rels_open, "[", subj_empty)
    pred_start, pred_end = m.string("predicate")
    _exit_then(m, subj_full, item, '"', end=pred_start)
    head = list(range(subj_empty, len(m.names)))  # subject, predicate and the way between
    obj_empty, obj_full = m.number(OBJECT)
    before = len(m.names)
    m.lit(pred_end, item, end=obj_empty, pending=OBJECT)
    for s in [*head, obj_empty, *range(before, len(m.names))]:
        m.owes_object[s] = True
    camera = m.lit(obj_empty, "-1")
    obj_comma = m.state("object id,")
    m.edge(obj_full, item[0], obj_comma, EV_NUM_EXIT)
    m.edge(camera, item[0], obj_comma)
    spans_open = m.lit(obj_comma, item[1:] + "[")
    sa_empty, sa_full = m.number(SPAN_START)
    m.edge(spans_open, "[", sa_empty)
    # The camera's "-" decides the object (only "1" follows); one token from an object id reaches at most the
    # first digit of its spans.
    for s in [camera - 1, camera, obj_comma, *range(obj_comma + 1, sa_empty + 1)]:
        m.object_decided[s] = True
    sb_empty, sb_full = m.number(SPAN_END)
    _exit_then(m, sa_full, item, "", end=sb_empty, pending=SPAN_END)
    span_closed = m.state("span]")
    m.edge(sb_full, "]", span_closed, EV_NUM_EXIT)
    m.lit(span_closed, item + "[", end=sa_empty)
    spans_closed = m.state("spans]")
    m.edge(span_closed, "]", spans_closed)
    rel_closed = m.state("relation]")
    m.edge(spans_closed, "]", rel_closed)
    before = len(m.names)
    m.lit(rel_closed, item + "[", end=subj_empty)  # a next relation, owed once its separator is written
    for s in range(before, len(m.names)):
        m.owes_object[s] = True
    m.edge(rel_closed, "]", rels_closed)
    done = m.state("done")
    m.edge(rels_closed, "}", done)
    final = m.state("final")
    return _Skeleton(m, start, list_open, after_object, done, final)


def _exit_then(m: _CharMachine, number_state: int, item: str, rest: str, end: int, pending: int = -1) -> None:
    """The item separator ending a number (its first char carries EV_NUM_EXIT), then `rest`, to `end`."""
    tail = item[1:] + rest
    if not tail:
        m.edge(number_state, item[0], end, EV_NUM_EXIT)
        return
    mid = m.state(f"{m.names[number_state]}{item[0]}", pending=pending)
    m.edge(number_state, item[0], mid, EV_NUM_EXIT)
    m.lit(mid, tail, end=end, pending=pending)


# -- compiling against a vocabulary -----------------------------------------------------

def _char_tables(m: _CharMachine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(m.names)
    nxt = np.full((n, 256), -1, np.int32)
    event = np.zeros((n, 256), np.int32)
    add = np.zeros((n, 256), np.int32)
    for (src, b), (dst, ev, a) in m.edges.items():
        nxt[src, b], event[src, b], add[src, b] = dst, ev, a
    return nxt, event, add


def _byte_classes(m: _CharMachine) -> bytes:
    """A translation table byte -> class: bytes the machine treats alike (every edge, digit or not) share one."""
    char_next, char_event, char_add = _char_tables(m)
    classes: dict[bytes, int] = {}
    out = bytearray(256)
    for b in range(256):
        key = char_next[:, b].tobytes() + char_event[:, b].tobytes() + char_add[:, b].tobytes() + bytes([b in _DIGITS])
        out[b] = classes.setdefault(key, len(classes))
    return bytes(out)


def _walk_tokens(m: _CharMachine, token_bytes: Sequence[bytes | None], max_chars: int) -> np.ndarray:
    """Packed entries [S, V]: every token walked from every state at once (numpy, chunks of tokens).

    Rules beyond the byte edges: in a number state a digit is allowed only as a whole
    one-character token (the registers see digits one token at a time), and a token
    dies once a string it writes passes `max_chars`. Tokens whose bytes fall in the
    same byte classes act alike, so one of each is walked."""
    classes = _byte_classes(m)
    shapes: dict[bytes, int] = {}  # class string -> representative row
    rep_of = np.full(len(token_bytes), -1, np.int64)
    reps: list[bytes] = []
    for i, t in enumerate(token_bytes):
        if t:
            rep_of[i] = shapes.setdefault(t.translate(classes), len(shapes))
            if rep_of[i] == len(reps):
                reps.append(t)
    walked = _walk(m, reps, max_chars)
    packed = np.full((len(m.names), len(token_bytes)), -1, np.int32)
    has = rep_of >= 0
    packed[:, has] = walked[:, rep_of[has]]
    return packed


def _walk(m: _CharMachine, tokens: Sequence[bytes], max_chars: int) -> np.ndarray:
    char_next, char_event, char_add = _char_tables(m)
    in_string = np.asarray(m.in_string)
    is_number = np.asarray(m.field) >= 0
    is_digit = np.zeros(256, bool)
    is_digit[list(_DIGITS)] = True
    n_states = len(m.names)
    packed = np.full((n_states, len(tokens)), -1, np.int32)
    ids = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    chunk = max(256, 2_000_000 // n_states)
    for lo in range(0, len(ids), chunk):
        part = ids[lo:lo + chunk]
        lens = np.asarray([len(tokens[i]) for i in part])
        text = np.zeros((len(part), lens.max()), np.int32)
        for r, i in enumerate(part):
            text[r, :lens[r]] = np.frombuffer(tokens[i], np.uint8)
        shape = (n_states, len(part))
        cur = np.broadcast_to(np.arange(n_states)[:, None], shape).copy()
        started = in_string[cur]
        alive = np.ones(shape, bool)
        events = np.zeros(shape, np.int32)
        chars = np.zeros(shape, np.int32)  # characters of the string being written
        opened = np.zeros(shape, bool)  # that string was opened by this token
        left = np.zeros(shape, bool)  # the token closed the string it started in
        first = np.zeros(shape, np.int32)  # characters it added to that string
        for j in range(lens.max()):
            act = alive & (lens > j)[None, :]
            byte = np.broadcast_to(text[:, j][None, :], shape)
            nxt = char_next[cur, byte]
            split_digit = is_number[cur] & is_digit[byte] & ((j > 0) | (lens != 1)[None, :])
            ok = act & (nxt >= 0) & ~split_digit
            alive &= ok | ~act
            nxt = np.where(ok, nxt, cur)
            events |= np.where(ok, char_event[cur, byte], 0)
            was_in, now_in = in_string[cur], in_string[nxt]
            enter, leave = ok & ~was_in & now_in, ok & was_in & ~now_in
            chars = np.where(enter, 0, chars) + np.where(ok, char_add[cur, byte], 0)
            opened |= enter
            closes_first = leave & ~opened
            first = np.where(closes_first, chars, first)
            left |= closes_first
            opened &= ~leave
            chars = np.where(leave, 0, chars)
            alive &= chars <= max_chars
            cur = nxt
        cont = started & ~left
        first = np.where(cont, chars, first)
        last = np.where(~cont & in_string[cur], chars, 0)
        entry = (cur | (events << _EVENT_SHIFT) | (cont.astype(np.int32) << _CONT_SHIFT)
                 | (first << _FIRST_SHIFT) | (last << _LAST_SHIFT))
        packed[:, part] = np.where(alive, entry, -1)
    return packed


def _unique_columns(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct columns [R, C], class of each column [V]): columns grouped by a 64-bit hash, then checked."""
    weights = np.random.default_rng(0).integers(1, 2 ** 62, packed.shape[0], dtype=np.uint64)
    keys = (packed.astype(np.uint64) * weights[:, None]).sum(axis=0)
    _, first, token_class = np.unique(keys, return_index=True, return_inverse=True)
    table = np.ascontiguousarray(packed[:, first])
    if not np.array_equal(table[:, token_class], packed):
        raise AssertionError("column hash collision")  # astronomically unlikely; fail loudly, never silently
    return table, token_class.astype(np.int32).reshape(-1)


def _unpack(entry: np.ndarray) -> tuple[np.ndarray, ...]:
    """(next state, events, continues the open string, chars added to it, chars of a new open string)."""
    e = np.maximum(entry, 0)
    return (e & (MAX_STATES - 1), (e >> _EVENT_SHIFT) & 7, (e >> _CONT_SHIFT) & 1, (e >> _FIRST_SHIFT) & 0xFF,
            (e >> _LAST_SHIFT) & 0x7F)


def _shortest(n: int, src: np.ndarray, dst: np.ndarray, target: int) -> np.ndarray:
    """Token counts to reach `target` over the edges src -> dst (Bellman-Ford, unit weights)."""
    dist = np.full(n, INF, np.int64)
    dist[target] = 0
    for _ in range(n + 1):
        new = dist.copy()
        np.minimum.at(new, src, dist[dst] + 1)
        if np.array_equal(new, dist):
            break
        dist = new
    return np.minimum(dist, INF).astype(np.int32)


@dataclass
class Grammar:
    """The TRASER output grammar compiled for one vocabulary (host numpy arrays).

    `device()` gives the jit-ready arrays; `min_new_tokens(K)` the budget K objects need."""
    table: np.ndarray  # [S, C] int32 packed entries, -1 = forbidden
    token_class: np.ndarray  # [V] int32
    digit_value: np.ndarray  # [V] int32: 0..9 for the one-digit tokens, else -1
    class_digit: np.ndarray  # [C] the same per class (a digit token is alone in its class)
    field: np.ndarray  # [S] number field written in the state, -1 if none
    nonempty: np.ndarray  # [S] a number state holding a digit
    pending: np.ndarray  # [S] number field still owed on the way (empty number states included)
    owes_object: np.ndarray  # [S] a relation's states before its object id
    object_decided: np.ndarray  # [S] a relation's states one token reaches once its object id is decided
    in_string: np.ndarray  # [S]
    string_start: np.ndarray  # [S]
    base: np.ndarray  # [S] tokens to the end, opening no object
    dist_object: np.ndarray  # [S] tokens to just after this object's '}', opening no object
    dist_open: np.ndarray  # [S] tokens to just after the next object's '}', opening exactly one
    start: int
    final: int
    done: int
    after_object: int
    end_id: int
    max_chars: int
    compact: bool
    cycle: int  # tokens of one more object from after_object back to it (one key digit)
    names: list[str]

    @property
    def num_states(self) -> int:
        return self.table.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.token_class.shape[0]

    def nbytes(self) -> int:
        """Bytes of the arrays a decode step reads (table, token_class, class_digit)."""
        return sum(getattr(self, k).nbytes for k in ("table", "token_class", "class_digit"))

    def entry(self, state: int, token: int) -> int:
        return int(self.table[state, self.token_class[token]])

    def min_new_tokens(self, num_objects: int) -> int:
        """The token budget a row with K objects needs (end token included): the closing
        strategy's length from the start, about the shortest valid output."""
        return HostConstraint(self, num_objects, 0).upper_bound(self.start, -1, 0, 0, 0)

    def device(self) -> "DeviceGrammar":
        i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
        return DeviceGrammar(
            table=i32(self.table), token_class=i32(self.token_class), class_digit=i32(self.class_digit),
            field=i32(self.field), nonempty=jnp.asarray(self.nonempty), pending=i32(self.pending),
            owes_object=jnp.asarray(self.owes_object), object_decided=jnp.asarray(self.object_decided),
            in_string=jnp.asarray(self.in_string), base=i32(self.base),
            dist_object=i32(self.dist_object),
            dist_open=i32(self.dist_open), start=i32(self.start), final=i32(self.final),
            max_chars=i32(self.max_chars), cycle=i32(self.cycle), base_after_object=i32(self.base[self.after_object]))


def compile_grammar(tokenizer: Any, max_chars: int = 100, compact: bool = True) -> Grammar:
    """The grammar for a `traser_jax.tokenizer.TraserTokenizer` (its end token: <|im_end|>)."""
    return compile_tokens(tokenizer.token_bytes(), tokenizer.special.im_end, max_chars, compact)


def compile_tokens(token_bytes: Sequence[bytes | None], end_id: int, max_chars: int = 100,
                   compact: bool = True) -> Grammar:
    """The grammar for a vocabulary given as the bytes of each id (None: a special token, never text)."""
    if not 1 <= max_chars <= MAX_CHARS_LIMIT:
        raise GrammarError(f"max_chars must be in [1, {MAX_CHARS_LIMIT}], got {max_chars}")
    if not 0 <= end_id < len(token_bytes) or token_bytes[end_id] is not None:
        raise GrammarError(f"end_id {end_id} must be a special token of the vocabulary (size {len(token_bytes)})")
    sk = _build_machine(compact)
    m = sk.machine
    n = len(m.names)
    assert n <= MAX_STATES
    packed = _walk_tokens(m, token_bytes, max_chars)
    packed[:, end_id] = -1
    packed[sk.done, end_id] = sk.final
    packed[sk.final, end_id] = sk.final  # finished rows stay put
    digit_value = np.full(len(token_bytes), -1, np.int32)
    for i, t in enumerate(token_bytes):
        if t is not None and len(t) == 1 and t in _DIGITS:
            digit_value[i] = t[0] - ord("0")
    # Each digit its own class, so the device works on classes only ([B, C], not [B, V]).
    columns, token_class = _unique_columns(np.vstack([packed, digit_value[None]]))
    table, class_digit = np.ascontiguousarray(columns[:-1]), columns[-1].copy()

    # The edges a closing strategy may take: all but those adding characters to a
    # string that may already be full (closing it first is always possible).
    in_string, string_start = np.asarray(m.in_string), np.asarray(m.string_start)
    src, cls = np.nonzero(table >= 0)
    dst, events, _, first, _ = _unpack(table[src, cls])
    keep = ~(in_string[src] & ~string_start[src] & (first > 0))
    src, dst, events = src[keep], dst[keep], events[keep]
    opens = (events & EV_OBJ_OPEN) > 0
    base = _shortest(n, src[~opens], dst[~opens], sk.final)
    dist_object = _shortest(n, src[~opens], dst[~opens], sk.after_object)
    dist_open = np.full(n, INF, np.int64)
    for _ in range(n + 1):
        new = dist_open.copy()
        np.minimum.at(new, src[~opens], dist_open[dst[~opens]] + 1)
        np.minimum.at(new, src[opens], dist_object[dst[opens]].astype(np.int64) + 1)
        if np.array_equal(new, dist_open):
            break
        dist_open = new
    dist_open = np.minimum(dist_open, INF).astype(np.int32)
    if max(base[sk.start], dist_open[sk.start], dist_open[sk.after_object]) >= INF:
        raise GrammarError("this vocabulary cannot spell the TRASER JSON (a needed character has no token)")
    return Grammar(
        table=table, token_class=token_class, digit_value=digit_value, class_digit=class_digit,
        field=np.asarray(m.field, np.int32), nonempty=np.asarray(m.nonempty), pending=np.asarray(m.pending, np.int32),
        owes_object=np.asarray(m.owes_object), object_decided=np.asarray(m.object_decided), in_string=in_string,
        string_start=string_start, base=base,
        dist_object=dist_object, dist_open=dist_open,
        start=sk.start, final=sk.final, done=sk.done, after_object=sk.after_object, end_id=end_id,
        max_chars=max_chars, compact=compact, cycle=int(dist_open[sk.after_object]), names=list(m.names))


# -- per-video limits -------------------------------------------------------------------

def span_limit(duration: float) -> int:
    """The largest span second D of a video: floor(duration) (Record.validate allows spans up to it)."""
    if not (duration > 0 and math.isfinite(duration)):
        raise GrammarError(f"video duration must be positive, got {duration!r}")
    return int(math.floor(duration))


def video_limits(record: Any) -> tuple[int, int]:
    """(K, D) of a record: its visible objects (TRASER's numbering) and span_limit(duration)."""
    return len(record.visible_objects()), span_limit(record.video.duration)


def check_budget(grammar: Grammar, num_objects: Sequence[int], budget: Sequence[int] | int) -> None:
    """Raise when a row's token budget is below `Grammar.min_new_tokens` of its K."""
    budgets = np.broadcast_to(np.asarray(budget), (len(num_objects),))
    for row, (k, b) in enumerate(zip(num_objects, budgets)):
        need = grammar.min_new_tokens(int(k))
        if int(b) < need:
            raise GrammarError(f"row {row}: max_new_tokens {int(b)} is below {need}, the tokens a valid output "
                               f"needs for num_objects={int(k)}")


# -- on device ------------------------------------------------------------------------------

class DeviceGrammar(NamedTuple):
    table: jax.Array  # [S, C]
    token_class: jax.Array  # [V]
    class_digit: jax.Array  # [C]
    field: jax.Array  # [S]
    nonempty: jax.Array  # [S]
    pending: jax.Array  # [S]
    owes_object: jax.Array  # [S]
    object_decided: jax.Array  # [S]
    in_string: jax.Array  # [S]
    base: jax.Array  # [S]
    dist_object: jax.Array  # [S]
    dist_open: jax.Array  # [S]
    start: jax.Array  # []
    final: jax.Array
    max_chars: jax.Array
    cycle: jax.Array
    base_after_object: jax.Array


class MachineState(NamedTuple):
    """Per row: the grammar state and the five registers (all int32 [B], or [B, V] for candidates)."""
    state: jax.Array
    num: jax.Array  # the number being written, -1 before its first digit
    span_start: jax.Array  # the current span's start second
    objects: jax.Array  # objects opened so far
    chars: jax.Array  # characters of the open string
    subject: jax.Array  # the current relation's subject id (0 before the first)


def initial_state(g: DeviceGrammar, batch: int) -> MachineState:
    z = jnp.zeros((batch,), jnp.int32)
    return MachineState(z + g.start, z - 1, z, z, z, z)


def _ndigits(x):
    return 1 + sum((x >= 10 ** k).astype(jnp.int32) for k in range(1, 10))


def _bounds(field, objects, span_start, num_objects, max_second):
    """[lo, hi] of a number field given the registers."""
    lo = jnp.select([field == KEY, field == SPAN_START, field == SPAN_END], [objects, 0, span_start], 1)
    hi = jnp.select([field == KEY, (field == SPAN_START) | (field == SPAN_END)], [objects, max_second], num_objects)
    return lo, hi


def _digits_to_finish(p, lo, hi, excluded):
    """Fewest digits to append to the prefix p >= 0 for a number in [lo, hi] other than `excluded`
    (INF if none).

    Appending j digits spans [p 10^j, (p + 1) 10^j - 1], which meets [lo, hi] iff
    lo // 10^j <= p <= hi // 10^j (then p 10^j <= hi: no overflow); a leading 0 takes no
    more digits. The meeting range must not be `excluded` alone."""
    out = jnp.full(jnp.broadcast_shapes(p.shape, lo.shape, hi.shape, excluded.shape), INF, jnp.int32)
    for j in reversed(range(10)):
        meets = (p >= lo // 10 ** j) & (p <= hi // 10 ** j) & (p >= 0) & ((p > 0) | (j == 0))
        first = jnp.maximum(lo, jnp.where(meets, p, 0) * 10 ** j)
        last = jnp.minimum(hi, jnp.where(meets, p, 0) * 10 ** j + (10 ** j - 1))
        out = jnp.where(meets & ~((first == last) & (first == excluded)), j, out)
    return out


def _digit_sum(n):
    """Total digits of 1..n (n >= 0)."""
    return sum(jnp.maximum(n - 10 ** (d - 1) + 1, 0) for d in range(1, 10))


def upper_bound(g: DeviceGrammar, state, num, span_start, objects, subject, num_objects, max_second):
    """Tokens of the fixed closing strategy from (state, registers), end token included; INF if stuck."""
    def more_objects(first):  # objects first..K, each from after_object back to it
        count = num_objects - first + 1
        return jnp.where(count > 0, count * (g.cycle - 1) + _digit_sum(num_objects) - _digit_sum(first - 1), 0)

    inside = g.dist_object[state] < INF
    core = jnp.where(num_objects - objects <= 0, g.base[state],
                     jnp.where(inside, g.dist_object[state] + more_objects(objects + 1),
                               g.dist_open[state] + _ndigits(objects + 1) - 1 + more_objects(objects + 2))
                     + g.base_after_object)
    nonempty = g.nonempty[state]
    field = jnp.where(nonempty, g.field[state], g.pending[state])
    lo, hi = _bounds(field, objects, span_start, num_objects, max_second)
    owed = jnp.where(lo <= hi, _ndigits(lo) - 1, INF)
    excluded = jnp.where(field == OBJECT, subject, -1)  # never a relation's own subject
    finish = _digits_to_finish(num, lo, hi, excluded)
    extra = jnp.where(nonempty, finish, jnp.where(field >= 0, owed, 0))
    # A span's end is at least its start: finishing a start of n digits owes the end n - 1 digits past its first.
    extra += jnp.where(nonempty & (field == SPAN_START) & (finish < INF), _ndigits(num) + finish - 1, 0)
    extra += (g.owes_object[state] & (num_objects == 1)).astype(jnp.int32)  # the camera's "-1"
    return jnp.minimum(jnp.minimum(core, INF) + extra, INF)


def candidates(g: DeviceGrammar, ms: MachineState, num_objects, max_second, remaining):
    """Which token classes each row may take now, and the machine state after each.

    ms: [B] arrays; num_objects (K), max_second (D), remaining (tokens left including
    this one): int32 [B]. Returns (allowed bool [B, C], MachineState of [B, C]): all
    the work is per token class; `token_bias` spreads the verdict over the V tokens."""
    packed = g.table[ms.state]  # [B, C]
    allowed = packed >= 0
    e = jnp.maximum(packed, 0)
    nxt = e & (MAX_STATES - 1)
    events = (e >> _EVENT_SHIFT) & 7
    cont = ((e >> _CONT_SHIFT) & 1) == 1
    first, last = (e >> _FIRST_SHIFT) & 0xFF, (e >> _LAST_SHIFT) & 0x7F
    col = lambda x: x[:, None]  # noqa: E731
    num, a, objects, chars = col(ms.num), col(ms.span_start), col(ms.objects), col(ms.chars)
    k, d = col(num_objects), col(max_second)
    field = col(g.field[ms.state])
    lo, hi = _bounds(field, objects, a, k, d)

    digit = g.class_digit[None, :]
    digit_move = (field >= 0) & (digit >= 0)  # the table allows digits in number states only as whole tokens
    allowed &= ~digit_move | (num != 0)  # no digit after a leading 0
    exits = (events & EV_NUM_EXIT) > 0
    allowed &= ~exits | ((num >= lo) & (num <= hi) & ((field != OBJECT) | (num != col(ms.subject))))
    opens = (events & EV_OBJ_OPEN) > 0
    allowed &= ~opens | (objects < k)
    allowed &= ((events & EV_OBJS_CLOSE) == 0) | (objects == k)
    allowed &= ~col(g.in_string[ms.state]) | (chars + first <= g.max_chars)

    shape = packed.shape
    new = MachineState(
        state=jnp.where(allowed, nxt, col(ms.state)),
        num=jnp.where(digit_move, jnp.where(num < 0, digit, num * 10 + digit), -1),
        span_start=jnp.broadcast_to(jnp.where(exits & (field == SPAN_START), num, a), shape),
        objects=jnp.broadcast_to(objects + opens, shape),
        chars=jnp.where(cont, chars + first, last),
        subject=jnp.broadcast_to(jnp.where(exits & (field == SUBJECT), num, col(ms.subject)), shape))
    ub = upper_bound(g, new.state, new.num, new.span_start, new.objects, new.subject, k, d)
    allowed &= ub <= col(remaining) - 1
    return allowed, new


def token_bias(g: DeviceGrammar, allowed: jax.Array) -> jax.Array:
    """float32 [B, V]: 0 where the token's class is allowed, -inf elsewhere (add it to the logits).

    XLA would fuse the whole per-class computation of `allowed` into this per-token
    gather and redo it for each of the V tokens (measured 8x slower per step on CPU
    at V = 151,936; optimization_barrier is dropped before fusion). A conditional is a
    fusion boundary, so `allowed` is computed once; its predicate is always true but
    read from the data so the compiler cannot fold it away. An additive float mask
    gathers and reduces faster than a boolean one."""
    bias = jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.float32)
    bias = jax.lax.cond(g.token_class[0] >= 0, lambda x: x, lambda x: x + 0.0, bias)
    return jnp.take(bias, g.token_class, axis=1)


def take(g: DeviceGrammar, after: MachineState, tokens: jax.Array) -> MachineState:
    """The [B] machine state after each row's chosen token, from `candidates`' [B, C] states."""
    cls = g.token_class[tokens][:, None]
    return MachineState(*(jnp.take_along_axis(x, cls, axis=1)[:, 0] for x in after))


# -- no relation twice -------------------------------------------------------------------------
# A relation's head is its subject, predicate and object id: the generated tokens from the subject's first
# digit through the token that decides the object id (its last digit, or the camera's "-"). Decoding may refuse
# the tokens that would close a head equal, token for token, to one the row has written (a small model loops on
# a relation otherwise). It never refuses a row's last allowed tokens: once a subject and predicate are written
# whose every object id the row has used, the repeat is written, and the output stays valid. Heads compare as
# token sequences: the same text tokenized otherwise is not caught (greedy decoding mostly writes a text the
# same way each time; on the demo's held-out videos no repeat got through with another object id free).

HEAD_TOKENS = 32  # longer heads (a predicate of about 25 tokens or more) are never compared


class RelationMemory(NamedTuple):
    """Per row, the relation heads written so far, as spans of the generated tokens."""
    start: jax.Array  # [B] where the open head starts, -1 when none is open
    head_start: jax.Array  # [B, R]
    head_len: jax.Array  # [B, R]
    count: jax.Array  # [B] heads stored (at most R)


def relation_memory(batch: int, max_new_tokens: int) -> RelationMemory:
    slots = max_new_tokens // 5 + 1  # a relation takes at least 5 tokens: 3 numbers, a predicate, an object id
    z = jnp.zeros((batch,), jnp.int32)
    return RelationMemory(z - 1, jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch, slots), jnp.int32), z)


def closes_head(g: DeviceGrammar, memory: RelationMemory, after: MachineState, num_objects) -> jax.Array:
    """bool [B, C]: the classes that close the open head: they decide the object id (the camera's "-", a digit no
    id goes on from) or pass it."""
    state = after.state
    last_digit = (g.field[state] == OBJECT) & g.nonempty[state] & (after.num * 10 > num_objects[:, None])
    return (memory.start[:, None] >= 0) & (g.object_decided[state] | last_digit)


def repeated_heads(g: DeviceGrammar, memory: RelationMemory, tokens: jax.Array, i, closes: jax.Array) -> jax.Array:
    """bool [B, C]: the classes that would close the open head as a copy of a stored one.

    tokens: [B, T] generated so far (positions < i); closes: `closes_head`."""
    b, slots = memory.head_start.shape
    rows, j, last = jnp.arange(b), jnp.arange(HEAD_TOKENS), tokens.shape[1] - 1
    length = i - memory.start  # tokens of the open head so far
    current = jnp.take_along_axis(tokens, jnp.clip(memory.start[:, None] + j, 0, last), axis=1)  # [B, H]
    stored = tokens[rows[:, None, None], jnp.clip(memory.head_start[:, :, None] + j, 0, last)]  # [B, R, H]
    same = jnp.all((stored == current[:, None]) | (j >= length[:, None, None]), axis=-1)
    match = (same & (memory.head_len == length[:, None] + 1) & (memory.head_len <= HEAD_TOKENS)
             & (jnp.arange(slots) < memory.count[:, None]) & (memory.start[:, None] >= 0))
    closing = tokens[rows[:, None], jnp.clip(memory.head_start + length[:, None], 0, last)]  # each copy's last token
    banned = jnp.zeros(closes.shape, jnp.int32).at[rows[:, None], g.token_class[closing]].max(match.astype(jnp.int32))
    return closes & (banned > 0)


def without(allowed: jax.Array, banned: jax.Array) -> jax.Array:
    """`allowed` less `banned`, except in rows where that leaves nothing."""
    kept = allowed & ~banned
    return jnp.where(kept.any(axis=-1, keepdims=True), kept, allowed)


def remember(g: DeviceGrammar, memory: RelationMemory, before: jax.Array, closed: jax.Array, i,
             active: jax.Array) -> RelationMemory:
    """The memory after step i's tokens: a subject's first digit (taken in the subject's empty state, which
    allows digits only) opens a head; a token that `closed` it stores it. before: [B] states before the step."""
    b, slots = memory.head_start.shape
    rows = jnp.arange(b)
    opens = active & (g.field[before] == SUBJECT) & ~g.nonempty[before]
    store = active & closed & (memory.count < slots)
    slot = jnp.minimum(memory.count, slots - 1)
    put = lambda table, value: table.at[rows, slot].set(jnp.where(store, value, table[rows, slot]))  # noqa: E731
    return RelationMemory(
        start=jnp.where(opens, i, jnp.where(active & closed, -1, memory.start)),
        head_start=put(memory.head_start, memory.start), head_len=put(memory.head_len, i + 1 - memory.start),
        count=memory.count + store)


# -- host reference ----------------------------------------------------------------------------

class HostConstraint:
    """The same machine for one row in plain Python (a reference for tests and for checking texts).

    Independent of the device code: bounds on numbers are checked by brute force over
    the decimal strings of [lo, hi], one token at a time."""

    def __init__(self, grammar: Grammar, num_objects: int, max_second: int):
        self.g, self.k, self.d = grammar, int(num_objects), int(max_second)
        self.state, self.num, self.span_start, self.objects, self.chars, self.subject = grammar.start, -1, 0, 0, 0, 0

    @property
    def finished(self) -> bool:
        return self.state == self.g.final

    def _range(self, field: int, span_start: int, objects: int, subject: int) -> list[int]:
        if field == KEY:
            return [objects]
        if field == SUBJECT:
            return list(range(1, self.k + 1))
        if field == OBJECT:
            return [v for v in range(1, self.k + 1) if v != subject]
        return list(range(0 if field == SPAN_START else span_start, self.d + 1))

    def _digits_to_finish(self, prefix: str, values: list[int]) -> int:
        ends = [len(str(v)) - len(prefix) for v in values if str(v).startswith(prefix)]
        return min(ends) if ends else INF

    def upper_bound(self, state: int, num: int, span_start: int, objects: int, subject: int) -> int:
        g, k = self.g, self.k

        def more(first: int) -> int:
            return sum(g.cycle - 1 + len(str(n)) for n in range(first, k + 1))

        if k - objects <= 0:
            core = int(g.base[state])
        elif g.dist_object[state] < INF:
            core = int(g.dist_object[state]) + more(objects + 1) + int(g.base[g.after_object])
        else:
            core = int(g.dist_open[state]) + len(str(objects + 1)) - 1 + more(objects + 2) + int(g.base[g.after_object])
        if g.nonempty[state]:
            values = self._range(int(g.field[state]), span_start, objects, subject)
            extra = self._digits_to_finish(str(num), values)
            if g.field[state] == SPAN_START and extra < INF:  # the span's end: as many digits as its start
                extra += min(len(str(v)) for v in values if str(v).startswith(str(num))) - 1
        elif g.pending[state] >= 0:
            values = self._range(int(g.pending[state]), span_start, objects, subject)
            if values:
                extra = len(str(values[0])) - 1
            else:  # no id at all, or only the camera's (counted below)
                extra = 0 if g.pending[state] == OBJECT else INF
        else:
            extra = 0
        if g.owes_object[state] and not any(o != s for s in range(1, k + 1) for o in range(1, k + 1)):
            extra += 1  # every relation's object is the camera, "-1": a token more than a one-digit id
        return min(min(core, INF) + extra, INF)

    def step(self, token: int, remaining: int) -> tuple[int, int, int, int, int, int] | None:
        """The next (state, num, span_start, objects, chars, subject), or None if the token is not allowed."""
        g = self.g
        entry = g.entry(self.state, token)
        if entry < 0:
            return None
        nxt, events, cont, first, last = (int(x) for x in _unpack(np.asarray(entry)))
        field = int(g.field[self.state])
        num, span_start, objects, subject = -1, self.span_start, self.objects, self.subject
        if field >= 0 and g.digit_value[token] >= 0:
            text = ("" if self.num < 0 else str(self.num)) + str(int(g.digit_value[token]))
            if text.startswith("0") and len(text) > 1:
                return None
            num = int(text)
        if events & EV_NUM_EXIT:
            if self.num not in self._range(field, self.span_start, self.objects, self.subject):
                return None
            if field == SPAN_START:
                span_start = self.num
            if field == SUBJECT:
                subject = self.num
        if events & EV_OBJ_OPEN:
            if self.objects >= self.k:
                return None
            objects += 1
        if events & EV_OBJS_CLOSE and self.objects != self.k:
            return None
        if g.in_string[self.state] and self.chars + first > g.max_chars:
            return None
        chars = self.chars + first if cont else last
        if self.upper_bound(nxt, num, span_start, objects, subject) > remaining - 1:
            return None
        return nxt, num, span_start, objects, chars, subject

    def allowed(self, remaining: int) -> np.ndarray:
        return np.asarray([self.step(t, remaining) is not None for t in range(self.g.vocab_size)])

    def advance(self, token: int, remaining: int = INF) -> None:
        out = self.step(token, remaining)
        if out is None:
            raise GrammarError(f"token {token} is not allowed in state {self.g.names[self.state]!r} "
                               f"(registers num={self.num}, span_start={self.span_start}, objects={self.objects}, "
                               f"chars={self.chars}, subject={self.subject}; {remaining} tokens left)")
        self.state, self.num, self.span_start, self.objects, self.chars, self.subject = out
