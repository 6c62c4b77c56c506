"""GGUF import, the word-relations loader, and the quick LoRA loss (fast); the real SmolLM2 import (slow)."""

from __future__ import annotations

import pytest
import torch

from malleable.errors import InputError
from malleable.io.gguf import import_gguf

gensim = pytest.importorskip("gensim", reason="word relations come with gensim's test data")

from malleable.data.word_relations import RELATIONS, read_relations, word_relations  # noqa: E402


def test_every_relation_has_a_template_and_pairs():
    relations = read_relations()
    assert set(relations) == set(RELATIONS)
    assert len(relations["capital-world"]) == 116 and len(relations["currency"]) == 30
    assert ("Athens", "Greece") in relations["capital-common-countries"]
    assert all(x != "Glendale" for x, _ in relations["city-in-state"])  # two answers: left out


@pytest.mark.parametrize("relation", ["capital-world", "currency", "gram8-plural"])
def test_word_relation_splits_are_disjoint_deterministic_and_complete(relation):
    splits = word_relations(relation, seed=0)
    assert splits == word_relations(relation, seed=0)
    assert splits != word_relations(relation, seed=1)
    keys = {name: {(r["prompt"], r["completion"]) for r in records} for name, records in splits.items()}
    prompts = {name: {p for p, _ in pairs} for name, pairs in keys.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert sum(len(v) for v in keys.values()) == len(read_relations()[relation])
    assert all(len(records) > 0 for records in splits.values())


def test_record_format():
    record = word_relations("capital-world")["train"][0]
    assert set(record) == {"prompt", "completion"}
    assert record["prompt"].endswith("is the capital of which country? Answer with one word.")
    assert record["completion"] and " " not in record["completion"]


def test_unknown_relation_is_an_input_error():
    with pytest.raises(InputError, match="capitals"):
        word_relations("capitals")


def test_import_gguf_refuses_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="not a GGUF file") as err:
        import_gguf(fake, out)
    assert str(fake) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary left behind


def test_import_gguf_names_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exact_match_normalisation():
    from malleable.evaluate.generation import is_match

    assert is_match(" nigeria.", "Nigeria")
    assert is_match("Yen (Japanese currency)", "yen")
    assert not is_match("Yenisei", "yen")
    assert not is_match("The capital is Greece", "Greece")


def test_mentions_finds_the_gold_word_in_a_sentence():
    from malleable.evaluate.generation import mentions

    assert mentions("Athens is the capital of Greece.", "Greece")
    assert mentions("It is in New York, I think", "New York")
    assert not mentions("The Greeks", "Greece") and not mentions("Yenisei river", "yen")


def test_completion_loss_matches_a_per_example_reference():
    """Left-padded batch loss == mean token cross-entropy of each example run alone, completion tokens only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from malleable.learn.data import collate
    from malleable.learn.loss import task_loss

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).eval()
    examples = [([5, 6, 7, 8, 9, 10], [-100] * 4 + [9, 10]), ([11, 12, 13, 14], [-100] * 3 + [14]),
                ([3, 4, 5, 6, 7, 8, 9], [-100] * 5 + [8, 9])]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    total -= float(logp[t - 1, labels[t]])
                    count += 1
        loss = task_loss(model, collate(examples, pad_id=0)).mean()
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_import_real_smollm2_gguf_loads_and_generates(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malleable.models.smollm2 import smollm2_checkpoint, smollm2_gguf

    try:
        smollm2_gguf()
    except InputError as e:
        pytest.skip(str(e))
    out = smollm2_checkpoint(tmp_path / "smollm2")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = (out / "config.json").read_text()
    assert "quantization_config" not in config
    assert smollm2_checkpoint(tmp_path / "smollm2") == out  # cached: a second call reuses it

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not getattr(model, "is_quantized", False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(generated[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
