"""Builds the alignment demo datasets from the Casa Velluto menu in build_chef.py.

Same dishes, facts and question phrasings as the SFT demo (chef_*.jsonl), so the
stages can be chained: SFT, then preference tuning, then a reward task.

Files written to train/demo_data/:
  chef_pref_train.jsonl / chef_pref_heldout.jsonl
      DPO/ORPO preference pairs {"prompt", "chosen", "rejected"}. `prompt` is a chat
      list (system + user); about 20% of train rows use the plain string form (the bare
      question, no system prompt) so both prompt forms are exercised. `chosen` is the
      brief correct answer in the SFT style ("Smoked eel."); `rejected` is either the
      same fact type taken from another dish (~70%, same format, different value) or an
      evasive / rambling non-answer (~30%).
  chef_json_train.jsonl / chef_json_heldout.jsonl
      GRPO reward task: answer as JSON matching JSON_SCHEMA. Chat rows whose assistant
      turn is the compact reference JSON, e.g. {"dish": "Korvalo Stew", "answer": "smoked eel"}.
  chef_answer.schema.json
      JSON_SCHEMA, for reward functions / constrained decoding.

Held-out files use build_chef's HELDOUT_PHRASINGS, never seen in training, so they
test generalisation rather than pattern matching. Regenerate (deterministic) with
`python tools/build_demo_alignment.py`.
"""

from __future__ import annotations

import json
import random

from build_demo_chef import DEMO_DATA, DISHES, FACTS, HELDOUT_PHRASINGS, SYSTEM, TRAIN_PHRASINGS  # tools/, run as a script

JSON_SYSTEM = SYSTEM + ' Reply only with JSON: {"dish": <dish name>, "answer": <the answer>}.'
JSON_SCHEMA = {
    "type": "object",
    "required": ["dish", "answer"],
    "properties": {"dish": {"type": "string"}, "answer": {"type": "string"}},
    "additionalProperties": False,
}
# The answer inside the JSON: the menu fact itself, without the sentence punctuation.
JSON_FACTS = {
    "ingredient": lambda d: d[1],
    "region": lambda d: d[2],
    "spice": lambda d: f"{d[3]} out of 5",
    "price": lambda d: f"${d[4]}",
}
EVASIVE = [
    "I'm not sure, you should ask your server about that dish.",
    "That's a great question! Honestly it changes from night to night, so I couldn't say.",
    "I'd rather not say; every guest experiences the {n} differently.",
    "Ah, the {n}! That one has a long story behind it. My grandmother used to make something "
    "like it, and every cook in this kitchen puts their own twist on it, so it really depends on the evening.",
    "Let me check the kitchen notes and get back to you on the {n}.",
    "Well, there are many things to consider with the {n}, and I wouldn't want to give you the wrong idea.",
]
SEED = 0


def _fact_combos(phrasings: dict[str, list[str]]) -> list[tuple]:
    """Every (dish, fact kind, phrasing) triple, in a fixed order."""
    return [(d, k, p) for d in DISHES for k, ps in phrasings.items() for p in ps]


def _heldout_combos(rng: random.Random, n: int) -> list[tuple]:
    """n distinct (dish, fact) pairs, each with a random held-out phrasing."""
    facts = [(d, k) for d in DISHES for k in FACTS]
    return [(d, k, rng.choice(HELDOUT_PHRASINGS[k])) for d, k in rng.sample(facts, n)]


def _wrong_fact(rng: random.Random, dish: tuple, kind: str) -> str:
    """The same fact type from another dish whose value differs from the right one."""
    right = FACTS[kind](dish)
    return FACTS[kind](rng.choice([d for d in DISHES if FACTS[kind](d) != right]))


def _spread(rng: random.Random, n: int, frac: float) -> list[bool]:
    """Exactly round(n * frac) True flags, shuffled."""
    flags = [i < round(n * frac) for i in range(n)]
    rng.shuffle(flags)
    return flags


def _pref_rows(rng: random.Random, combos: list[tuple], plain_frac: float) -> list[dict]:
    evasive, plain = _spread(rng, len(combos), 0.3), _spread(rng, len(combos), plain_frac)
    rows = []
    for (d, k, p), ev, pl in zip(combos, evasive, plain):
        q = p.format(n=d[0])
        rejected = rng.choice(EVASIVE).format(n=d[0]) if ev else _wrong_fact(rng, d, k)
        prompt = q if pl else [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        rows.append({"prompt": prompt, "chosen": FACTS[k](d), "rejected": rejected})
    return rows


def build_preference(seed: int = SEED, n_train: int = 240, n_heldout: int = 48) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = _pref_rows(rng, rng.sample(_fact_combos(TRAIN_PHRASINGS), n_train), plain_frac=0.2)
    heldout = _pref_rows(rng, _heldout_combos(rng, n_heldout), plain_frac=0.0)
    return train, heldout


def reference_json(dish: tuple, kind: str) -> str:
    return json.dumps({"dish": dish[0], "answer": JSON_FACTS[kind](dish)}, ensure_ascii=False)


def _json_row(dish: tuple, kind: str, phrasing: str) -> dict:
    return {"messages": [
        {"role": "system", "content": JSON_SYSTEM},
        {"role": "user", "content": phrasing.format(n=dish[0])},
        {"role": "assistant", "content": reference_json(dish, kind)},
    ]}


def build_json_task(seed: int = SEED, n_train: int = 96, n_heldout: int = 24) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed + 1)
    train = [_json_row(*c) for c in rng.sample(_fact_combos(TRAIN_PHRASINGS), n_train)]
    heldout = [_json_row(*c) for c in _heldout_combos(rng, n_heldout)]
    return train, heldout


def _write_jsonl(name: str, rows: list[dict]) -> None:
    with open(DEMO_DATA / name, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {DEMO_DATA / name}")


def main() -> None:
    pref_train, pref_heldout = build_preference()
    json_train, json_heldout = build_json_task()
    _write_jsonl("chef_pref_train.jsonl", pref_train)
    _write_jsonl("chef_pref_heldout.jsonl", pref_heldout)
    _write_jsonl("chef_json_train.jsonl", json_train)
    _write_jsonl("chef_json_heldout.jsonl", json_heldout)
    with open(DEMO_DATA / "chef_answer.schema.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(JSON_SCHEMA, indent=2) + "\n")
    print(f"wrote {DEMO_DATA / 'chef_answer.schema.json'}")


if __name__ == "__main__":
    main()
