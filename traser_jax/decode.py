"""Batched greedy decoding with a KV cache, under one `jax.jit`, optionally grammar-constrained.

The model side is a protocol of two functions (the decoder with its cache lives in
traser_jax.modules.text; whoever builds inputs wraps it):

    prefill(params, batch) -> (logits [B, V] of the last prompt position, cache)
    step(params, token [B], cache, position [B]) -> (logits [B, V], cache)

`cache` is any pytree (the step may keep its write index in it). The step at loop
index i feeds the token chosen at i, at position `positions + i`; so the cache
must hold the prompt plus `max_new_tokens` slots.

Each step, as Hugging Face's greedy search with `repetition_penalty`: logits of
tokens already generated are divided by the penalty when positive and multiplied
when negative (only generated tokens count: TRASER generates from embeddings, where
HF's running `input_ids` start empty), then the grammar mask (traser_jax.constrained)
removes what would break the JSON or the budget (and, with `no_repeat_relations`,
a relation already written: `constrained.repeated_heads`), then argmax. The loop is a
`lax.while_loop` that stops when every row has finished or the budget is spent.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from traser_jax import constrained

PrefillFn = Callable[[Any, Any], tuple[jax.Array, Any]]
StepFn = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class Constraint(NamedTuple):
    """The grammar and each row's limits: K visible objects and D, the last span second."""
    grammar: constrained.DeviceGrammar
    num_objects: jax.Array  # [B] int32
    max_second: jax.Array  # [B] int32


class DecodeOutput(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens] int32; after a row ends: pad_id
    lengths: jax.Array  # [B] tokens generated, the end token included
    finished: jax.Array  # [B] the row produced its end token (constrained: reached the final state)


def make_constraint(grammar: constrained.Grammar, num_objects, max_second, budget) -> Constraint:
    """Host side: check every row's budget can hold a valid output, then the device arrays."""
    num_objects = np.asarray(num_objects, np.int32).reshape(-1)
    max_second = np.broadcast_to(np.asarray(max_second, np.int32), num_objects.shape)
    if (num_objects < 0).any() or (max_second < 0).any():
        raise ValueError(f"num_objects {num_objects.tolist()} and max_second {max_second.tolist()} must be >= 0")
    constrained.check_budget(grammar, num_objects.tolist(), budget)
    return Constraint(grammar.device(), jnp.asarray(num_objects), jnp.asarray(max_second))


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor on the tokens marked in `seen` [B, V]."""
    if penalty == 1.0:
        return logits
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def greedy_decode(step_fn: StepFn, prefill_fn: PrefillFn, params: Any, batch: Any, positions: jax.Array,
                  constraint: Constraint | None, max_new_tokens: int, *, end_id: int, pad_id: int | None = None,
                  repetition_penalty: float = 1.05, budget: jax.Array | None = None,
                  no_repeat_relations: bool = False) -> DecodeOutput:
    """Greedy decoding of a batch; jitted, with the functions, sizes and ids static (pass
    the same step/prefill function objects to reuse the compiled loop).

    positions: [B] int32, the position of the first generated token (each row's
    prompt length with right padding). budget: optional [B] int32 <= max_new_tokens,
    a smaller token budget per row (the grammar closes the JSON within it). no_repeat_relations: refuse
    to close a relation head (subject, predicate, object) a row has written already (needs `constraint`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if no_repeat_relations and constraint is None:
        raise ValueError("no_repeat_relations needs the grammar constraint (it reads the relations' structure)")
    positions = jnp.asarray(positions, jnp.int32)
    budget = (jnp.full(positions.shape, max_new_tokens, jnp.int32) if budget is None
              else jnp.minimum(jnp.asarray(budget, jnp.int32), max_new_tokens))
    return _decode(step_fn, prefill_fn, params, batch, positions, constraint, budget, max_new_tokens=max_new_tokens,
                   end_id=int(end_id), pad_id=int(end_id if pad_id is None else pad_id),
                   repetition_penalty=float(repetition_penalty), no_repeat_relations=bool(no_repeat_relations))


@partial(jax.jit, static_argnames=("step_fn", "prefill_fn", "max_new_tokens", "end_id", "pad_id",
                                   "repetition_penalty", "no_repeat_relations"))
def _decode(step_fn, prefill_fn, params, batch, positions, constraint, budget, *, max_new_tokens, end_id, pad_id,
            repetition_penalty, no_repeat_relations):
    logits, cache = prefill_fn(params, batch)
    b, v = logits.shape
    rows = jnp.arange(b)
    g = constraint.grammar if constraint is not None else None
    machine = constrained.initial_state(g, b) if g is not None else None
    memory = constrained.relation_memory(b, max_new_tokens) if no_repeat_relations else None

    def cond(carry):
        i, done = carry[0], carry[-1]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, machine, memory, seen, tokens, lengths, done = carry
        scores = apply_repetition_penalty(logits.astype(jnp.float32), seen, repetition_penalty)
        if g is not None:
            allowed, after = constrained.candidates(g, machine, constraint.num_objects, constraint.max_second,
                                                    budget - i)
            if memory is not None:
                closes = constrained.closes_head(g, memory, after, constraint.num_objects)
                allowed = constrained.without(allowed, constrained.repeated_heads(g, memory, tokens, i, closes))
            scores = scores + constrained.token_bias(g, allowed)
        tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        if memory is not None:
            closed = jnp.take_along_axis(closes, g.token_class[tok][:, None], axis=1)[:, 0]
            memory = constrained.remember(g, memory, machine.state, closed, i, ~done)
        if g is not None:
            chosen = constrained.take(g, after, tok)
            machine = jax.tree.map(lambda new, old: jnp.where(done, old, new), chosen, machine)
            ended = machine.state == g.final
        else:
            ended = tok == end_id
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        seen = seen.at[rows, tok].set(seen[rows, tok] | ~done)
        lengths = jnp.where(done, lengths, i + 1)
        finished = done | ended | (i + 1 >= budget)
        logits, cache = step_fn(params, tok, cache, positions + i)
        return i + 1, logits, cache, machine, memory, seen, tokens, lengths, finished

    carry = (jnp.int32(0), logits, cache, machine, memory, jnp.zeros((b, v), bool),
             jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
    _, _, _, machine, _, _, tokens, lengths, _ = jax.lax.while_loop(cond, body, carry)
    if g is not None:
        finished = machine.state == g.final
    else:
        finished = jnp.any((tokens == end_id) & (jnp.arange(max_new_tokens)[None] < lengths[:, None]), axis=1)
    return DecodeOutput(tokens, lengths, finished)


def texts(tokenizer: Any, out: DecodeOutput) -> list[str]:
    """Each row's generated text, special tokens (the end token) left out."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokenizer.decode(tokens[r, :lengths[r]].tolist(), skip_special_tokens=True) for r in range(len(tokens))]
