"""The adapter zoo: real LoRA adapters on SmolLM2-135M-Instruct, one per task plus a multi-task one.

Two task families: the word relations of `questions-words.txt` (the default; 29-116 pairs per relation) and
the generated tasks of `malleable.data.generated` (`data="generated"`: hundreds of held-out items per task,
what `bench/merge_quality.py` uses). Each adapter trains from its own seed (`train_seed`), optionally with early
stopping on its validation items (`patience`), and can be scored per item by teacher forcing (`metric="forced"`).

The zoo is the shared input of the merge-quality benchmark (`bench/merge_quality.py`) and of
`malleable bench zoo`. Everything goes through the public verbs (`learn` trains, `merge` merges), so the
benchmark measures what a user gets. Everything is cached under `$MALLEABLE_CACHE/zoo` (default
`~/.cache/malleable/zoo`): each adapter under `adapters/<name>-<hash of what trains it>`, so changing an
evaluation setting or the multi-task steps retrains nothing else; the tables under `<hash of all settings>/`.

Evaluation loads the base model once and switches adapters on it (PEFT `load_adapter` / `set_adapter`),
which is what makes evaluating dozens of merged adapters affordable on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from malleable.data.files import write_jsonl
from malleable.data.word_relations import ZOO_RELATIONS
from malleable.io.atomic import write_text_atomic

SCHEMA = "malleable.protocols.zoo/1"
TASKS = ZOO_RELATIONS
MULTI = "multitask"
FAMILIES = ("word_relations", "generated")


@dataclass(frozen=True)
class ZooSettings:
    """Everything that decides the adapters and their scores; its hash names the cache directory."""

    tasks: tuple[str, ...] = TASKS
    # "generated": the tasks of data/generated.py (hundreds of test items each), split by `data_seed` into
    # n_test / n_validation / n_train items; "word_relations": questions-words.txt split by `seed`
    data: str = "word_relations"
    rank: int = 16
    alpha: float = 32.0
    # Attention only: 120 modules instead of 210, so each merge (an SVD or two per module) stays quick.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 30
    multi_steps: int = 100
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0
    # A larger validation share than the default 10%: the merge coefficient is chosen on it.
    fractions: tuple[float, float, float] = (0.5, 0.2, 0.3)
    max_eval: int = 40
    max_new_tokens: int = 6
    n_test: int = 200
    n_validation: int = 50
    n_train: int = 400
    data_seed: int = 0
    # early stopping: `steps` becomes the most steps; the validation loss every `eval_every` steps decides when
    # to stop (after `patience` evaluations without improvement) and which weights are kept
    patience: int | None = None
    eval_every: int = 10
    # each adapter's LoRA initialisation from its own seed (derived from `seed` and its name); False: every
    # adapter starts from `seed`, i.e. from the same LoRA A (the zoo before issue 14)
    per_task_seed: bool = True
    multi: bool = True  # also train the multi-task adapter on the union
    chat_template: str = "auto"  # learn's data.chat_template: "off" trains and scores the bare prompt
    # "generate": greedy generation and `is_match`; "forced": every answer token the argmax under teacher
    # forcing (`forced_match`, one forward pass, per-item results kept)
    metric: str = "generate"

    def __post_init__(self) -> None:
        """Refuse impossible settings before anything is trained or cached."""
        from malleable.errors import RecipeError

        for name in ("rank", "steps", "multi_steps", "batch_size", "max_eval", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"{name.replace('_', '-')}: {value!r} must be a whole number of at least 1")
        for name in ("alpha", "lr"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise RecipeError(f"{name}: {getattr(self, name)!r} must be a positive finite number")
        if self.data not in FAMILIES:
            raise RecipeError(f"data: {self.data!r} must be one of {list(FAMILIES)}")
        known = family_tasks(self.data)
        if any(t not in known for t in self.tasks) or not self.tasks:
            raise RecipeError(f"tasks: {list(self.tasks)} must be some of {list(known)}")
        if self.metric not in ("generate", "forced"):
            raise RecipeError(f"metric: {self.metric!r} must be generate or forced")
        if self.chat_template not in ("auto", "on", "off"):
            raise RecipeError(f"chat-template: {self.chat_template!r} must be auto, on or off")

    def key(self) -> str:
        return settings_key(asdict(self))


def family_tasks(family: str) -> tuple[str, ...]:
    if family == "generated":
        from malleable.data.generated import TASKS as GENERATED

        return tuple(GENERATED)
    return TASKS


def train_seed(settings: ZooSettings, name: str) -> int:
    """The seed adapter `name` trains with (its LoRA A, its batches): its own unless `per_task_seed` is off."""
    if not settings.per_task_seed:
        return settings.seed
    return int(hashlib.sha256(f"{settings.seed}:{name}".encode()).hexdigest(), 16) % 2**31


def settings_key(settings: dict) -> str:
    """A short stable hash of JSON-able settings (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cache_root(cache: str | Path | None = None) -> Path:
    from malleable.models.checkpoints import default_cache_dir

    return Path(cache) if cache is not None else default_cache_dir("zoo")


def zoo_dir(settings: ZooSettings, cache: str | Path | None = None) -> Path:
    return cache_root(cache) / settings.key()


def adapter_key(settings: ZooSettings, name: str) -> str:
    """Hash of exactly what trains adapter `name` (a task, or MULTI for the union of all tasks)."""
    multi = name == MULTI
    fields = ["rank", "alpha", "targets", "batch_size", "lr", "seed", "fractions"]
    if settings.data != "word_relations" or settings.patience or settings.per_task_seed or \
            settings.chat_template != "auto":  # the zoo's first settings keep their keys (and their adapters)
        fields += ["data", "n_test", "n_validation", "n_train", "data_seed", "patience", "eval_every", "per_task_seed",
                   "chat_template"]
    return settings_key({"name": name, "tasks": list(settings.tasks) if multi else [name],
                         "steps": settings.multi_steps if multi else settings.steps,
                         **{k: getattr(settings, k) for k in fields}})


def adapter_dir(settings: ZooSettings, name: str, cache: str | Path | None = None) -> Path:
    return cache_root(cache) / "adapters" / f"{name}-{adapter_key(settings, name)}"


def load_data(settings: ZooSettings) -> dict[str, dict[str, list[dict]]]:
    """{task: {split: records}}; word-relation evaluation splits capped at `max_eval` pairs."""
    from malleable.data.word_relations import word_relations

    if settings.data == "generated":
        from malleable.data.generated import generated_task

        return {task: generated_task(task, settings.data_seed, settings.n_test, settings.n_validation,
                                     settings.n_train) for task in settings.tasks}
    data = {}
    for task in settings.tasks:
        splits = word_relations(task, seed=settings.seed, fractions=settings.fractions)
        for name in ("validation", "test"):
            splits[name] = splits[name][: settings.max_eval]
        data[task] = splits
    return data


def train_adapters(settings: ZooSettings, base_dir: Path, cache: str | Path | None, data: dict,
                   progress: bool = True) -> dict[str, Path]:
    """One LoRA per task and one on the union, trained with `learn`'s engine; existing ones are reused."""
    from malleable.learn.engine import learn
    from malleable.recipes.learn import parse_learn_recipe

    def union(split):
        return [r for task in settings.tasks for r in data[task][split]]

    jobs = {task: (data[task]["train"], data[task]["validation"], settings.steps) for task in settings.tasks}
    if settings.multi:
        jobs[MULTI] = (union("train"), union("validation"), settings.multi_steps)
    paths = {}
    for name, (records, validation, steps) in jobs.items():
        out = adapter_dir(settings, name, cache)
        paths[name] = out
        if (out / "adapter_config.json").is_file():
            continue
        train_file = write_jsonl(out.with_name(out.name + ".train.jsonl"), records)
        data_spec = {"train": str(train_file)}
        training = {"steps": steps, "batch_size": settings.batch_size, "lr": settings.lr,
                    "warmup_steps": 5, "max_grad_norm": 1.0, "log_every": 10}
        if settings.chat_template != "auto":
            data_spec["chat_template"] = settings.chat_template
        if settings.patience:
            data_spec["validation"] = str(write_jsonl(out.with_name(out.name + ".validation.jsonl"), validation))
            training.update(patience=settings.patience, eval_every=settings.eval_every, schedule="constant")
        recipe = {"model": str(base_dir), "method": "lora",
                  "parameters": {"r": settings.rank, "alpha": settings.alpha, "targets": list(settings.targets)},
                  "data": data_spec, "training": training, "seed": train_seed(settings, name)}
        learn(parse_learn_recipe(recipe), out, force=True, progress=progress)
    return paths


def training_times(adapters: dict[str, Path]) -> dict[str, float]:
    """Each adapter's training wall time, from the report `learn` wrote beside it (cached ones included)."""
    return {name: json.loads((path / "report.json").read_text())["wall_time_s"] for name, path in adapters.items()}


class Evaluator:
    """The base model, loaded once, with adapters switched in and out; exact match per task."""

    def __init__(self, base_dir: Path, first_adapter: Path, settings: ZooSettings):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir, self.settings = base_dir, settings
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, first_adapter, adapter_name="_first")

    def add(self, name: str, path: Path) -> None:
        self.model.load_adapter(path, adapter_name=name)

    def drop(self, name: str) -> None:
        self.model.set_adapter("_first")
        self.model.delete_adapter(name)

    def scores(self, records: dict[str, list[dict]], adapter: str | None) -> dict[str, float]:
        """{task: exact match} with `adapter` active (None: the base model alone)."""
        if adapter is None:
            with self.model.disable_adapter():
                return self._scores(self.model, records)
        self.model.set_adapter(adapter)
        return self._scores(self.model, records)

    def items(self, records: dict[str, list[dict]], adapter: str | None, model=None) -> dict[str, list[int]]:
        """{task: [1 if the item's answer is right else 0, ...]} by `forced_match`, with `adapter` active
        (None: the base model alone; `model`: another model, e.g. a merged full checkpoint)."""
        from malleable.evaluate.scoring import forced_match

        def run(m):
            m.eval()
            return {task: [int(x) for x in forced_match(m, self.tokenizer, recs, chat=self.chat, batch_size=64)]
                    for task, recs in records.items()}

        if model is not None:
            return run(model)
        if adapter is None:
            with self.model.disable_adapter():
                return run(self.model)
        self.model.set_adapter(adapter)
        return run(self.model)

    @property
    def chat(self) -> bool:
        from malleable.learn.data import uses_chat_template

        return uses_chat_template(self.tokenizer, self.settings.chat_template)

    def scale(self, name: str, factor: float) -> None:
        """Multiply adapter `name`'s LoRA scaling by `factor` in every module (its delta becomes factor x
        delta; `scale(name, 1 / factor)` undoes it)."""
        for module in self.model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and name in scaling:
                scaling[name] *= factor

    def model_scores(self, checkpoint: Path, records: dict[str, list[dict]]) -> dict[str, float]:
        """{task: exact match} of a full checkpoint (a merge into the base), loaded for this call only."""
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        return self._scores(model, records)

    def _scores(self, model, records: dict[str, list[dict]]) -> dict[str, float]:
        from malleable.evaluate.generation import exact_match

        if self.settings.metric == "forced":
            return {task: round(statistics.fmean(hits), 4) if hits else 0.0
                    for task, hits in self.items(records, None, model=model).items()}

        return {task: round(exact_match(model, self.tokenizer, recs, max_new_tokens=self.settings.max_new_tokens,
                                        batch_size=32)[0], 4)
                for task, recs in records.items()}


def split(data: dict, name: str) -> dict[str, list[dict]]:
    return {task: splits[name] for task, splits in data.items()}


def mean(scores: dict[str, float]) -> float:
    return round(statistics.fmean(scores.values()), 4)


def zoo_table(rows: dict[str, dict[str, float]], tasks, n: dict[str, int]) -> str:
    """Markdown: one row per model, one column per task, plus the mean; the diagonal of the per-task adapters
    (each adapter on its own task) is bold."""
    head = "| model | " + " | ".join(tasks) + " | mean |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 1)]
    for row, scores in rows.items():
        cells = [f"**{scores[t]:.0%}**" if row == t else f"{scores[t]:.0%}" for t in tasks]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean({t: scores[t] for t in tasks}):.1%} |")
    lines.append("| n (test pairs) | " + " | ".join(str(n[t]) for t in tasks) + " | |")
    return "\n".join(lines)


def run_zoo(settings: ZooSettings = ZooSettings(), cache: str | Path | None = None, progress: bool = True,
            evaluator: Evaluator | None = None) -> tuple[dict, Evaluator]:
    """Train (or reuse) the zoo and evaluate base, every adapter on every task, and the multi-task adapter.

    Returns the zoo result (also cached as `zoo.json` in the zoo directory) and the evaluator, whose loaded
    base model the merge benchmark goes on using.
    """
    from malleable.models.smollm2 import smollm2_checkpoint
    from malleable.report import environment

    start = time.perf_counter()
    root = zoo_dir(settings, cache)
    base_dir = smollm2_checkpoint()
    data = load_data(settings)
    adapters = train_adapters(settings, base_dir, cache, data, progress)
    if evaluator is None:
        evaluator = Evaluator(base_dir, adapters[settings.tasks[0]], settings)
        for name, path in adapters.items():
            evaluator.add(name, path)
    cached = root / "zoo.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
        result["wall_time_s"]["train"] = training_times(adapters)  # from the reports, whichever run trained them
        return result, evaluator
    test = split(data, "test")
    t0 = time.perf_counter()
    rows = {"base": evaluator.scores(test, None)}
    for name in adapters:
        rows[name] = evaluator.scores(test, name)
    result = {
        "schema": SCHEMA,
        "settings": asdict(settings),
        "key": settings.key(),
        "directory": str(root),
        "base": str(base_dir),
        "adapters": {k: str(v) for k, v in adapters.items()},
        "n": {split_name: {t: len(data[t][split_name]) for t in settings.tasks}
              for split_name in ("train", "validation", "test")},
        "test_exact_match": rows,
        "mean": {row: mean({t: s[t] for t in settings.tasks}) for row, s in rows.items()},
        "wall_time_s": {"train": training_times(adapters), "evaluate": round(time.perf_counter() - t0, 1),
                        "total": round(time.perf_counter() - start, 1)},
        "environment": environment(),
    }
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, json.dumps(result, indent=2) + "\n")
    return result, evaluator


def zoo_markdown(result: dict) -> str:
    s = result["settings"]
    return "\n".join([
        "# Adapter zoo: SmolLM2-135M-Instruct, eight word-relation LoRAs",
        "",
        f"Exact match of greedy answers ({s['max_new_tokens']} new tokens) on held-out test pairs of gensim's "
        f"questions-words.txt; rows are models, columns tasks. Rank-{s['rank']} LoRAs (alpha {s['alpha']}) on "
        f"{', '.join(s['targets'])}, {s['steps']} steps of batch {s['batch_size']} per task "
        f"({s['multi_steps']} for the multi-task adapter on the union), lr {s['lr']}, seed {s['seed']}; "
        f"split {s['fractions']} by pair (no pair in two splits).",
        "",
        zoo_table(result["test_exact_match"], s["tasks"], result["n"]["test"]),
        "",
        f"Wall time: training {sum(result['wall_time_s']['train'].values()):.0f} s summed over the adapters "
        f"(from their `learn` reports; per adapter in zoo.json), "
        f"evaluation {result['wall_time_s']['evaluate']:.0f} s. Settings key `{result['key']}`.",
        "",
    ])


# ---- merge quality: the pure pieces of bench/merge_quality.py ----

def select_coefficient(validation: dict[float, dict[str, float]]) -> float:
    """The coefficient with the best mean VALIDATION exact match (the smallest on a tie).

    Takes validation scores only, so a test score cannot leak into the choice.
    """
    return min(validation, key=lambda c: (-statistics.fmean(validation[c].values()), c))


def normalised(merged: dict[str, float], individual: dict[str, float]) -> dict[str, float | None]:
    """acc_merged / acc_individual per task; None where the individual adapter scores 0."""
    return {t: round(merged[t] / individual[t], 4) if individual[t] else None for t in merged}


def over_seeds(runs: list[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """Per task: mean and (population) std over seeds; a single run has std 0."""
    out = {}
    for task in runs[0]:
        vals = [r[task] for r in runs if r[task] is not None]
        out[task] = {"mean": round(statistics.fmean(vals), 4) if vals else None,
                     "std": round(statistics.pstdev(vals), 4) if vals else None}
    return out


def write_zoo_results(settings: ZooSettings = ZooSettings(), results_dir: str | Path = "bench/results",
                      cache: str | Path | None = None, progress: bool = True) -> dict:
    """Run (or reuse) the zoo and write `zoo.json` and `zoo.md` into `results_dir`."""
    result, _ = run_zoo(settings, cache, progress)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "zoo.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "zoo.md", zoo_markdown(result))
    return result
