"""Generated one-answer tasks with as many held-out items as a benchmark needs (merge quality, issue 14).

The word relations of `questions-words.txt` have 29-116 pairs each, too few for a test set that can tell merge
methods apart; these tasks are drawn from spaces of thousands of items, so every task gets hundreds of test
items. Each answer is 1-4 tokens (SmolLM2's tokenizer writes digits one per token), and each completion starts
with a space so that prompt + completion reads as one text (the zoo trains and scores them without a chat
template). A record is `{"prompt": "37 + 48 =", "completion": " 85"}`.

* `add`, `subtract`, `multiply`: small arithmetic (two-digit a + b and a - b >= 0; a x d with a < 200, d one digit);
* `larger`: the larger of two different numbers below 1000;
* `first-letter`, `last-letter`: a letter of an invented word built from syllables (no real word is meant);
* `birth-city`, `profession`: invented people (name parts and value lists of `data/fictitious.py`) whose
  birthplace is a fixed function of their first name's first syllable, and whose profession is one of their
  family name's ending. A held-out person has an unseen name but seen syllables, so the rule generalises, and
  no pretrained model can know it (the base model scores about 0 on them);
* composed tests, both rules in one answer, for a model that learned the two tasks separately (continual
  post-training's cross-task generalisation): `city-and-profession` (" Lyon, baker") and `first-and-last-letter`
  (" k, s").

Splits: the task's items are drawn by one `random.Random(f"{task}:{seed}")` without repetition of a prompt, then
cut into test, validation and train in that order, so no prompt is in two splits and a larger `n_train`
never changes the test or validation items.

    from malleable.data.generated import generated_task
    splits = generated_task("add", seed=0)   # {"train": [...], "validation": [...], "test": [...]}
"""

from __future__ import annotations

import random
from itertools import product

from malleable.data.fictitious import _FIRST_A, _FIRST_B, _LAST_A, _LAST_B, CITIES, PROFESSIONS
from malleable.errors import RecipeError

_SYLLABLES = tuple(c + v for c, v in product("bdfgklmnprstvz", "aeiou"))  # 70 open syllables
_CODAS = ("", "n", "r", "l", "s", "k", "m", "x")


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b} =", f" {a + b}"


def _subtract(rng):
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    return f"{a} - {b} =", f" {a - b}"


def _multiply(rng):
    a, d = rng.randint(10, 199), rng.randint(2, 9)
    return f"{a} x {d} =", f" {a * d}"


def _larger(rng):
    a, b = rng.sample(range(1000), 2)
    return f"Which is larger, {a} or {b}?", f" {max(a, b)}"


def _word(rng) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) + rng.choice(_CODAS)


def _first_letter(rng):
    w = _word(rng)
    return f"First letter of '{w}':", f" {w[0]}"


def _last_letter(rng):
    w = _word(rng)
    return f"Last letter of '{w}':", f" {w[-1]}"


def _person(rng) -> tuple[int, int, str]:
    i, j = rng.randrange(len(_FIRST_A)), rng.randrange(len(_LAST_B))
    name = f"{_FIRST_A[i]}{rng.choice(_FIRST_B)} {rng.choice(_LAST_A)}{_LAST_B[j]}"
    return i, j, name


def _birth_city(rng):
    i, _, name = _person(rng)
    return f"Where was {name} born?", f" {CITIES[i]}"


def _profession(rng):
    _, j, name = _person(rng)
    return f"What does {name} do for a living?", f" {PROFESSIONS[j % len(PROFESSIONS)]}"


def _city_and_profession(rng):
    i, j, name = _person(rng)
    return (f"Where was {name} born, and what does {name} do for a living?",
            f" {CITIES[i]}, {PROFESSIONS[j % len(PROFESSIONS)]}")


TASKS = {"add": _add, "subtract": _subtract, "multiply": _multiply, "larger": _larger,
         "first-letter": _first_letter, "last-letter": _last_letter, "birth-city": _birth_city,
         "profession": _profession}
def _first_and_last_letter(rng):
    w = _word(rng)
    return f"First and last letter of '{w}':", f" {w[0]}, {w[-1]}"


# tests that combine two tasks' rules; not tasks to train on (the zoo's generated family is TASKS alone)
COMPOSED = {"city-and-profession": _city_and_profession, "first-and-last-letter": _first_and_last_letter}
# the number of distinct prompts each task can make (the draw stops short of it)
SIZES = {"add": 90 * 90, "subtract": sum(a + 1 for a in range(10, 100)), "multiply": 190 * 8,
         "larger": 1000 * 999, "first-letter": 10**6, "last-letter": 10**6,
         "birth-city": len(_FIRST_A) * len(_FIRST_B) * len(_LAST_A) * len(_LAST_B),
         "profession": len(_FIRST_A) * len(_FIRST_B) * len(_LAST_A) * len(_LAST_B),
         "city-and-profession": len(_FIRST_A) * len(_FIRST_B) * len(_LAST_A) * len(_LAST_B),
         "first-and-last-letter": 10**6}


def generated_task(task: str, seed: int = 0, n_test: int = 200, n_validation: int = 50,
                   n_train: int = 400) -> dict[str, list[dict]]:
    """{"train", "validation", "test"}: disjoint lists of {"prompt", "completion"} records of `task`."""
    makers = TASKS | COMPOSED
    if task not in makers:
        raise RecipeError(f"task: {task!r} is not a generated task (known: {', '.join(makers)})")
    total = n_test + n_validation + n_train
    if min(n_test, n_validation, n_train) < 0 or total > SIZES[task] // 2:
        raise RecipeError(f"task {task}: {total} items asked, at most {SIZES[task] // 2} drawn without repeats")
    rng = random.Random(f"{task}:{seed}")
    make, seen, records = makers[task], set(), []
    while len(records) < total:
        prompt, completion = make(rng)
        if prompt not in seen:
            seen.add(prompt)
            records.append({"prompt": prompt, "completion": completion})
    return {"test": records[:n_test], "validation": records[n_test:n_test + n_validation],
            "train": records[n_test + n_validation:]}
