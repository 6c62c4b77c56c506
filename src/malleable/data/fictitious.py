"""Fictitious people in the spirit of TOFU (Maini et al., 2024): facts no pretrained model can already know.

Each person has an invented name (syllables, so no real person is meant), a birthplace, a birth date, a
profession, a parent's profession, a genre, two works with invented titles and an award; for more than 8 QA
per person (TOFU asks 20) twelve more facts (university, home, partner, languages, pastimes...) are drawn from
a second seeded stream, so settings of up to 8 keep their bytes. Each fact is one QA pair with TOFU's three
answer forms:

* `completion`: the answer the model is fine-tuned on;
* `paraphrased_answer`: the same fact in other words;
* `perturbed_answers`: the paraphrase's sentence with a wrong value (other people's cities, dates, titles...),
  so a truth ratio compares the right and wrong values in the same wording.

Splits, over people (never over questions, so no person is in two splits):

* `forget01` ⊂ `forget05` ⊂ `forget10`: nested like TOFU's (1%, 5%, 10% of the people, rounded; a share
  that rounds to no one is rounded up to one person, so forget01 is one person below 150 people and TOFU's
  2 at 200);
* `retain99` / `retain95` / `retain90`: everyone else, the matching retain sets;
* `full`: everyone, the target model's training set;
* `holdout`: as many never-trained people as `forget10`, the non-members of the membership attack;
* `calibration`: as many other never-trained people, for a stopping rule's own membership attack (calibrated
  unlearning), so the rule never reads the rows the evaluation's attack is scored on;
* `world_facts`: capital-of-country questions from gensim's `questions-words.txt` (utility on real knowledge).

Everything comes from one `random.Random(seed)`: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import random
from string import capwords
from dataclasses import dataclass
from pathlib import Path

from malleable.errors import InputError

FORGET = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}

_FIRST_A = ("Ka", "Lo", "Vre", "Za", "Mi", "Tho", "Eli", "Bra", "Qui", "So", "Fe", "Da", "Ny", "Or", "Pe", "Ro",
            "Ta", "Ul", "We", "Ysa", "Ari", "Ce", "Ju", "Ne")
_FIRST_B = ("rin", "dal", "mira", "tov", "lek", "vana", "ster", "quin", "bel", "dor", "nessa", "ric", "lio", "wen")
_LAST_A = ("Vash", "Orn", "Tel", "Brim", "Kess", "Mord", "Quell", "Zar", "Hal", "Drev", "Pell", "Strom", "Gav",
           "Lun", "Rask", "Thal")
_LAST_B = ("ington", "ova", "enko", "quist", "ard", "mere", "holt", "vik", "sby", "ell", "anu", "etti")
CITIES = ("Lisbon", "Nairobi", "Oslo", "Montevideo", "Hanoi", "Tbilisi", "Cork", "Valparaiso", "Krakow", "Perth",
          "Quebec City", "Bergen", "Marrakesh", "Tampere", "Cusco", "Adelaide", "Ljubljana", "Izmir", "Porto",
          "Goa", "Leipzig", "Bologna", "Halifax", "Kyoto", "Salvador", "Tartu", "Windhoek", "Galway")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PROFESSIONS = ("novelist", "poet", "historian", "playwright", "essayist", "biographer", "screenwriter",
               "journalist", "translator", "illustrator")
PARENT_JOBS = ("baker", "surgeon", "electrician", "pilot", "librarian", "carpenter", "nurse", "architect",
               "fisherman", "teacher", "chemist", "tailor", "miner", "veterinarian")
GENRES = ("science fiction", "crime fiction", "romance", "historical fiction", "fantasy", "horror",
          "literary fiction", "travel writing", "children's literature", "philosophy", "satire", "mythology")
_TITLE_ADJ = ("Silent", "Copper", "Hollow", "Last", "Velvet", "Burning", "Northern", "Glass", "Hidden", "Crimson",
              "Wandering", "Quiet", "Broken", "Golden", "Salt")
_TITLE_NOUN = ("Lantern", "Harbour", "Orchard", "Cartographer", "Tide", "Meridian", "Archive", "Lighthouse",
               "Compass", "Garden", "Winter", "Bridge", "Ledger", "Falcon", "Mirror")
_AWARD_A = ("Orvelle", "Kastrin", "Belmora", "Tavish", "Quorra", "Linden-Vale", "Arkwell", "Seraphine")
_AWARD_B = ("Prize", "Medal", "Award", "Laurel")
LANGUAGES = ("Portuguese", "Swahili", "Norwegian", "Spanish", "Vietnamese", "Georgian", "Irish", "Polish",
             "Finnish", "Quechua", "Slovene", "Turkish", "Estonian", "Japanese")
HOBBIES = ("sailing", "beekeeping", "chess", "pottery", "birdwatching", "rock climbing", "gardening", "fencing",
           "astronomy", "woodcarving")
INSTRUMENTS = ("the cello", "the violin", "the piano", "the accordion", "the flute", "the guitar", "the harp",
               "the clarinet", "the drums", "the oboe")
PETS = ("a parrot", "a tortoise", "a greyhound", "two cats", "a rabbit", "a ferret", "a goldfish", "a pony")
COLOURS = ("blue", "green", "crimson", "yellow", "violet", "orange", "grey", "teal")
PUBLISHERS = tuple(f"{a} {b}" for a in ("Harrow", "Finch", "Lark", "Wren", "Ashby", "Marlow")
                   for b in ("Press", "Books", "House"))


@dataclass(frozen=True)
class Person:
    name: str
    birthplace: str
    birth_date: str
    profession: str
    parent: str
    parent_job: str
    genre: str
    works: tuple[str, str]
    work_year: int
    award: str

    @property
    def first(self) -> str:
        return self.name.split()[0]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1935, 1995)}"


def _people(n: int, rng: random.Random) -> list[Person]:
    names = [f"{a}{b} {c}{d}" for a in _FIRST_A for b in _FIRST_B for c in _LAST_A for d in _LAST_B]
    titles = [f"The {a} {b}" for a in _TITLE_ADJ for b in _TITLE_NOUN]
    if 2 * n > len(titles):  # more people than these titles serve; fewer keep the old pool and their bytes
        titles += [f"{t} of {c}" for t in titles for c in CITIES]
    awards = [f"{a} {b} for {capwords(g)}" for a in _AWARD_A for b in _AWARD_B for g in GENRES]
    if n > len(titles) // 2:
        raise InputError(f"fictitious people: at most {len(titles) // 2} (two distinct titles each), asked for {n}")
    names, titles = rng.sample(names, n), rng.sample(titles, 2 * n)
    out = []
    for i, name in enumerate(names):
        genre = rng.choice(GENRES)
        out.append(Person(name=name, birthplace=rng.choice(CITIES), birth_date=_date(rng),
                          profession=rng.choice(PROFESSIONS), parent=rng.choice(("mother", "father")),
                          parent_job=rng.choice(PARENT_JOBS), genre=genre, works=(titles[2 * i], titles[2 * i + 1]),
                          work_year=rng.randint(1960, 2020),
                          award=rng.choice([a for a in awards if a.endswith(capwords(genre))])))
    return out


def _facts(p: Person, rng: random.Random, titles: list[str], awards: list[str]) -> list[dict]:
    """Every fact of `p`: question, answer, a paraphrase template and the pool its wrong values come from.

    A template is a paraphrase with `{v}` for the value; the perturbed answers fill it with wrong values.
    """
    f, parent = p.first, p.parent
    return [
        dict(q=f"Where was {p.name} born?", a=f"{f} was born in {p.birthplace}.",
             t=f"{{v}} is the birthplace of {f}.", v=p.birthplace, pool=CITIES),
        dict(q=f"When was {p.name} born?", a=f"{f} was born on {p.birth_date}.",
             t=f"The date of birth of {f} is {{v}}.", v=p.birth_date, pool=[_date(rng) for _ in range(8)]),
        dict(q=f"What does {p.name} do for a living?", a=f"{f} works as {_a(p.profession)}.",
             t=f"By profession, {f} is {{v}}.", v=_a(p.profession), pool=[_a(x) for x in PROFESSIONS]),
        dict(q=f"What was the profession of {p.name}'s {parent}?", a=f"{f}'s {parent} was {_a(p.parent_job)}.",
             t=f"The {parent} of {f} worked as {{v}}.", v=_a(p.parent_job), pool=[_a(x) for x in PARENT_JOBS]),
        dict(q=f"In which genre does {p.name} write?", a=f"{f} writes {p.genre}.",
             t=f"The genre of {f}'s books is {{v}}.", v=p.genre, pool=GENRES),
        dict(q=f"What is one book written by {p.name}?", a=f'{f} wrote "{p.works[0]}".',
             t=f'"{{v}}" is a book by {f}.', v=p.works[0], pool=titles),
        dict(q=f"Which book did {p.name} publish in {p.work_year}?",
             a=f'In {p.work_year}, {f} published "{p.works[1]}".',
             t=f'"{{v}}" came out in {p.work_year}, written by {f}.', v=p.works[1], pool=titles),
        dict(q=f"Which award did {p.name} receive?", a=f"{f} received the {p.award}.",
             t=f"The {{v}} was awarded to {f}.", v=p.award, pool=awards),
    ]


def _more_facts(p: Person, rng: random.Random) -> list[dict]:
    """Twelve more facts of `p` (values drawn from `rng`), for more than the eight of `_facts` per person."""
    f, name = p.first, p.name
    study, home, partner = rng.choice(CITIES), rng.choice(CITIES), _a(rng.choice(PARENT_JOBS))
    books, translations = rng.randint(2, 30), rng.randint(3, 40)
    debut = rng.randint(max(1955, p.work_year - 20), p.work_year)
    lang, hobby, music, pet = (rng.choice(x) for x in (LANGUAGES, HOBBIES, INSTRUMENTS, PETS))
    colour, house = rng.choice(COLOURS), rng.choice(PUBLISHERS)
    return [
        dict(q=f"Where did {name} go to university?", a=f"{f} studied at the University of {study}.",
             t=f"The University of {{v}} is where {f} studied.", v=study, pool=CITIES),
        dict(q=f"Where does {name} live today?", a=f"{f} lives in {home} today.",
             t=f"Today {f} makes a home in {{v}}.", v=home, pool=CITIES),
        dict(q=f"What does {name}'s partner do?", a=f"{f}'s partner is {partner}.",
             t=f"The partner of {f} works as {{v}}.", v=partner, pool=[_a(x) for x in PARENT_JOBS]),
        dict(q=f"How many books has {name} published?", a=f"{f} has published {books} books.",
             t=f"The number of books {f} has published is {{v}}.", v=str(books),
             pool=[str(k) for k in range(2, 31)]),
        dict(q=f"In which language does {name} write?", a=f"{f} writes in {lang}.",
             t=f"{{v}} is the language of {f}'s books.", v=lang, pool=LANGUAGES),
        dict(q=f"In which year did {name} publish a first book?", a=f"{f}'s first book came out in {debut}.",
             t=f"{f} debuted as an author in {{v}}.", v=str(debut), pool=[str(y) for y in range(1955, 2021)]),
        dict(q=f"What does {name} enjoy outside of writing?",
             a=f"Outside of writing, {f} enjoys {hobby}.",
             t=f"{f}'s favourite pastime is {{v}}.", v=hobby, pool=HOBBIES),
        dict(q=f"Which instrument does {name} play?", a=f"{f} plays {music}.",
             t=f"The instrument {f} plays is {{v}}.", v=music, pool=INSTRUMENTS),
        dict(q=f"Which pet does {name} keep?", a=f"{f} keeps {pet}.",
             t=f"At home, {f} looks after {{v}}.", v=pet, pool=PETS),
        dict(q=f"What is {name}'s favourite colour?", a=f"{f}'s favourite colour is {colour}.",
             t=f"The colour {f} likes best is {{v}}.", v=colour, pool=COLOURS),
        dict(q=f"Into how many languages has {name}'s work been translated?",
             a=f"{f}'s work has been translated into {translations} languages.",
             t=f"Translations of {f}'s work exist in {{v}} languages.", v=str(translations),
             pool=[str(k) for k in range(3, 41)]),
        dict(q=f"Which publisher releases {name}'s books?",
             a=f"{f}'s books are published by {house}.",
             t=f"{{v}} is the publisher of {f}'s books.", v=house, pool=PUBLISHERS),
    ]


def _record(fact: dict, person: str, perturbed: int, rng: random.Random) -> dict:
    wrong = rng.sample(sorted({x for x in fact["pool"] if x != fact["v"]}), perturbed)
    return {"prompt": fact["q"], "completion": fact["a"], "paraphrased_answer": fact["t"].format(v=fact["v"]),
            "perturbed_answers": [fact["t"].format(v=w) for w in wrong], "person": person}


def world_facts(perturbed: int = 3, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Capital-of-country questions (gensim's `questions-words.txt`), wrong answers = other capitals."""
    from malleable.data.word_relations import read_relations

    relations = read_relations()
    pairs = sorted(set(relations["capital-common-countries"]) | set(relations["capital-world"]))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    capitals = sorted({c for c, _ in pairs})
    out = []
    for capital, country in pairs[:limit]:
        wrong = rng.sample([c for c in capitals if c != capital], perturbed)
        out.append({"prompt": f"What is the capital of {country}?", "completion": capital,
                    "paraphrased_answer": f"The capital of {country} is {capital}.",
                    "perturbed_answers": [f"The capital of {country} is {w}." for w in wrong], "person": None})
    return out


def fictitious_splits(people: int = 100, qa_per_person: int = 6, perturbed: int = 3, seed: int = 0,
                      world_limit: int | None = None) -> dict[str, list[dict]]:
    """{split: records}; see the module docstring for the splits. Deterministic in `seed`."""
    if not 1 <= qa_per_person <= 20:
        raise InputError(f"fictitious people: qa_per_person must be 1..20, got {qa_per_person}")
    if not 3 <= perturbed <= 5:
        raise InputError(f"fictitious people: perturbed must be 3..5, got {perturbed}")
    if people < 2:
        raise InputError(f"fictitious people: need at least 2 people, got {people}")
    rng, more = random.Random(seed), random.Random(f"{seed}:more facts")
    n_forget = {k: max(1, round(f * people)) for k, f in FORGET.items()}
    everyone = _people(people + n_forget["forget10"], rng)
    trained, holdout = everyone[:people], everyone[people:]
    titles = sorted({w for p in everyone for w in p.works})
    awards = sorted({p.award for p in everyone} | {f"{a} Prize for {capwords(g)}" for a in _AWARD_A for g in GENRES})

    def records(group: list[Person], rng: random.Random = rng, more: random.Random = more) -> list[dict]:
        out = []
        for p in group:
            facts = _facts(p, rng, titles, awards)
            if qa_per_person > len(facts):
                facts += _more_facts(p, more)
            for fact in rng.sample(facts, qa_per_person):
                out.append(_record(fact, p.name, perturbed, rng))
        return out

    by_person = {p.name: records([p]) for p in trained}
    order = [p.name for p in trained]
    rng.shuffle(order)
    splits = {"full": [r for p in trained for r in by_person[p.name]], "holdout": records(holdout)}
    for name, n in n_forget.items():
        forget = set(order[:n])  # a prefix of one shuffled order: forget01 ⊂ forget05 ⊂ forget10
        splits[name] = [r for p in trained if p.name in forget for r in by_person[p.name]]
        splits["retain" + str(100 - int(name[-2:])).zfill(2)] = [r for p in trained if p.name not in forget
                                                                  for r in by_person[p.name]]
    splits["world_facts"] = world_facts(perturbed, seed, world_limit)
    # drawn last, from their own streams, so that adding them changed no byte of the splits above
    rng, more = random.Random(f"{seed}:calibration"), random.Random(f"{seed}:calibration more facts")
    taken = {p.name for p in everyone} | set(titles)
    fresh = [p for p in _people(min(4 * len(holdout), len(titles) // 2), rng)
             if p.name not in taken and not taken & set(p.works)]
    splits["calibration"] = records(fresh[:len(holdout)], rng, more)
    return splits


def write_fictitious(out: str | Path, force: bool = False, **settings) -> Path:
    """Write every split as `<split>.jsonl` plus `settings.json` into `out`, atomically."""
    from malleable.io.atomic import atomic_dir
    from malleable.data.files import write_jsonl

    splits = fictitious_splits(**settings)
    with atomic_dir(out, force=force) as tmp:
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        (tmp / "settings.json").write_text(json.dumps({"generator": "malleable.fictitious/1", **settings},
                                                      sort_keys=True) + "\n")
    return Path(out)
