"""Routed serving: a fitted router picks a candidate per query, and the pool answers in as few calls as it can.

    from malleable.route import RoutedModel
    served = RoutedModel.from_fitted("fitted/", "knn")        # the pool from the build report `fit` read
    for a in served.answer(["37 + 48 =", "capital of France?"]):
        print(a.candidate, a.answer)

Each distinct base model is loaded once. Every PEFT adapter on that base goes into ONE PeftModel (under its
candidate's name), and the queries routed to any of them, or to the base itself, are answered by one generate
call per batch with PEFT's mixed-batch inference (`adapter_names`, "__base__" for the base): every row runs with
its own adapter. A whole-model candidate (a checkpoint that no adapter of the pool is built on) is loaded once
and answers its own queries. Prompts are rendered and decoded as `route build` measured them
(evaluate/generation.py, with the build's `chat_template` setting: greedy, left padding), and embedded with the
encoder the build used (route/build.py's `load_encoder`), so the router sees the features it was fitted on.

The `arrow` router is served too: the Arrow scores of new prompts come from one forward of the adapters'
PeftModel with its adapters disabled (the base's module inputs), with the build's top_k and temperature.

The tokenizer of an adapter group is its base's: all adapters on one base share a batch, hence a tokenizer.
The encoder loads once, at the first batch that needs it; `embedder` (prompts -> unit-length embeddings)
replaces it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from malleable.errors import InputError, reason
from malleable.recipes.route import ArrowSpec, RouteRunRecipe, load_route_run_recipe
from malleable.route.registry import Router

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
NOT_SERVABLE = {"oracle": "it reads each query's true quality, which new queries do not have"}


@dataclass
class Answer:
    prompt: str
    candidate: str
    answer: str


@dataclass
class Queries:
    """What a router's `choose` reads of a batch: the embeddings, the task names (may be unknown, '') and, for
    Arrow, its scores."""

    X: np.ndarray | None
    task: np.ndarray
    A: np.ndarray | None = None  # Arrow scores (queries x candidates), for the `arrow` router

    def __len__(self) -> int:
        return len(self.task)


@dataclass
class Group:
    """One loaded model and the candidates it answers for: candidate -> PEFT adapter name (or BASE), or
    candidate -> None for a whole model."""

    model: object
    tokenizer: object
    members: dict[str, str | None] = field(default_factory=dict)


def _adapter_name(candidate: str, taken: set[str]) -> str:
    """The candidate's name as a PEFT adapter name (a module key: no dots), distinct from the others."""
    name = candidate.replace(".", "_")
    while name in taken or name == BASE:
        name += "_"
    taken.add(name)
    return name


def load_pool(pool: dict[str, Path], trust=None) -> dict[Path, Group]:
    """Every candidate loaded: one group per distinct base (its adapters in one PeftModel; the base itself,
    when a candidate, answers through it as BASE) and one per whole model. A folder that fails to load is one
    InputError naming the candidate."""
    from malleable.models.checkpoints import Trust, check_model_folder, load_model, load_tokenizer

    trust = trust or Trust()
    kinds = {}
    for name, path in pool.items():
        try:
            base, adapter = check_model_folder(Path(path), trust)
        except InputError as e:
            raise InputError(f"candidate '{name}': {e}") from None
        kinds[name] = (base.resolve(), adapter)  # a checkpoint is its own base
    groups: dict[Path, Group] = {}
    for root in dict.fromkeys(b for b, _ in kinds.values()):
        users = [n for n, (b, _) in kinds.items() if b == root]
        try:
            tokenizer = load_tokenizer(root, trust)
            group = Group(load_model(root, "causal_lm", tokenizer.pad_token_id, trust=trust), tokenizer)
        except InputError as e:
            raise InputError(f"candidate '{users[0]}': {e}") from None
        taken: set[str] = set()
        for name in users:
            if kinds[name][1]:
                group.members[name] = _adapter_name(name, taken)
                group.model = _add_adapter(group.model, Path(pool[name]), group.members[name], name)
            else:
                group.members[name] = None
        if taken:  # the base itself answers through the PeftModel, as PEFT's "__base__"
            group.members = {n: (BASE if v is None else v) for n, v in group.members.items()}
        group.model.eval()
        groups[root] = group
    return groups


def _add_adapter(model, path: Path, adapter: str, candidate: str):
    from peft import PeftModel

    from malleable.io.quiet import quiet_transformers

    try:
        with quiet_transformers():
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=adapter)
                return model
            return PeftModel.from_pretrained(model, path, adapter_name=adapter)
    except Exception as e:  # PEFT raises ValueError, KeyError, RuntimeError (shapes) on a bad adapter
        raise InputError(f"{path}: candidate '{candidate}': cannot load the adapter ({reason(e, typed=True)})"
                         ) from None


class RoutedModel:
    """A pool of candidates behind a fitted router: `answer(prompts)` embeds, routes and answers a batch.

    `pool` maps every candidate the router routes to (`candidates`, in the router's column order; default
    the pool's) to its model folder. `value` is the router's trade-off (willingness to pay, ...), by default
    the one chosen on validation. `embedder` (prompts -> L2-normalised embeddings) replaces the
    sentence-transformers `encoder`. `arrow` (top_k, temperature) is the `arrow` router's setting, the build's
    when loaded from a fit. Without a router, `generate(prompts, candidates)` serves a given routing.
    """

    def __init__(self, pool: dict[str, str | Path], router: Router | None = None,
                 candidates: Sequence[str] | None = None, *,
                 value: float | None = None, encoder: str | Path | None = None,
                 embedder: Callable[[list[str]], np.ndarray] | None = None, max_new_tokens: int = 8,
                 batch_size: int = 16, chat_template: str = "auto", arrow: ArrowSpec | None = None, trust=None,
                 progress: bool = False):
        candidates = list(pool) if candidates is None else candidates
        missing = [c for c in candidates if c not in pool]
        if missing:
            raise InputError(f"pool: no model for candidate '{missing[0]}', which the router routes to (the pool "
                             f"has {', '.join(pool) or 'none'})")
        if router is not None and router.name in NOT_SERVABLE:
            raise InputError(f"router '{router.name}' cannot answer new queries: {NOT_SERVABLE[router.name]}")
        self.router, self.value, self.candidates = router, value, list(candidates)
        self.encoder, self.embedder = encoder, embedder
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress
        self.chat_template = chat_template
        self.arrow, self._arrow = arrow or ArrowSpec(), None
        self.pool = {c: Path(pool[c]) for c in self.candidates}
        self.groups = load_pool(self.pool, trust)
        self.group_of = {c: g for g in self.groups.values() for c in g.members}

    @classmethod
    def from_fitted(cls, fitted: str | Path, router: str, pool: str | Path | RouteRunRecipe | None = None,
                    **options) -> RoutedModel:
        """The router `router` written by `malleable route fit` in `fitted`, at its validation-chosen value,
        over the pool `route build` ran (found through fit's report), or over `pool` (a YAML file: the build
        recipe or its `candidates:` list)."""
        r, value, candidates, recipe = resolve(fitted, router, pool)
        return cls.from_recipe(recipe, r, candidates, value=options.pop("value", value), **options)

    @classmethod
    def from_recipe(cls, recipe: RouteRunRecipe, router: Router | None, candidates: Sequence[str] | None = None,
                    **options) -> RoutedModel:
        from malleable.models.checkpoints import Trust

        settings = {"encoder": recipe.encoder, "max_new_tokens": recipe.max_new_tokens,
                    "batch_size": recipe.batch_size, "chat_template": recipe.chat_template, "arrow": recipe.arrow,
                    "trust": Trust(remote_code=recipe.trust_remote_code, pickle=recipe.allow_pickle)}
        return cls({c.name: c.model for c in recipe.candidates}, router, candidates, **(settings | options))

    def embed(self, prompts: list[str]) -> np.ndarray:
        if self.embedder is None:
            from malleable.route.build import load_encoder

            self.embedder = load_encoder(self.encoder)
        return np.asarray(self.embedder(prompts), dtype=np.float32)

    def route(self, prompts: list[str], tasks: list[str] | None = None) -> list[str]:
        """The candidate each prompt goes to (`tasks`: each prompt's task name, for routers that read it)."""
        if self.router is None:
            raise InputError("this RoutedModel has no router: give each prompt's candidate to generate()")
        X = self.embed(prompts) if self.router.needs_embeddings else None
        A = self.arrow_scores(prompts) if self.router.needs_arrow else None
        task = np.array(tasks if tasks is not None else [""] * len(prompts), dtype=object)
        picks = self.router.choose(Queries(X, task, A), self.value)
        return [self.candidates[int(i)] for i in picks]

    def arrow_scores(self, prompts: list[str]) -> np.ndarray:
        """(prompts x candidates) Arrow scores, NaN outside the router's adapter library, as `route build` computes
        them (route/arrow.py): the module inputs are read in one forward of the library's PeftModel with its
        adapters disabled, i.e. of the base, so no second copy of the base is loaded. The prototypes are
        computed at the first call."""
        from malleable.learn.data import uses_chat_template
        from malleable.route.arrow import prototypes, query_scores

        if self._arrow is None:
            library = [self.candidates[j] for j in self.router.info.get("adapters", [])]
            group = self.group_of.get(library[0]) if library else None
            if group is None or any(self.group_of.get(c) is not group or group.members[c] in (None, BASE)
                                    for c in library):
                raise InputError(f"router 'arrow': its library ({', '.join(library) or 'none'}) is not a set of "
                                 "PEFT adapters on one base in this pool")
            self._arrow = group, [self.candidates.index(c) for c in library], prototypes(
                [self.pool[c] for c in library])
        group, idx, protos = self._arrow
        with group.model.disable_adapter():
            scores = query_scores(group.model.get_base_model(), group.tokenizer, prompts, protos,
                                  top_k=self.arrow.top_k, temperature=self.arrow.temperature,
                                  batch_size=self.batch_size, chat=uses_chat_template(group.tokenizer,
                                                                                     self.chat_template))
        A = np.full((len(prompts), len(self.candidates)), np.nan)
        A[:, idx] = scores
        return A

    def generate(self, prompts: list[str], candidates: list[str]) -> list[str]:
        """Each prompt answered by its candidate: one mixed-adapter generation per batch for the candidates of
        one base, separate calls for whole models; answers in input order."""
        from malleable.evaluate.generation import generate
        from malleable.learn.data import uses_chat_template

        unknown = sorted({c for c in candidates if c not in self.group_of})
        if unknown:
            raise InputError(f"candidate '{unknown[0]}' is not in the pool ({', '.join(self.candidates)})")
        from tqdm import tqdm

        answers: list[str | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="answering", disable=not self.progress, leave=False)
        for group in self.groups.values():
            rows = [i for i, c in enumerate(candidates) if c in group.members]
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                names = [group.members[candidates[i]] for i in batch]
                out = generate(group.model, group.tokenizer, [prompts[i] for i in batch],
                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                               chat=uses_chat_template(group.tokenizer, self.chat_template),
                               adapter_names=names if names[0] is not None else None)
                for i, a in zip(batch, out):
                    answers[i] = a
                bar.update(len(batch))
        bar.close()
        return answers

    def answer(self, prompts: list[str], tasks: list[str] | None = None) -> list[Answer]:
        """Route and answer a batch of prompts; answers in input order, each with the candidate that gave it."""
        chosen = self.route(prompts, tasks)
        return [Answer(p, c, a) for p, c, a in zip(prompts, chosen, self.generate(prompts, chosen))]


def resolve(fitted: str | Path, router: str, pool: str | Path | RouteRunRecipe | None = None
            ) -> tuple[Router, float | None, list[str], RouteRunRecipe]:
    """(the fitted router, its validation-chosen value, its candidates, the pool), read and checked, nothing
    loaded yet."""
    r, value, candidates = load_router(fitted, router)
    if isinstance(pool, RouteRunRecipe):
        return r, value, candidates, pool
    return r, value, candidates, load_route_run_recipe(pool) if pool is not None else pool_of_fit(fitted)


def load_router(fitted: str | Path, name: str) -> tuple[Router, float | None, list[str]]:
    """(router `name` of the `fit` output `fitted`, its value chosen on validation, its candidates)."""
    from malleable.route.engine import load_routers

    routers, chosen, candidates = load_routers(fitted)
    if name not in routers:
        raise InputError(f"{Path(fitted) / 'routers'}: no router '{name}' (fitted: {', '.join(sorted(routers))})")
    return routers[name], chosen[name], candidates


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read ({reason(e)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    return data


def pool_of_fit(fitted: str | Path) -> RouteRunRecipe:
    """The pool `route build` ran: fit's report names the matrices folder, whose build report holds the build
    recipe (each candidate's model folder, the encoder, the decoding settings)."""
    from malleable.recipes.route import parse_route_run_recipe
    from malleable.route.build import SCHEMA as BUILD_SCHEMA

    matrices = _json(Path(fitted) / "report.json").get("matrices")
    unknown = ("so the candidates' model folders are unknown; pass --pool POOL.yaml (the build recipe, or its "
               "candidates: list)")
    if not isinstance(matrices, str) or not Path(matrices).is_dir():
        raise InputError(f"{fitted}: the matrices it was fitted on ({matrices}) are not found, {unknown}")
    report = Path(matrices) / "report.json"
    if not report.is_file() or _json(report).get("schema") != BUILD_SCHEMA:
        raise InputError(f"{fitted}: its matrices {matrices} were not written by `malleable route build`, {unknown}")
    return parse_route_run_recipe(_json(report).get("recipe"), str(report))


def read_queries(path: str | Path) -> tuple[list[dict], list[str]]:
    """The input rows ({prompt, optional id, optional task}), checked: each has a non-empty prompt."""
    from malleable.data.files import load_table

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: no queries (the file is empty)")
    rows, where = load_table(path)
    if not rows:
        raise InputError(f"{path}: no queries")
    for row, w in zip(rows, where):
        p = row.get("prompt")
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"{path}: {w} has no prompt (a non-empty text 'prompt' field)")
    return rows, where


def run(fitted: str | Path, router: str, queries: str | Path, out: str | Path, pool: str | Path | None = None,
        force: bool = False, **options) -> dict:
    """`malleable route run`: answer every row of `queries` (JSONL / CSV / Parquet with a prompt, optional id
    and task) with the routed pool, and write `out` (JSONL: id, prompt, candidate, answer), atomically."""
    from malleable.io.atomic import check_not_input, check_output_file, write_text_atomic

    out = check_output_file(out, force, [queries, fitted] + ([pool] if pool is not None else []))
    rows, _ = read_queries(queries)
    r, value, candidates, recipe = resolve(fitted, router, pool)
    check_not_input(out, [c.model for c in recipe.candidates if c.name in candidates], "output")
    start = time.perf_counter()
    served = RoutedModel.from_recipe(recipe, r, candidates, value=options.pop("value", value), **options)
    loaded = time.perf_counter()
    tasks = [str(r["task"]) if r.get("task") is not None else "" for r in rows]
    answers = served.answer([r["prompt"] for r in rows], tasks)
    served_s = time.perf_counter() - loaded
    lines = []
    for row, a in zip(rows, answers):
        record = {"id": row["id"]} if row.get("id") is not None else {}
        lines.append(json.dumps(record | {"prompt": a.prompt, "candidate": a.candidate, "answer": a.answer}))
    write_text_atomic(out, "\n".join(lines) + "\n")
    counts = {c: sum(a.candidate == c for a in answers) for c in served.candidates}
    return {"router": router, "value": served.value, "queries": len(rows), "per_candidate": counts,
            "load_s": round(loaded - start, 3), "serve_s": round(served_s, 3), "output": {"path": str(out)}}
