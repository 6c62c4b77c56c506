"""Protocol 2: unlearning fictitious people from a language model, TOFU-style, offline and reproducible.

1. Generate the fictitious people (`data.fictitious`) into the cache.
2. Fine-tune the TARGET on everyone (`full`) and the RETAIN model (the gold standard) on the retain split only,
   both with `learn`'s engine and the same recipe (LoRA by default, merged into the base for use).
3. Unlearn the forget split from a fresh copy of the target with `forget.unlearn` (one objective, one seed).
   The objective's `examples` hook sees the forget records first: `dpo`'s preferred answer is each question's
   first perturbed answer, `idkdpo`'s a seeded refusal.
4. Evaluate target, retain model and unlearned model with `evaluate.llm_forget`; forget quality and privacy
   leakage are relative to the retain model.
5. Optionally (`relearning=`, e.g. `RELEARN`), attack every model with `protocols.relearn.relearn_forget`:
   the same fixed fine-tuning on the same seeded share of the forget split, measured on the held-back rest;
   the share recovered is relative to the target's numbers on those rows.

Trained models and the target's and retain model's evaluations (and attacks) are cached under
`$MALLEABLE_CACHE/forget_llm` (default `~/.cache/malleable/forget_llm`), named by a hash of exactly the
settings that decide them, so changing an unlearning setting retrains nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from malleable.protocols.zoo import settings_key

RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# The relearning attack on every model: a quarter of the forget split, 10 AdamW steps at the unlearning runs'
# own lr (1e-5, about their 13 steps on forget10 at 40 people), one seed for all so every model is measured on
# the same held-back rows. Calibration (bench/results/forget_llm_attack.md, forget10, CPU preset): this is the
# only setting tried under which the target nearly keeps its held-back answers (0.767 -> 0.750); 3x the lr or 3x the
# steps lower the target's and the retain model's (fine-tuning on five answers overwrites the other fifteen), yet
# raise an NPO or GradDiff model's gain beyond the retain model's from +0.02-0.03 to +0.045-0.075. So what an
# attack revives is read against the retain model's gain under it (`evaluate.llm_forget.excess_gain`), and a
# stronger attack (10 steps at 3e-5) is the next one to run on every model.
RELEARN = {"fraction": 0.25, "steps": 10, "lr": 1e-5, "batch_size": 4, "seed": 0}


@dataclass(frozen=True)
class ProtocolSettings:
    """Data, fine-tuning and evaluation settings; `key()` hashes those that decide each artefact."""

    people: int = 20
    qa_per_person: int = 5
    perturbed: int = 3
    data_seed: int = 0
    learn_method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    epochs: float = 5.0
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0
    retain_eval: int = 20  # retain questions evaluated (spread over the retain people)
    world_eval: int = 20  # world_facts questions evaluated
    max_new_tokens: int | str = 16  # or "gold": each answer's token length + llm_forget.GOLD_MARGIN

    def data_settings(self) -> dict:
        return {"people": self.people, "qa_per_person": self.qa_per_person, "perturbed": self.perturbed,
                "seed": self.data_seed}

    def train_settings(self) -> dict:
        return {**self.data_settings(), **{k: getattr(self, k) for k in ("learn_method", "rank", "alpha", "epochs",
                                                                           "batch_size", "lr", "seed")}}


def cache_root(cache: str | Path | None = None) -> Path:
    from malleable.protocols.zoo import cache_root as zoo_cache

    return Path(cache) if cache is not None else zoo_cache().with_name("forget_llm")


def protocol_data(settings: ProtocolSettings, cache: str | Path | None = None) -> tuple[Path, dict[str, list]]:
    """(folder of the JSONL splits, {split: records}); the folder is written once per data setting."""
    from malleable.data.fictitious import fictitious_splits, write_fictitious

    folder = cache_root(cache) / f"data-{settings_key(settings.data_settings())}"
    if not (folder / "settings.json").is_file():
        write_fictitious(folder, force=folder.exists(), **settings.data_settings())
    return folder, fictitious_splits(**settings.data_settings())


def train(settings: ProtocolSettings, base: Path, data_dir: Path, split: str, cache: str | Path | None = None,
          progress: bool = True) -> Path:
    """The learn output (adapter or checkpoint) fine-tuned on `split`; reused when already in the cache."""
    from malleable.learn.engine import learn
    from malleable.recipes.learn import parse_learn_recipe

    key = settings_key({**settings.train_settings(), "split": split, "base": str(base)})
    out = cache_root(cache) / f"model-{split}-{key}"
    if (out / "report.json").is_file():
        return out
    parameters = {"r": settings.rank, "alpha": settings.alpha} if settings.learn_method == "lora" else {}
    recipe = {"model": str(base), "method": settings.learn_method, "parameters": parameters,
              "data": {"train": str(data_dir / f"{split}.jsonl")},
              "training": {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
                           "schedule": "cosine", "warmup_steps": 5, "max_grad_norm": 1.0, "log_every": 10},
              "seed": settings.seed}
    learn(parse_learn_recipe(recipe), out, force=out.exists(), progress=progress)
    return out


def load_trained(base: Path, trained: Path):
    """(model, tokenizer) in float32 on accelerate's device (the GPU when there is one); a LoRA adapter is
    merged into its base so every weight can unlearn."""
    from accelerate import PartialState

    from malleable.models.checkpoints import load_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = load_model(trained, "causal_lm", tokenizer.pad_token_id)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(PartialState().device).eval(), tokenizer


def eval_sets(settings: ProtocolSettings, splits: dict[str, list], forget: str) -> dict[str, list[dict]]:
    """The records each model is evaluated on: the forget split, a spread sample of its retain split,
    world_facts, and as many holdout questions as the forget split has (the MIA's non-members)."""
    retain = splits[RETAIN_OF[forget]]
    step = max(1, len(retain) // settings.retain_eval)
    return {"forget": splits[forget], "retain": retain[::step][:settings.retain_eval],
            "world_facts": splits["world_facts"][:settings.world_eval],
            "holdout": splits["holdout"][:len(splits[forget])]}


def guard_records(settings: ProtocolSettings, splits: dict[str, list], forget: str) -> list[dict]:
    """Retain rows for the stop rule's retain guard: as many as utility is scored on, spread over the retain
    people like those but none of them, so the guard never reads a row the evaluation scores."""
    scored = eval_sets(settings, splits, forget)["retain"]
    rest = [r for r in splits[RETAIN_OF[forget]] if r not in scored]
    step = max(1, len(rest) // settings.retain_eval)
    return rest[step // 2::step][:settings.retain_eval]


def evaluate(model, tokenizer, sets: dict[str, list[dict]], settings: ProtocolSettings,
             batch_size: int = 16) -> dict[str, dict]:
    from malleable.evaluate.llm_forget import evaluate_set

    return {name: evaluate_set(model, tokenizer, records, role=name, max_new_tokens=settings.max_new_tokens,
                               batch_size=batch_size)
            for name, records in sets.items()}


class Protocol:
    """One forget split of the protocol: the data, the fine-tuned target and retain model, and their
    evaluations, ready for any number of unlearning runs."""

    def __init__(self, base: str | Path, settings: ProtocolSettings = ProtocolSettings(), forget: str = "forget10",
                 cache: str | Path | None = None, progress: bool = True, relearning: dict | None = None,
                 eval_batch_size: int = 16):
        if forget not in RETAIN_OF:
            from malleable.errors import RecipeError

            raise RecipeError(f"forget split: '{forget}' is not one of {sorted(RETAIN_OF)}")
        self.base, self.settings, self.forget, self.cache = Path(base), settings, forget, cache
        self.relearning, self.eval_batch_size = relearning, eval_batch_size
        self.data_dir, self.splits = protocol_data(settings, cache)
        self.sets = eval_sets(settings, self.splits, forget)
        t0 = time.perf_counter()
        self.target_dir = train(settings, self.base, self.data_dir, "full", cache, progress)
        self.retain_dir = train(settings, self.base, self.data_dir, RETAIN_OF[forget], cache, progress)
        reports = {name: json.loads((d / "report.json").read_text())
                   for name, d in (("target", self.target_dir), ("retain", self.retain_dir))}
        self.fine_tune = {name: {"seconds": r["wall_time_s"], "steps": r["batches"]["steps"], **r["final"]}
                          for name, r in reports.items()}
        self.setup_seconds = round(time.perf_counter() - t0, 1)
        from malleable.evaluate.llm_forget import METRIC_DEFINITIONS

        # keyed by the metric definitions too: evaluations cached under earlier ones are not reused
        self.evals = {name: self._cached(d, "eval", lambda m, t: evaluate(m, t, self.sets, self.settings,
                                                                           eval_batch_size),
                                         {"metrics": METRIC_DEFINITIONS})
                      for name, d in (("target", self.target_dir), ("retain", self.retain_dir))}
        self.relearned = None if relearning is None else {
            name: self.reference_attack(name, relearning) for name in ("target", "retain")}

    def _cached(self, trained: Path, kind: str, compute, extra: dict | None = None) -> dict:
        """`compute(model, tokenizer)` of a trained model, kept beside it; keyed by the settings and `extra`."""
        key = settings_key({**asdict(self.settings), "forget": self.forget, **(extra or {})})
        path = trained / f"{kind}-{self.forget}-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = compute(*load_trained(self.base, trained))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(path)
        return result

    def attack(self, model, tokenizer, relearning: dict | None = None) -> dict:
        """`relearn_forget` on the forget split with `relearning` (default: the protocol's own attack)."""
        from malleable.protocols.relearn import relearn_forget

        return relearn_forget(model, tokenizer, self.sets["forget"], max_new_tokens=self.settings.max_new_tokens,
                              eval_batch_size=self.eval_batch_size, **(relearning or self.relearning))

    def reference_attack(self, name: str, relearning: dict) -> dict:
        """The target's or the retain model's attack result under `relearning`, cached beside the model."""
        trained = {"target": self.target_dir, "retain": self.retain_dir}[name]
        return self._cached(trained, "relearn", lambda m, t: self.attack(m, t, relearning), relearning)

    def items(self, records: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
        from malleable.learn.data import encode_pair, uses_chat_template

        chat = uses_chat_template(tokenizer, "auto")
        return [encode_pair(tokenizer, r["prompt"], r["completion"], chat) for r in records]

    def unlearned(self, objective: str, seed: int = 0, calibrate: dict | None = None, *,
                  lr: float | list[float], **kwargs):
        """(forget.unlearn's result, tokenizer, the stop rule or None, the step-size search or None: the
        chosen lr and what each one did): the forget split unlearned from a fresh copy of the target. `kwargs` go
        to `forget.unlearn` (parameters, epochs or steps, batch_size, lora, mask...). `calibrate`
        ({"tolerance": ..., "check_every": ...}) stops the run with `StopRule("indistinguishable")`: the forget
        rows' loss attack against the `calibration` split's people, never-trained people other than the
        evaluation's holdout, so the rule does not read the rows the evaluation's membership attack is scored
        on; the budget in `kwargs` is then the most it may run, and `lr` may be a list, searched as
        `forget.stopping.search_step_size` does (the run keeps the chosen one). `calibrate["retain_limit"]`, a
        factor, adds the rule's retain guard on `guard_records` (its limit: that factor of the target's loss
        on them)."""
        from malleable.forget import unlearn
        from malleable.forget.registry import get_objective
        from malleable.forget.stopping import StopRule, retain_bound, search_step_size
        from malleable.learn.data import collate
        from malleable.models.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(self.base)
        retain = self.items(self.splits[RETAIN_OF[self.forget]], tokenizer)
        pad = tokenizer.pad_token_id

        def batch(b):
            return collate(b, pad)

        records = [{**r, "alternate": r["perturbed_answers"][0]} for r in self.sets["forget"]]  # dpo's alternative
        items = self.items(self.sets["forget"], tokenizer)
        forget = get_objective(objective, kwargs.get("parameters") or {}).examples(items, tokenizer, seed=seed,
                                                                                  records=records)
        def run_at(step_size, stop):
            model = load_trained(self.base, self.target_dir)[0]
            return unlearn(model, forget=forget, retain=retain, collate=batch, objective=objective, seed=seed,
                           lr=step_size, stop=stop, **kwargs)

        if calibrate is None:
            if isinstance(lr, list):
                raise ValueError("lr: a list of step sizes needs calibrate (the stop rule decides between them)")
            result, stop, search = run_at(lr, None), None, None
        else:
            calibration = self.items(self.splits["calibration"], tokenizer)  # tokenised once for every lr tried
            rule = dict(calibrate)
            if rule.get("retain_limit") is not None:
                guard = self.items(guard_records(self.settings, self.splits, self.forget), tokenizer)
                target = load_trained(self.base, self.target_dir)[0]
                rule.update(retain=guard, retain_limit=retain_bound(target, guard, batch, rule["retain_limit"],
                                                                    self.eval_batch_size))
                del target
            chosen, result, stop, tried = search_step_size(
                lr if isinstance(lr, list) else [lr], run_at,
                lambda: StopRule("indistinguishable", items, batch, calibration=calibration,
                                 batch_size=self.eval_batch_size, **rule))
            search = {"lr": chosen, "tried": tried} if isinstance(lr, list) else None
        result.model.eval()
        return result, tokenizer, stop, search

    def unlearn(self, objective: str, seed: int = 0, calibrate: dict | None = None, *, lr: float | list[float],
                **kwargs) -> dict:
        """`unlearned`, then its metrics and the run's cost. With `relearning`, "relearn" holds the attack's
        before/after numbers and what came back; with `calibrate`, "stopping" the stop rule's report (its
        curve, the step it stopped at, the check it rolled back to, its verdict on the calibration rows)."""
        from malleable.evaluate.llm_forget import summarise

        result, tokenizer, stop, search = self.unlearned(objective, seed, calibrate, lr=lr, **kwargs)
        evals = evaluate(result.model, tokenizer, self.sets, self.settings, self.eval_batch_size)
        out = {"objective": objective, "seed": seed, "settings": {**kwargs, "lr": lr},
               "seconds": round(result.seconds, 1), "steps": result.steps,
               "summary": summarise(evals, self.evals["retain"]), "evals": evals}
        if stop is not None:
            out["stopping"] = stop.report()
        if search is not None:
            out["lr_search"] = search
        if self.relearning is not None:
            out["relearn"] = self._returned(self.attack(result.model, tokenizer))
        return out

    def reference_summaries(self) -> dict[str, dict]:
        """The target's and the retain model's headline numbers (the retain model's forget quality is 1.0),
        with their relearning attacks when there are any."""
        from malleable.evaluate.llm_forget import summarise

        out = {"target": summarise(self.evals["target"], self.evals["retain"]),
               "retain": summarise(self.evals["retain"], None)}
        for name, attack in (self.relearned or {}).items():
            out[name]["relearn"] = self._returned(attack)
        return out

    def _returned(self, attack: dict) -> dict:
        """An attack's result (under the protocol's own attack, whose settings it records) with what came back:
        the share of the target's lead it closed, and its gain beyond the retain model's under the same attack."""
        from malleable.evaluate.llm_forget import came_back

        return {**attack, "settings": self.relearning,
                **came_back(self.relearned["target"], self.relearned["retain"], attack)}
