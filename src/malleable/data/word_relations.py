"""Word relations from gensim's `questions-words.txt` (19,544 analogies, 14 relations) as one-word QA.

Each line of the file is an analogy `a b c d`, i.e. two pairs (a, b) and (c, d) of one relation, under a
section header `: relation`. The loader keeps the distinct pairs of a relation, drops the few words that have
two answers in one relation (Glendale is in Arizona and in California), and splits the pairs by a seeded
shuffle into train / validation / test, so no pair (and no prompt) is in two splits. A record is
`{"prompt": "Athens is the capital of which country? Answer with one word.", "completion": "Greece"}`.

    from malleable.data.word_relations import word_relations
    splits = word_relations("capital-world", seed=0)   # {"train": [...], "validation": [...], "test": [...]}
"""

from __future__ import annotations

import random
from pathlib import Path

from malleable.data.files import gensim_file
from malleable.errors import InputError

FILE = "questions-words.txt"
SPLITS = ("train", "validation", "test")
_ONE_WORD = " Answer with one word."

# The question for each relation; pairs are (x, y) in the file's order, e.g. (Athens, Greece), (Algeria, dinar).
TEMPLATES = {
    "capital-common-countries": "{x} is the capital of which country?",
    "capital-world": "{x} is the capital of which country?",
    "currency": "What is the name of the currency of {x}?",
    "city-in-state": "{x} is a city in which US state?",
    "family": "What is the female counterpart of the word '{x}'?",
    "gram1-adjective-to-adverb": "What is the adverb formed from the adjective '{x}'?",
    "gram2-opposite": "What is the opposite of '{x}', formed with a negative prefix?",
    "gram3-comparative": "What is the comparative form of the adjective '{x}'?",
    "gram4-superlative": "What is the superlative form of the adjective '{x}'?",
    "gram5-present-participle": "What is the present participle (-ing form) of the verb '{x}'?",
    "gram6-nationality-adjective": "What is the adjective for people and things from {x}?",
    "gram7-past-tense": "What is the simple past tense of the verb form '{x}'?",
    "gram8-plural": "What is the plural of the noun '{x}'?",
    "gram9-plural-verbs": "What is the third-person singular present form (he/she/it ...) of the verb '{x}'?",
}
RELATIONS = tuple(TEMPLATES)
# The adapter zoo's eight relations (protocols/zoo.py), the ones with the most pairs (29-116) and the widest spread
# of skills: world knowledge (capitals, US states, currencies, nationalities) and morphology (comparative, past
# tense, plural, negative prefix). Fewer pairs would leave too few held-out test pairs to tell models apart.
ZOO_RELATIONS = ("capital-world", "city-in-state", "currency", "gram6-nationality-adjective", "gram3-comparative",
                 "gram7-past-tense", "gram8-plural", "gram2-opposite")


def read_relations(path: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """All relations of the file: {relation: sorted distinct (x, y) pairs}, ambiguous x left out."""
    path = Path(path) if path is not None else gensim_file(FILE)
    pairs: dict[str, set[tuple[str, str]]] = {}
    section = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(":"):
                section = line[1:].strip()
                pairs.setdefault(section, set())
                continue
            words = line.split()
            if section is None or len(words) != 4:
                raise InputError(f"{path}:{lineno}: expected ': relation' or four words, got {line!r}")
            pairs[section].update([(words[0], words[1]), (words[2], words[3])])
    out = {}
    for section, found in pairs.items():
        answers: dict[str, set[str]] = {}
        for x, y in found:
            answers.setdefault(x, set()).add(y)
        out[section] = sorted((x, y) for x, y in found if len(answers[x]) == 1)
    return out


def relation_pairs(relation: str, path: str | Path | None = None) -> list[tuple[str, str]]:
    relations = read_relations(path)
    if relation not in relations:
        raise InputError(f"unknown word relation {relation!r}; known: {', '.join(relations)}")
    return relations[relation]


def split_pairs(
    pairs: list[tuple[str, str]], seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
) -> dict[str, list[tuple[str, str]]]:
    """Deterministic split: the sorted pairs shuffled by `random.Random(seed)`, then cut by `fractions`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = sorted(set(pairs))
    random.Random(seed).shuffle(order)
    n_train = round(len(order) * fractions[0])
    n_val = round(len(order) * fractions[1])
    return {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def to_record(relation: str, x: str, y: str) -> dict[str, str]:
    return {"prompt": TEMPLATES[relation].format(x=x) + _ONE_WORD, "completion": y}


def word_relations(
    relation: str,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3),
    path: str | Path | None = None,
) -> dict[str, list[dict[str, str]]]:
    """{"train": records, "validation": records, "test": records} for one relation of questions-words.txt."""
    if relation not in TEMPLATES:
        raise InputError(f"unknown word relation {relation!r}; known: {', '.join(RELATIONS)}")
    splits = split_pairs(relation_pairs(relation, path), seed, fractions)
    return {name: [to_record(relation, x, y) for x, y in splits[name]] for name in SPLITS}
