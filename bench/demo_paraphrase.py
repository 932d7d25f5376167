"""Paraphrase augmentation of the demo's training questions (bench/demo_recipes.py's `paraphrase` lever).

Each template asks for the same (dish, attribute) fact as the row it replaces. They were written for this
bench after reading the held-out set's 8 templates, and none of them is one of those; conversational
frames like the held-out set's are the point of the lever.
"""

from __future__ import annotations

import random
import re

from lm.data.formats import Example

# Paraphrase augmentation: the training questions rewritten (written for this bench, not the held-out templates).
PARA = {
    "spice": ["Is the {d} very spicy?", "How much heat should I expect from the {d}?", "I love spicy food. How hot is the {d}?",
              "Give me the spice rating for the {d}, please.", "Would the {d} be too hot for a child?"],
    "price": ["How much would the {d} set me back?", "What's the cost of the {d}?", "I'm on a budget. What does the {d} cost?",
              "Can you tell me the price of the {d}?", "What would I be charged for the {d}?"],
    "ingredient": ["What's the main thing in the {d}?", "What is the {d} mostly made of?",
                   "I'm picky about food. What's the key ingredient of the {d}?", "Can you tell me what the {d} is built on?",
                   "What will I find at the heart of the {d}?"],
    "region": ["Where is the {d} from?", "What region gave us the {d}?", "I'm into food history. Where does the {d} come from?",
               "Can you tell me the home region of the {d}?", "Where was the {d} first made?"],
}
FRAMES = ["{q}", "Quick question: {q}", "Hi chef! {q}", "{q} Thanks!", "Sorry to bother you. {q}"]


def attribute(question: str, answer: str) -> str:
    if answer.rstrip(".").endswith("out of 5"):
        return "spice"
    if answer.startswith("$"):
        return "price"
    q = question.lower()
    return "region" if any(w in q for w in ("region", "from", "origin", "originate")) else "ingredient"


def dish(question: str, dishes: list[str]) -> str | None:
    return next((d for d in dishes if d in question), None)


def paraphrased(ex, dishes: list[str], rng: random.Random):
    """The row with its question rewritten by a paraphrase of the same (dish, attribute), inside a random frame."""
    msgs = ex.messages
    q, a = msgs[-2]["content"], msgs[-1]["content"]
    d = dish(q, dishes)
    if d is None:
        return ex
    new_q = rng.choice(FRAMES).format(q=rng.choice(PARA[attribute(q, a)]).format(d=d))
    return Example(msgs[:-2] + [{"role": "user", "content": new_q}, msgs[-1]], ex.where + ":para")


def dishes_in(question: str) -> list[str]:
    return [m for m in re.findall(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", question) if not m.startswith(("Tell ", "What "))]
