"""The unlearning objectives and masks on tiny models: each moves the forget loss up; retain terms hold."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import accuracy, nll

from malleable.errors import InputError, RecipeError
from malleable.forget import OBJECTIVES, unlearn
from malleable.forget.data import collate_classification


CLASSIFIER = ["ga", "graddiff", "npo", "simnpo", "rl", "task_negation", "wga", "undial"]
LM = ["ga", "graddiff", "npo", "simnpo", "rmu", "task_negation", "wga", "undial"]


@pytest.mark.parametrize("name", CLASSIFIER)
def test_each_classifier_objective_raises_the_forget_loss(digits, name):
    model, forget, retain = digits
    before = nll(model, forget, collate_classification)
    out = unlearn(copy.deepcopy(model), forget=forget, retain=retain, collate=collate_classification,
                  objective=name, epochs=5, batch_size=32, lr=0.01, optimizer="sgd")
    assert nll(out.model, forget, collate_classification) > before + 0.1


def test_a_retain_term_keeps_retain_accuracy_where_ascent_alone_loses_it(digits):
    model, forget, retain = digits
    runs = {name: unlearn(copy.deepcopy(model), forget=forget, retain=retain, collate=collate_classification,
                          objective=name, epochs=5, batch_size=32, lr=0.01, optimizer="sgd").model
            for name in ("ga", "graddiff", "npo")}
    assert accuracy(runs["ga"], forget) < 0.1 and accuracy(runs["npo"], forget) < 0.1
    assert accuracy(runs["npo"], retain) > accuracy(runs["ga"], retain) + 0.03
    assert accuracy(runs["graddiff"], retain) > accuracy(runs["ga"], retain) + 0.03


@pytest.mark.parametrize("name", LM)
def test_each_lm_objective_raises_the_forget_loss(lm, name):
    model, forget, retain, lm_collate = lm
    before = nll(model, forget, lm_collate)
    params = {"layer": 1, "steering_coeff": 20.0} if name == "rmu" else {}
    out = unlearn(copy.deepcopy(model), forget=forget, retain=retain, collate=lm_collate, objective=name,
                  parameters=params, steps=10, batch_size=8, lr=1e-3 if name != "rmu" else 1e-2)
    assert nll(out.model, forget, lm_collate) > before + 0.1


@pytest.mark.parametrize("name", ["dpo", "idkdpo"])
def test_preference_objectives_move_the_forget_answer_below_its_alternative(lm, tiny_lm, name):
    from conftest import toy_records
    from transformers import AutoTokenizer

    from malleable.forget.losses import sequence_logprob
    from malleable.forget.registry import get_objective

    model, forget, retain, lm_collate = lm
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    rows = toy_records(40)[:8]
    records = [{**r, "alternate": rows[(i + 1) % 8]["completion"]} for i, r in enumerate(rows)]  # a wrong answer
    paired = get_objective(name, {}).examples(forget, tokenizer, seed=0, records=records, chat_template="off")

    def margin(m) -> float:  # log p(alternative) - log p(forget answer), summed over the forget set
        with torch.no_grad():
            return float(sequence_logprob(m, lm_collate([p.alternate for p in paired]))[0].sum()
                         - sequence_logprob(m, lm_collate(forget))[0].sum())

    out = unlearn(copy.deepcopy(model), forget=paired, retain=retain, collate=lm_collate, objective=name,
                  steps=10, batch_size=8, lr=1e-3)
    assert margin(out.model) > margin(model) + 1.0
    assert nll(out.model, forget, lm_collate) > nll(model, forget, lm_collate) + 0.1
    with pytest.raises(InputError, match="without an alternative answer"):
        unlearn(copy.deepcopy(model), forget=forget, retain=retain, collate=lm_collate, objective=name, steps=1)


def test_dpo_names_a_row_without_its_alternate_answer(lm, tiny_lm):
    from conftest import toy_records
    from transformers import AutoTokenizer

    from malleable.forget.registry import get_objective

    _, forget, _, _ = lm
    records = [{**r, "alternate": "w1"} for r in toy_records(40)[:8]]
    del records[5]["alternate"]
    with pytest.raises(InputError, match="row 6 has no 'alternate' text"):
        get_objective("dpo", {}).examples(forget, AutoTokenizer.from_pretrained(tiny_lm), seed=0, records=records,
                                          chat_template="off")


def test_unlearning_through_lora_leaves_the_base_weights_untouched(lm):
    model, forget, retain, lm_collate = lm
    base = {k: v.clone() for k, v in model.state_dict().items()}
    out = unlearn(copy.deepcopy(model), forget=forget, retain=retain, collate=lm_collate, objective="npo",
                  lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, steps=10, batch_size=8, lr=5e-3)
    assert nll(out.model, forget, lm_collate) > nll(model, forget, lm_collate) + 0.1
    base_weights = {k: v for k, v in out.model.get_base_model().state_dict().items() if "lora_" not in k}
    changed = [k for k, v in base_weights.items()
               if k.replace("base_layer.", "") in base and not torch.equal(v, base[k.replace("base_layer.", "")])]
    assert changed == []


def test_salun_mask_selects_its_fraction_and_keeps_the_rest_bit_identical(digits):
    model, forget, retain = digits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = unlearn(copy.deepcopy(model), forget=forget, retain=retain, collate=collate_classification,
                  objective="rl", mask={"name": "salun", "ratio": 0.3}, epochs=3, batch_size=32, lr=0.05,
                  optimizer="sgd", weight_decay=0.01)
    assert out.mask_fraction == pytest.approx(0.3, abs=1e-4)
    moved = sum(int((v != original[k]).sum()) for k, v in out.model.state_dict().items())
    total = sum(v.numel() for v in original.values())
    assert 0.2 * total < moved <= round(0.3 * total)  # only masked weights move, despite weight decay
    assert accuracy(out.model, forget) < 0.5


def test_task_negation_is_the_original_minus_the_learned_vector(digits):
    model, forget, retain = digits
    scaled = {s: unlearn(copy.deepcopy(model), forget=forget, retain=None, collate=collate_classification,
                         objective="task_negation", parameters={"scale": s}, steps=5, batch_size=32, lr=0.05,
                         optimizer="sgd").model for s in (1.0, 2.0)}
    for (k, v0), v1, v2 in zip(model.state_dict().items(), scaled[1.0].state_dict().values(),
                               scaled[2.0].state_dict().values()):
        torch.testing.assert_close(v2 - v0, 2 * (v1 - v0), rtol=1e-4, atol=1e-6)


def test_forgetting_an_empty_set_is_refused(digits):
    model, _, retain = digits
    with pytest.raises(InputError, match="empty"):
        unlearn(model, forget=[], retain=retain, collate=collate_classification, objective="ga", steps=1)


def test_objectives_refuse_models_they_are_not_for(digits, lm):
    model, forget, retain = digits
    with pytest.raises(RecipeError, match="rmu is for causal language models, not classifiers"):
        unlearn(model, forget=forget, retain=retain, collate=collate_classification, objective="rmu", steps=1)
    with pytest.raises(RecipeError, match="unknown unlearning objective"):
        unlearn(model, forget=forget, retain=retain, collate=collate_classification, objective="nope", steps=1)
    for name in ("dpo", "idkdpo"):  # a preference between two answers needs answers: language models only
        with pytest.raises(RecipeError, match=f"{name} is for causal language models, not classifiers"):
            unlearn(model, forget=forget, retain=retain, collate=collate_classification, objective=name, steps=1)
    with pytest.raises(InputError, match="needs retain"):
        unlearn(model, forget=forget, retain=None, collate=collate_classification, objective="graddiff", steps=1)


def test_every_objective_is_documented_and_declares_where_it_applies():
    for name, cls in OBJECTIVES.items():
        assert cls.__doc__ and cls.kinds <= {"classifier", "causal_lm"}, name
