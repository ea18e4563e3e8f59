"""A procedurally generated arithmetic word-problem task: seeded, as many problems as wanted, exact answers.

Each problem comes from one of the templates below (written for mechsafe) with names, objects and numbers
drawn by a seeded generator; its *solution* spells out each operation and ends with ``The answer is N.``, so
a model fine-tuned on the solutions learns a format whose last number is the answer (exact-match accuracy
reads it with :func:`mechsafe.evaluation.metrics.last_number`). Problems take one or two operations on
small whole numbers; every answer is a non-negative integer.

Splits: a problem's split (``train`` or ``test``, 80/20) is a fixed function of its question text, so a
question never appears in both, whatever the seed or the number of problems asked for::

    train = arithmetic_problems(2000, split="train", seed=0)
    test = arithmetic_problems(200, split="test", seed=0)
    train[0]  -> {"id": "arith-...", "question": "...", "solution": "... The answer is 42.", "answer": 42,
                  "template": "packs-used"}
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable

from mechsafe.errors import MechsafeError

NAMES = ("Ada", "Bram", "Chen", "Dina", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Vera", "Wen", "Yusuf", "Zoe")
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "shells", "cards", "buttons", "stamps", "coins",
         "cookies", "beads", "plums", "bolts", "tickets", "candles")
CONTAINERS = ("boxes", "bags", "crates", "jars", "trays", "baskets")
GOODS = ("notebook", "lamp", "kite", "mug", "scarf", "puzzle", "plant", "brush")

_Problem = tuple[str, list[str], int]


def _add(r: random.Random) -> _Problem:
    name, item, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(3, 90), r.randint(2, 60)
    return (f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
            [f"{a} + {b} = {a + b}."], a + b)


def _sub(r: random.Random) -> _Problem:
    name, item, b, left = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 60), r.randint(1, 60)
    a = b + left
    return (f"{name} had {a} {item} and gave {b} of them away. How many {item} does {name} have left?",
            [f"{a} - {b} = {left}."], left)


def _mul(r: random.Random) -> _Problem:
    box, item, a, b = r.choice(CONTAINERS), r.choice(ITEMS), r.randint(2, 12), r.randint(2, 15)
    return (f"There are {a} {box} with {b} {item} in each. How many {item} are there in all?",
            [f"{a} * {b} = {a * b}."], a * b)


def _div(r: random.Random) -> _Problem:
    name, item, people, each = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 14)
    total = people * each
    return (f"{name} splits {total} {item} equally among {people} friends. How many {item} does each friend get?",
            [f"{total} / {people} = {each}."], each)


def _price(r: random.Random) -> _Problem:
    good, price, n = r.choice(GOODS), r.randint(2, 25), r.randint(2, 9)
    return (f"One {good} costs {price} dollars. How many dollars do {n} of them cost?",
            [f"{n} * {price} = {n * price}."], n * price)


def _older(r: random.Random) -> _Problem:
    a, b = r.sample(NAMES, 2)
    age, gap = r.randint(4, 50), r.randint(1, 30)
    return (f"{a} is {age} years old. {b} is {gap} years older than {a}. How old is {b}?",
            [f"{age} + {gap} = {age + gap}."], age + gap)


def _packs_used(r: random.Random) -> _Problem:
    name, item, packs, per = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(3, 12)
    total = packs * per
    used = r.randint(1, total - 1)
    return (f"{name} buys {packs} packs of {item} with {per} in each pack and uses {used} of them. "
            f"How many {item} are left?",
            [f"{packs} * {per} = {total}.", f"{total} - {used} = {total - used}."], total - used)


def _shelf(r: random.Random) -> _Problem:
    item, start, added = r.choice(ITEMS), r.randint(5, 80), r.randint(2, 40)
    taken = r.randint(1, start + added - 1)
    mid = start + added
    return (f"A shelf holds {start} {item}. In the morning {added} more are put on it, and in the afternoon "
            f"{taken} are taken off. How many {item} are on the shelf now?",
            [f"{start} + {added} = {mid}.", f"{mid} - {taken} = {mid - taken}."], mid - taken)


def _budget(r: random.Random) -> _Problem:
    name, g1, g2 = r.choice(NAMES), *r.sample(GOODS, 2)
    p1, p2 = r.randint(2, 40), r.randint(2, 40)
    money = p1 + p2 + r.randint(0, 60)
    spent = p1 + p2
    return (f"{name} has {money} dollars, buys a {g1} for {p1} dollars and a {g2} for {p2} dollars. "
            f"How many dollars does {name} have left?",
            [f"{p1} + {p2} = {spent}.", f"{money} - {spent} = {money - spent}."], money - spent)


def _speed(r: random.Random) -> _Problem:
    name, speed, hours = r.choice(NAMES), r.randint(3, 60), r.randint(2, 8)
    return (f"{name} cycles at {speed} kilometres per hour for {hours} hours. How many kilometres does {name} cycle?",
            [f"{speed} * {hours} = {speed * hours}."], speed * hours)


def _groups_extra(r: random.Random) -> _Problem:
    item, rows, per, extra = r.choice(ITEMS), r.randint(2, 10), r.randint(2, 12), r.randint(1, 30)
    total = rows * per
    return (f"A teacher lays out {rows} rows of {per} {item} and then adds {extra} loose {item}. "
            f"How many {item} are there?",
            [f"{rows} * {per} = {total}.", f"{total} + {extra} = {total + extra}."], total + extra)


TEMPLATES: dict[str, Callable[[random.Random], _Problem]] = {
    "add": _add, "subtract": _sub, "multiply": _mul, "divide": _div, "price": _price, "older": _older,
    "packs-used": _packs_used, "shelf": _shelf, "budget": _budget, "speed": _speed, "groups-extra": _groups_extra,
}
"""The problem templates by name (one or two operations each)."""

SPLIT_TEST_SHARE = 0.2


def problem_split(question: str) -> str:
    """``test`` for a fixed 20% of question texts (by hash), else ``train``."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "test" if h % 1000 < SPLIT_TEST_SHARE * 1000 else "train"


def arithmetic_problems(n: int, split: str = "train", seed: int = 0,
                        templates: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``split`` (dicts ``id``, ``question``, ``solution``, ``answer``, ``template``),
    drawn by ``seed``, cycling through ``templates`` (default: all of :data:`TEMPLATES`)."""
    if split not in ("train", "test"):
        raise MechsafeError(f"unknown split {split!r} of the arithmetic task; use train or test")
    if not isinstance(n, int) or n < 1:
        raise MechsafeError(f"n={n!r} must be a positive number of problems")
    names = tuple(templates or TEMPLATES)
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown:
        raise MechsafeError(f"unknown arithmetic template {unknown[0]!r}; choose from {', '.join(TEMPLATES)}")
    rng = random.Random(f"mechsafe-arithmetic-{seed}")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise MechsafeError(f"could not draw {n} distinct {split} problems from templates {names}; ask for fewer")
        template = names[len(out) % len(names)]
        question, steps, answer = TEMPLATES[template](rng)
        if question in seen or problem_split(question) != split:
            continue
        seen.add(question)
        digest = hashlib.sha256(question.encode()).hexdigest()[:10]
        out.append({"id": f"arith-{digest}", "question": question,
                    "solution": " ".join(steps) + f" The answer is {answer}.", "answer": answer,
                    "template": template})
    return out
