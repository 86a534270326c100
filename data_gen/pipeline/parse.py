"""Stage 5: each description -> {name, uncertain, attributes} through an LLM with a strict JSON schema."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from data_gen.pipeline.config import ParseConfig
from data_gen.pipeline.llm import LLMClient, MalformedReply

PARSE_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "uncertain": {"type": "boolean"},
        "attributes": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "uncertain", "attributes"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You turn a description of one object into a short structured label. Return JSON with: "
    "\"name\": the object's category as a short lowercase noun phrase (e.g. \"person\", \"red car\" is wrong, "
    "\"car\" is right); \"uncertain\": true when the description hedges about what the object is; "
    "\"attributes\": purely visual attributes stated in the description (color, material, texture, pattern, "
    "shape, size, state), each a short lowercase phrase, no duplicates, no actions, no relations to other objects.")


@dataclass
class ParsedObject:
    name: str
    uncertain: bool
    attributes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _normalize(parsed: dict) -> ParsedObject:
    name = " ".join(parsed["name"].split()).lower()
    if not name:
        raise MalformedReply("the name is empty")
    attributes: list[str] = []
    for a in parsed["attributes"]:
        a = " ".join(a.split()).lower()
        if a and a not in attributes:
            attributes.append(a)
    return ParsedObject(name=name, uncertain=bool(parsed["uncertain"]), attributes=attributes)


def parse_description(llm: LLMClient, cfg: ParseConfig, description: str) -> ParsedObject:
    return llm.complete_json(
        "parse", model=cfg.model, schema_name="object_label", schema=PARSE_SCHEMA,
        messages=[{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": f"Description: {description}"}],
        temperature=cfg.temperature, max_tokens=cfg.max_tokens, check=_normalize)


def parse_descriptions(llm: LLMClient, cfg: ParseConfig, descriptions: dict[int, str],
                       threads: int = 8) -> dict[int, ParsedObject]:
    """Stage 5 on one video: {object id: parsed label}. Each distinct description is parsed once: two
    identical requests in flight together would both miss the response cache and both be paid for."""
    texts = sorted(set(descriptions.values()))
    if not texts:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(texts)))) as pool:
        parsed = dict(zip(texts, pool.map(lambda text: parse_description(llm, cfg, text), texts)))
    return {i: parsed[descriptions[i]] for i in sorted(descriptions)}
