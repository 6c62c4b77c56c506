"""Protocol 2 (TOFU-style LM unlearning): the fictitious-people generator and the metrics, on the tiny Llama."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import WORDS, tiny_tokenizer
from malleable.data.fictitious import fictitious_splits, write_fictitious
from malleable.evaluate import llm_forget as M
from malleable.learn.data import collate, encode_pair
from malleable.learn.loss import task_loss
from malleable.protocols.relearn import relearn_forget


def _bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_generator_is_deterministic_and_seeded(tmp_path):
    a = write_fictitious(tmp_path / "a", people=30, seed=1)
    b = write_fictitious(tmp_path / "b", people=30, seed=1)
    c = write_fictitious(tmp_path / "c", people=30, seed=2)
    assert _bytes(a) == _bytes(b)
    assert _bytes(a)["full.jsonl"] != _bytes(c)["full.jsonl"]
    assert json.loads((a / "forget10.jsonl").read_text().splitlines()[0]).keys() >= {
        "prompt", "completion", "paraphrased_answer", "perturbed_answers"}


def test_splits_partition_people_and_perturbed_answers_are_wrong():
    s = fictitious_splits(people=40, qa_per_person=8, perturbed=4, seed=0)
    people = lambda split: {r["person"] for r in s[split]}  # noqa: E731
    assert people("forget01") < people("forget05") < people("forget10")  # nested, like TOFU
    for pct in ("01", "05", "10"):
        forget, retain = people(f"forget{pct}"), people(f"retain{100 - int(pct):02d}")
        assert not forget & retain and forget | retain == people("full")
    assert not people("holdout") & people("full")
    assert len(people("forget10")) == 4 and len(people("holdout")) == 4
    # a stop rule's own never-trained people: none trained, none in the evaluation's holdout
    assert len(people("calibration")) == 4 and not people("calibration") & (people("full") | people("holdout"))
    for r in s["full"] + s["world_facts"]:
        assert len(r["perturbed_answers"]) in (3, 4)
        assert r["paraphrased_answer"] not in r["perturbed_answers"]
        assert len(set(r["perturbed_answers"])) == len(r["perturbed_answers"])
    assert s["world_facts"][0]["prompt"].startswith("What is the capital of")


def test_tofu_size_and_old_settings_keep_their_bytes():
    """200 people x 20 QA needs the extra facts and titles; up to 8 QA the data is what it was (the committed
    40 x 5 results were made from these bytes)."""
    s = fictitious_splits(people=200, qa_per_person=20, perturbed=3, seed=0)
    people = lambda split: {r["person"] for r in s[split]}  # noqa: E731
    assert [len(people(f"forget{p}")) for p in ("01", "05", "10")] == [2, 10, 20]  # TOFU's split sizes
    assert len(s["full"]) == 4000 and len({r["prompt"] for r in s["full"]}) == 4000
    for r in s["forget10"]:
        assert r["paraphrased_answer"] not in r["perturbed_answers"]
    assert len(fictitious_splits(people=10, qa_per_person=2)["forget01"]) == 2  # 1% of 10 rounds up to one person
    splits = fictitious_splits(people=40, qa_per_person=5)
    old = json.dumps({k: v for k, v in splits.items() if k != "calibration"}, sort_keys=True).encode()  # added later
    assert hashlib.sha256(old).hexdigest().startswith("ad7a7892198ac881")


# ---- metrics on the tiny model ----

def _records(rng: random.Random, n: int, length: int = 4) -> list[dict]:
    """Word-level QA the tiny tokenizer can read: random words as prompt, answer, paraphrase, perturbed."""
    words = lambda: " ".join(rng.choice(WORDS) for _ in range(length))  # noqa: E731
    return [{"prompt": "map: " + words(), "completion": words(), "paraphrased_answer": words(),
             "perturbed_answers": [words() for _ in range(3)]} for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def memorised(tiny_lm, tok):
    """The tiny model overfit on 8 QA pairs, and those records (paraphrase = the trained completion)."""
    from transformers import AutoModelForCausalLM

    records = [dict(r, paraphrased_answer=r["completion"]) for r in _records(random.Random(0), 8)]
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    items = [encode_pair(tok, r["prompt"], r["completion"], True) for r in records]
    batch = collate(items, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        task_loss(model, batch).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), records


def test_memorised_answers_score_as_memorised(memorised, tok):
    model, records = memorised
    scored = M.score_pairs(model, tok, [(r["prompt"], r["completion"]) for r in records], batch_size=3)
    assert all(M.extraction_strength(s["correct"]) == 1.0 for s in scored)
    assert min(M.normalised_probability(s["logprobs"]) for s in scored) > 0.9
    ratios = M.truth_ratios(model, tok, records)
    assert np.all(ratios < 0.1) and M.truth_score(ratios) > 0.9  # the paraphrase was trained, the rest not
    unseen = _records(random.Random(1), 8)
    members = [M.min_k_score(s["logprobs"]) for s in scored]
    others = [M.min_k_score(s["logprobs"]) for s in M.score_pairs(
        model, tok, [(r["prompt"], r["completion"]) for r in unseen])]
    assert M.membership_auc(np.array(members), np.array(others)) == 1.0


def test_truth_ratio_and_batching_sanity(tiny_lm, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    records = _records(random.Random(2), 6)
    same = [dict(r, perturbed_answers=[r["paraphrased_answer"]] * 3) for r in records]
    assert np.allclose(M.truth_ratios(model, tok, same), 1.0, atol=1e-5)
    assert M.forget_truth_score(np.ones(4)) == 1.0
    one = M.truth_ratios(model, tok, records, batch_size=1)  # padding must not change any number
    assert np.allclose(one, M.truth_ratios(model, tok, records, batch_size=6), rtol=1e-4)
    assert np.all(one > 0) and np.all(np.isfinite(one))
    assert M.forget_quality(one, one) == 1.0


def test_min_k_auc_is_chance_on_one_distribution(tiny_lm, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    rng = random.Random(3)
    a, b = (M.score_pairs(model, tok, [(r["prompt"], r["completion"]) for r in _records(rng, 150, 6)],
                          batch_size=50) for _ in range(2))
    auc = M.membership_auc(*(np.array([M.min_k_score(s["logprobs"]) for s in x]) for x in (a, b)))
    assert abs(auc - 0.5) < 0.1


def test_small_pure_metrics():
    assert M.rouge_l_recall(["Paris is the capital"], ["Paris is the capital"])[0] == 1.0
    assert M.rouge_l_recall(["Paris"], ["The capital is Paris"])[0] == 0.25
    assert M.extraction_strength(np.array([False, True, True, True])) == 0.75
    assert M.extraction_strength(np.array([True, True, False])) == 0.0
    assert M.privacy_leakage(0.25, 0.5) == 50.0 and np.isnan(M.privacy_leakage(0.5, 1.0))
    assert M.model_utility({"probability": 0.5, "rouge_l": 0.5, "truth_ratio": 0.5},
                           {"probability": 0.5, "rouge_l": 0.5, "truth_ratio": 0.5}) == pytest.approx(0.5)
    target = {"before": {"probability": 0.8, "rouge_l": 0.9}}
    attacked = {"before": {"probability": 0.2, "rouge_l": 0.895}, "after": {"probability": 0.35, "rouge_l": 0.95}}
    # 0.15 of the 0.6 removed came back; ROUGE-L lost only 0.005 < MIN_REMOVED, no share
    assert M.recovered(target, attacked) == {"probability": pytest.approx(0.25), "rouge_l": None}
    retain = {"before": {"probability": 0.3, "rouge_l": 0.5}, "after": {"probability": 0.35, "rouge_l": 0.45}}
    # the attack added 0.15 probability here and 0.05 to the never-trained retain model: 0.10 revived
    assert M.excess_gain(retain, attacked) == {"probability": pytest.approx(0.10), "rouge_l": pytest.approx(0.105)}
    assert M.came_back(target, retain, retain)["excess_gain"] == {"probability": 0.0, "rouge_l": 0.0}


def test_relearning_attack_brings_back_what_ga_removed(memorised, tok):
    """The attack on the held-back half: after GA its forget probability is near zero and rises again, and the
    share recovered is (after - before) / (target's before - before)."""
    from malleable.forget import unlearn

    model, records = memorised
    attack = {"fraction": 0.5, "steps": 5, "lr": 3e-3, "batch_size": 4, "seed": 0}
    target = relearn_forget(model, tok, records, max_new_tokens=4, **attack)
    items = [encode_pair(tok, r["prompt"], r["completion"], True) for r in records]
    ga = unlearn(copy.deepcopy(model), forget=items, retain=None, collate=lambda b: collate(b, tok.pad_token_id),
                 objective="ga", steps=5, lr=3e-3, batch_size=8).model
    attacked = relearn_forget(ga, tok, records, max_new_tokens=4, **attack)
    assert target["trained_on"] == attacked["trained_on"] == 4 and attacked["measured_on"] == 4
    assert set(attacked["before"]) == set(M.RELEARN_METRICS)
    before, after, original = (attacked["before"]["probability"], attacked["after"]["probability"],
                               target["before"]["probability"])
    assert original > 0.9 and before < 0.05  # memorised, then removed by GA
    assert after > 2 * before
    share = M.recovered(target, attacked)["probability"]
    assert share == pytest.approx((after - before) / (original - before)) and 0 < share < 1


def test_protocol_end_to_end_on_the_tiny_model(tiny_lm, tmp_path):
    """Data, target and retain fine-tunes through `learn`, cached evaluations, one unlearning run."""
    from malleable.protocols.forget_llm import Protocol, ProtocolSettings, guard_records

    settings = ProtocolSettings(people=10, qa_per_person=2, epochs=1, batch_size=4, retain_eval=4, world_eval=4,
                                max_new_tokens=4)
    attack = {"fraction": 0.5, "steps": 2, "lr": 1e-3, "batch_size": 2, "seed": 0}
    # forget01 of 10 people: one person, the smallest split
    proto = Protocol(tiny_lm, settings, "forget01", cache=tmp_path, progress=False, relearning=attack)
    assert len(proto.sets["forget"]) == 2 and len(proto.sets["holdout"]) == 2
    refs = proto.reference_summaries()
    assert refs["retain"]["forget_quality"] == 1.0 and refs["retain"]["privacy_leakage"] == 0.0
    assert refs["target"]["relearn"]["recovered"] == {"probability": None, "rouge_l": None}  # nothing removed
    assert refs["retain"]["relearn"]["measured_on"] == 1
    again = Protocol(tiny_lm, settings, "forget01", cache=tmp_path, progress=False, relearning=attack)
    assert again.evals == json.loads(json.dumps(proto.evals))  # all from the cache
    assert again.relearned == json.loads(json.dumps(proto.relearned))
    run = proto.unlearn("graddiff", seed=0, steps=2, batch_size=2, lr=1e-3)
    assert run["steps"] == 2 and 0 <= run["summary"]["forget_quality"] <= 1
    assert set(run["summary"]) >= {"model_utility", "mia_auc_min_k", "privacy_leakage", "forget_extraction_strength"}
    assert set(run["relearn"]["recovered"]) == set(run["relearn"]["excess_gain"]) == {"probability", "rouge_l"}
    assert refs["retain"]["relearn"]["excess_gain"] == {"probability": 0.0, "rouge_l": 0.0}
    assert run["relearn"]["settings"] == refs["target"]["relearn"]["settings"] == attack
    # issue 13: the preference objectives through the protocol (dpo prefers the first perturbed answer, idkdpo a
    # refusal), and answers generated up to each gold answer's length on the same cached fine-tunes
    for objective in ("dpo", "idkdpo"):
        assert proto.unlearn(objective, seed=0, steps=2, batch_size=2, lr=1e-3)["steps"] == 2
    gold = Protocol(tiny_lm, replace(settings, max_new_tokens="gold"), "forget01", cache=tmp_path, progress=False)
    assert gold.target_dir == proto.target_dir  # the same fine-tune, evaluated again under its own cache key
    assert len(list(proto.target_dir.glob("eval-forget01-*.json"))) == 2
    run = gold.unlearn("wga", seed=0, steps=2, batch_size=2, lr=1e-3)
    assert 0 <= run["summary"]["forget_rouge_l"] <= 1
    # calibrated: the stop rule checks every step on the calibration people; a huge tolerance stops at the
    # first check, and the report says so
    run = proto.unlearn("ga", seed=0, calibrate={"tolerance": 0.49, "check_every": 1}, steps=4, batch_size=2,
                        lr=1e-3)
    assert run["stopping"]["stopped_at"] == 1 and run["steps"] == 1
    assert run["stopping"]["calibration_rows"] == len(proto.splits["calibration"]) == 2
    assert "lr_search" not in run
    # a list of step sizes goes through forget.stopping.search_step_size (tested there): the search and the
    # list itself are recorded
    run = proto.unlearn("ga", seed=0, calibrate={"tolerance": 0.49, "check_every": 1}, steps=2, batch_size=2,
                        lr=[1e-6, 1e-3])
    assert run["settings"]["lr"] == [1e-6, 1e-3] and run["lr_search"]["lr"] == 1e-6  # the first reaches 0.49
    assert [t["lr"] for t in run["lr_search"]["tried"]] == [1e-6]
    with pytest.raises(ValueError, match="needs calibrate"):
        proto.unlearned("ga", steps=1, lr=[1e-6, 1e-3])
    # the retain guard reads retain rows utility is not scored on; gradient ascent at a large step size takes
    # the retain loss past 1.001x the target's from the first check on: nothing within the limit to keep
    guard = guard_records(settings, proto.splits, "forget01")
    assert len(guard) == 4 and not {r["prompt"] for r in guard} & {r["prompt"] for r in proto.sets["retain"]}
    run = proto.unlearn("ga", seed=0, calibrate={"tolerance": 0.1, "check_every": 1, "retain_limit": 1.001},
                        steps=3, batch_size=2, lr=1e-1)
    s = run["stopping"]
    assert (s["broken_at"], s["kept_broken"], s["restored_to"]) == (1, True, None)
    assert all(p["retain_loss"] > s["retain_limit"] for p in s["curve"]) and len(s["curve"]) == run["steps"]


def test_gold_answer_lengths_cut_each_generation_at_its_own_budget(tiny_lm, tok):
    from transformers import AutoModelForCausalLM

    from malleable.errors import RecipeError
    from malleable.evaluate.generation import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    records = _records(random.Random(3), 5)
    for r, n in zip(records, (1, 2, 3, 6, 9)):
        r["completion"] = " ".join(WORDS[:n])
    budgets = M.answer_budgets(tok, records, "gold")
    assert budgets == [n + M.GOLD_MARGIN for n in (1, 2, 3, 6, 9)]
    prompts = [r["prompt"] for r in records]
    together = generate(model, tok, prompts, max_new_tokens=budgets, batch_size=5)
    alone = [generate(model, tok, [p], max_new_tokens=b)[0] for p, b in zip(prompts, budgets)]
    assert together == alone and len({len(g.split()) for g in together}) > 1
    assert M.answer_budgets(tok, records, 16) == 16
    for bad in ("long", 0, 2.5, True):
        with pytest.raises(RecipeError, match="max_new_tokens"):
            M.answer_budgets(tok, records, bad)


@pytest.mark.slow
def test_smollm2_prefers_true_capitals_and_scores_fictitious_people():
    """The metrics on the real model and its chat template: it knows capitals, not invented people."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malleable.models.smollm2 import smollm2_checkpoint

    path = smollm2_checkpoint()
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    s = fictitious_splits(people=10, qa_per_person=2)
    world = M.evaluate_set(model, tok, s["world_facts"][:12], role="world_facts", max_new_tokens=8)
    people = M.evaluate_set(model, tok, s["forget10"], role="forget", max_new_tokens=8)
    assert world["probability"] > 0.25 + 0.1  # 0.25 is chance over the four options
    assert 0 < people["probability"] < 1 and 0 < people["truth_ratio"] <= 1
    assert world["rouge_l"] > people["rouge_l"]
