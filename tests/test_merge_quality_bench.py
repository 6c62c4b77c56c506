"""Issue 14's merge-quality pieces: generated tasks, KnOTS's per-layer form, the zoo's per-task seeds, early
stopping in `learn`, teacher-forced exact match, and the scale homogeneity the benchmark's search relies on."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_tokenizer, toy_records, write_jsonl
from malleable.data.generated import TASKS, generated_task
from malleable.deltas.linalg import knots_space, lowrank_from_dense
from malleable.deltas.lowrank import LowRankDelta
from malleable.errors import RecipeError
from malleable.merge import get_rule
from malleable.merge.ties import ties
from malleable.protocols.zoo import ZooSettings, adapter_key, load_data, train_adapters, train_seed


@pytest.mark.parametrize("task", list(TASKS))
def test_generated_tasks_are_deterministic_disjoint_and_large(task):
    a = generated_task(task, seed=0, n_test=200, n_validation=50, n_train=400)
    assert a == generated_task(task, seed=0, n_test=200, n_validation=50, n_train=400)
    assert a != generated_task(task, seed=1, n_test=200, n_validation=50, n_train=400)
    assert [len(a[s]) for s in ("test", "validation", "train")] == [200, 50, 400]
    prompts = {s: {r["prompt"] for r in a[s]} for s in a}
    assert sum(map(len, prompts.values())) == 650  # no prompt twice, within or across splits
    # more training items never move the test or validation items
    more = generated_task(task, seed=0, n_test=200, n_validation=50, n_train=500)
    assert more["test"] == a["test"] and more["validation"] == a["validation"]
    assert all(r["completion"].startswith(" ") and 1 < len(r["completion"]) < 16 for r in a["test"])


def test_generated_answers_are_right_and_bad_requests_refused():
    recs = generated_task("add", n_test=50, n_validation=0, n_train=0)["test"]
    for r in recs:
        x, y = r["prompt"].rstrip(" =").split(" + ")
        assert int(r["completion"]) == int(x) + int(y)
    city = generated_task("birth-city", n_test=300, n_validation=0, n_train=0)["test"]
    by_syllable = {}
    for r in city:  # the birthplace is a function of the first name's first syllable
        name = r["prompt"].removeprefix("Where was ").removesuffix(" born?")
        by_syllable.setdefault(next(s for s in sorted(_first_a(), key=len, reverse=True) if name.startswith(s)),
                               set()).add(r["completion"])
    assert all(len(v) == 1 for v in by_syllable.values()) and len(by_syllable) > 10
    with pytest.raises(RecipeError, match="multiply"):
        generated_task("multiply", n_test=800, n_validation=0, n_train=0)
    with pytest.raises(RecipeError, match="not a generated task"):
        generated_task("nope")


def _first_a():
    from malleable.data.fictitious import _FIRST_A
    return _FIRST_A


def test_knots_per_layer_merges_V_and_scales_by_S_afterwards():
    g = torch.Generator().manual_seed(0)
    deltas = [LowRankDelta(torch.randn(12, r, generator=g), torch.randn(r, 9, generator=g), s)
              for r, s in ((3, 2.0), (2, 0.5), (4, 1.0))]
    weights = [1.0, 1.0, 1.0]
    U, S, Vs = knots_space(deltas, dtype=torch.float64)
    # by hand: TIES (density 0.5) on the bare V_t, then U diag(S), then the best rank-4 approximation
    merged_V = ties([V.float().contiguous() for V in Vs], weights, None, **_ties_defaults(density=0.5, scale=0.7))
    want = lowrank_from_dense((U @ torch.diag(S) @ merged_V.double()).float(), 4).dense()
    got = get_rule("knots").fn(deltas, weights, torch.Generator(), 4, inner="ties", form="per_layer",
                               density=0.5, scale=0.7)
    torch.testing.assert_close(got.dense(), want, rtol=1e-4, atol=1e-5)
    # the original form trims S V_t instead: a different merge (TIES's trimming sees the singular values)
    orig = get_rule("knots").fn(deltas, weights, torch.Generator(), 4, inner="ties", density=0.5, scale=0.7)
    assert (orig.dense() - got.dense()).norm() > 1e-2 * got.dense().norm()
    # with a linear inner rule the two forms agree
    ta = [get_rule("knots").fn(deltas, weights, torch.Generator(), 9, inner="task_arithmetic", form=f)
          for f in ("original", "per_layer")]
    torch.testing.assert_close(ta[0].dense(), ta[1].dense(), rtol=1e-4, atol=1e-5)


def _ties_defaults(**over):
    rule = get_rule("ties")
    kw = {k: p.default for k, p in rule.params.items()}
    kw.update(over)
    kw["density"] = [kw["density"]] * 3
    return kw


def test_knots_form_is_validated():
    from malleable.merge.registry import get_rule as rule

    with pytest.raises(RecipeError, match="form"):
        rule("knots").params["form"].check("form", "sideways")


@pytest.mark.parametrize("method,params", [("knots", {"inner": "ties", "density": 0.5}),
                                           ("knots", {"inner": "ties", "density": 0.5, "form": "per_layer"}),
                                           ("core_space", {"inner": "ties", "density": 0.25}),
                                           ("ctm", {"inner": "ties", "density": 0.5}),
                                           ("ctm", {"inner": "task_arithmetic"})])
def test_lora_rules_are_homogeneous_in_scale(method, params):
    """The benchmark merges once at scale 1 and rescales the adapter: merge(s) must be s x merge(1)."""
    g = torch.Generator().manual_seed(1)
    deltas = [LowRankDelta(torch.randn(16, 4, generator=g), torch.randn(4, 10, generator=g), 2.0) for _ in range(3)]
    one = get_rule(method).fn(deltas, [1.0] * 3, torch.Generator(), 4, **params, scale=1.0).dense()
    half = get_rule(method).fn(deltas, [1.0] * 3, torch.Generator(), 4, **params, scale=0.35).dense()
    torch.testing.assert_close(half, 0.35 * one, rtol=1e-4, atol=1e-5)


def test_each_zoo_adapter_starts_from_its_own_seed(tiny_lm, tmp_path):
    s = ZooSettings(tasks=("add", "subtract"), data="generated", rank=2, targets=("q_proj",), steps=1,
                    batch_size=2, lr=1e-9, n_test=4, n_validation=2, n_train=4, multi=False, chat_template="off")
    assert train_seed(s, "add") != train_seed(s, "subtract") != train_seed(replace(s, seed=1), "subtract")
    shared = replace(s, per_task_seed=False)
    assert train_seed(shared, "add") == train_seed(shared, "subtract") == shared.seed
    assert adapter_key(s, "add") != adapter_key(shared, "add")

    def lora_a(settings, cache):
        paths = train_adapters(settings, tiny_lm, cache, load_data(settings), progress=False)
        return {t: next(v for k, v in load_file(p / "adapter_model.safetensors").items() if "lora_A" in k)
                for t, p in paths.items()}

    own = lora_a(s, tmp_path / "own")
    assert (own["add"] - own["subtract"]).abs().max() > 0.05  # lr 1e-9: A is still its initialisation
    same = lora_a(shared, tmp_path / "same")
    torch.testing.assert_close(same["add"], same["subtract"], rtol=0, atol=1e-6)


def test_early_stopping_keeps_the_best_weights(tiny_lm, tmp_path):
    from malleable.api import learn

    train = write_jsonl(tmp_path / "train.jsonl", toy_records(32))
    val = write_jsonl(tmp_path / "val.jsonl", toy_records(32, seed=1)[:16])  # another mapping: overfitting hurts
    recipe = {"model": str(tiny_lm), "method": "lora", "parameters": {"r": 4}, "seed": 0,
              "data": {"train": str(train), "validation": str(val)},
              "training": {"steps": 60, "batch_size": 16, "lr": 5e-2, "schedule": "constant", "log_every": 100,
                           "eval_every": 2, "patience": 2}}
    report = learn(recipe, tmp_path / "out", progress=False)
    final = report["final"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert final["stopped_at"] < 60 and final["stopped_at"] == max(losses)
    assert final["best_step"] == min(losses, key=losses.get) and final["stopped_at"] - final["best_step"] == 4
    assert final["val_loss"] == pytest.approx(final["best_val_loss"], abs=1e-5)  # the output IS the best
    with pytest.raises(RecipeError, match="patience"):
        learn({**recipe, "data": {"train": str(train)}}, tmp_path / "out2", progress=False)


def test_forced_match_equals_greedy_generation(tiny_lm):
    from transformers import AutoModelForCausalLM

    from malleable.evaluate.scoring import forced_match

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = tiny_tokenizer()
    prompts = [r["prompt"] for r in toy_records(12)]
    # gold answers: the model's own greedy continuation (must match) and perturbed ones (must not)
    gold = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
        gold.append(" " + tok.decode(out[0, ids.shape[1]:]))
    wrong = [" w1 w2" if g != " w1 w2" else " w3 w4" for g in gold]
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts + prompts, gold + wrong)]
    hits = forced_match(model, tok, records, chat=False, batch_size=5)
    assert hits == [True] * 12 + [False] * 12


def _bench():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import merge_quality  # the bench folder is not a package

    return merge_quality


def test_paired_bootstrap_and_the_claims_pairs():
    mq = _bench()
    ind = {"a": [1] * 50 + [0] * 50, "b": [1] * 80 + [0] * 20, "c": [0] * 100}  # c: no ratio, left out
    half = {"a": [1] * 25 + [0] * 75, "b": [1] * 40 + [0] * 60, "c": [0] * 100}
    close = {"a": [1] * 26 + [0] * 74, "b": [1] * 40 + [0] * 60, "c": [0] * 100}
    out = mq.bootstrap_normalised({"ind": ind, "half": half, "close": close}, ind, ["a", "b", "c"], "half",
                                  [("close", "half")], n=500)
    assert out["tasks_used"] == ["a", "b"]
    m = out["methods"]
    assert m["ind"]["mean_normalised"] == 1.0 and m["ind"]["ci95"] == [1.0, 1.0]
    assert m["half"]["mean_normalised"] == 0.5 and m["half"]["ci95"][0] < 0.5 < m["half"]["ci95"][1]
    # paired: one extra right item in 100 is a tiny difference with a tight CI, far tighter than each CI
    pair = out["pairs"][0]
    assert pair["diff"] == pytest.approx(0.01) and 0 <= pair["ci95"][0] <= pair["ci95"][1] <= 0.05
    assert pair["ci95"][1] - pair["ci95"][0] < (m["half"]["ci95"][1] - m["half"]["ci95"][0]) / 3
    methods = [{"label": lbl, "method": meth, "kind": kind, "tuning": [{"validation_mean": {"1.0": v}}]}
               for lbl, meth, kind, v in (("ta (merge-then-compress)", "task_arithmetic", "mtc", 0.3),
                                           ("ctm ta", "ctm", "native", 0.2), ("ctm ties", "ctm", "native", 0.4),
                                           ("knots", "knots", "native", 0.1), ("full", "ties", "full", 0.5))]
    assert mq.claim_pairs(methods) == [("ctm ties", "ta (merge-then-compress)"), ("ctm ties", "knots"),
                                       ("full", "ctm ties"), ("full", "ta (merge-then-compress)")]
    assert mq.scale_search(lambda c: {0.125: .1, 0.25: .3, 0.5: .2}.get(c, 0), (0.125, 0.25, 0.5)) == \
        {0.125: .1, 0.25: .3, 0.5: .2, 0.1768: 0, 0.3536: 0}
