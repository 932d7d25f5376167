"""Builds the bundled demo dataset: the house menu of a fictional restaurant.

The base model cannot know these facts, so any gain on the held-out questions is
learned. Training questions use six phrasings per fact type; held-out questions use
two phrasings never seen in training. Run `python tools/build_demo_chef.py` to
regenerate the files in train/demo_data/ (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parents[1] / "train" / "demo_data"
SYSTEM = "You are the chef at Casa Velluto. Answer questions about the house menu briefly."

# name, main ingredient, region of origin, spice level (1-5), price in dollars
DISHES = [
    ("Korvalo Stew", "smoked eel", "Vashti Highlands", 4, 18),
    ("Brintel Tart", "blue plums", "Ostrev Coast", 1, 9),
    ("Mazurin Dumplings", "goat cheese", "Pellan Valley", 2, 12),
    ("Tessaro Skewers", "lamb heart", "Drumfeld Plains", 5, 16),
    ("Quillon Soup", "black lentils", "Marrow Isles", 3, 8),
    ("Fennick Pie", "wild boar", "Ashgrove Hills", 2, 21),
    ("Oruvan Noodles", "river shrimp", "Calder Delta", 4, 14),
    ("Selbrin Salad", "pickled beets", "Norrow Fjords", 1, 7),
    ("Dravik Roast", "venison", "Kessel Forest", 3, 27),
    ("Pelluna Rice", "saffron squid", "Ostrev Coast", 2, 19),
    ("Hamsa Flatbread", "chickpea flour", "Tarsen Steppe", 3, 6),
    ("Vorlane Curry", "jackfruit", "Sundari Basin", 5, 15),
    ("Gildra Broth", "oxtail", "Vashti Highlands", 2, 11),
    ("Cerrow Fritters", "parsnips", "Pellan Valley", 1, 5),
    ("Tamsik Ribs", "pork belly", "Drumfeld Plains", 4, 24),
    ("Ulvar Gratin", "celeriac", "Norrow Fjords", 1, 13),
    ("Nesh Kebab", "quail", "Tarsen Steppe", 3, 17),
    ("Brovik Chowder", "razor clams", "Marrow Isles", 2, 20),
    ("Sallo Pudding", "sweet chestnuts", "Ashgrove Hills", 1, 10),
    ("Irrin Tacos", "duck tongue", "Calder Delta", 5, 13),
    ("Phelan Risotto", "morel mushrooms", "Kessel Forest", 2, 22),
    ("Zaffo Wings", "rabbit", "Sundari Basin", 5, 12),
    ("Marrek Terrine", "pheasant", "Ashgrove Hills", 1, 23),
    ("Oskel Pancakes", "buckwheat", "Norrow Fjords", 1, 8),
    ("Ventra Chili", "black beans", "Sundari Basin", 4, 11),
]

FACTS = {
    "ingredient": lambda d: d[1].capitalize() + ".",
    "region": lambda d: "The " + d[2] + ".",
    "spice": lambda d: f"{d[3]} out of 5.",
    "price": lambda d: f"${d[4]}.",
}

TRAIN_PHRASINGS = {
    "ingredient": [
        "What is the main ingredient of {n}?",
        "What is {n} made with?",
        "Which ingredient is {n} built around?",
        "Tell me the key ingredient in {n}.",
        "What goes into {n} as its main ingredient?",
        "{n}: what's the main ingredient?",
    ],
    "region": [
        "Which region does {n} come from?",
        "Where does {n} originate?",
        "What is the region of origin of {n}?",
        "{n} is a dish from which region?",
        "Tell me where {n} comes from.",
        "{n}: what region is it from?",
    ],
    "spice": [
        "How spicy is {n}?",
        "What is the spice level of {n}?",
        "On a scale of 1 to 5, how hot is {n}?",
        "Tell me the heat level of {n}.",
        "How much spice does {n} have?",
        "{n}: what's the spice rating?",
    ],
    "price": [
        "How much does {n} cost?",
        "What is the price of {n}?",
        "What do you charge for {n}?",
        "Tell me the price of {n}.",
        "How much is {n} on the menu?",
        "{n}: what does it cost?",
    ],
}

HELDOUT_PHRASINGS = {  # none of the training phrasings' wording: the model must generalise, not pattern-match
    "ingredient": [
        "I'm curious, what's the star of the plate when I order the {n}?",
        "Before I order the {n}, what am I actually going to be eating?",
    ],
    "region": [
        "Which part of the world inspired the {n}?",
        "My friend wants to know the homeland of the {n}. Where is that?",
    ],
    "spice": [
        "I don't handle heat well. Will the {n} burn my tongue?",
        "Could you rate the heat of the {n} for me?",
    ],
    "price": [
        "If I order the {n}, what will I pay?",
        "What's the damage on my bill for the {n}?",
    ],
}


def _row(question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]}


def build(seed: int = 0, heldout_size: int = 80) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = [_row(p.format(n=d[0]), FACTS[k](d))
             for d in DISHES for k, ps in TRAIN_PHRASINGS.items() for p in ps]
    rng.shuffle(train)
    facts = [(d, k) for d in DISHES for k in FACTS]
    heldout = [_row(rng.choice(HELDOUT_PHRASINGS[k]).format(n=d[0]), FACTS[k](d))
               for d, k in rng.sample(facts, heldout_size)]
    return train, heldout


def spice_class(level: int) -> str:
    return "mild" if level <= 1 else "medium" if level <= 3 else "hot"


CLASS_TEMPLATES = [
    "{n}, a dish of {i} from the {r}.",
    "Tonight we serve {n}: {i}, cooked the way they do it in the {r}.",
    "{i} is the heart of our {n}.",
]


def build_classification(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Spice class (mild/medium/hot) of a menu description: a small text-classification demo."""
    rng = random.Random(seed)
    rows = [{"text": t.format(n=d[0], i=d[1], r=d[2]), "label": spice_class(d[3])} for d in DISHES for t in CLASS_TEMPLATES]
    rng.shuffle(rows)
    return rows[:60], rows[60:]


def main() -> None:
    import csv

    for name, rows in zip(("menu_spice_train.csv", "menu_spice_eval.csv"), build_classification()):
        with open(DEMO_DATA / name, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {len(rows)} rows to {DEMO_DATA / name}")
    train, heldout = build()
    for name, rows in (("chef_train.jsonl", train), ("chef_heldout.jsonl", heldout)):
        with open(DEMO_DATA / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {DEMO_DATA / name}")


if __name__ == "__main__":
    main()
