"""`malleable slim` with a `kv` section on a tiny random Llama: an eviction-only run writes a report (no
checkpoint) whose numbers are those of slim/evict.py's paths on the same windows, eviction composes with
pruning, the dry run shows the plan, and bad KV settings are one line with nothing written."""

from __future__ import annotations

import json

import pytest
import yaml
from test_slim import cli, recipe, setup  # noqa: F401  (the module fixture)

from conftest import tree_digest
from malleable.data.corpus import tokens
from malleable.evaluate.kv_cache import continuation_nll
from malleable.models.checkpoints import load_model, load_tokenizer
from malleable.recipes.slim import parse_slim_recipe
from malleable.slim.engine import slim
from malleable.slim.evict import continuation_logits, get_policy

SMALL = {"context": 40, "continuation": 8, "windows": 2, "needles": 1, "haystack": 30}


def kv_recipe(root, kv: dict | None = None, **kw) -> dict:
    data = recipe(root, **kw)
    data["kv"] = {"policy": "snapkv", "parameters": {"window_size": 8}, "ratio": 0.5,
                  "evaluate": SMALL | {"source": str(root / "held.txt")}} | (kv or {})
    return data


def test_eviction_only_writes_a_report_with_the_paths_numbers(setup, tmp_path):  # noqa: F811
    data = kv_recipe(setup)
    del data["method"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    res = cli("slim", path, tmp_path / "out", "-q")
    assert res.exit_code == 0 and "kv snapkv: 20 of 40 positions kept" in res.output, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name[0] != ".") == ["report.json", "report.md"]
    k = json.loads((tmp_path / "out" / "report.json").read_text())["kv"]
    assert k["kept_positions"] == 20 and k["summary"]["evicted"]["kv_bytes"] * 2 == k["summary"]["full"]["kv_bytes"]
    assert len(k["windows_rows"]) == 2 and len(k["needle_rows"]["evicted"]) == 3
    # the first window's numbers, recomputed through evict.py directly
    tok = load_tokenizer(setup / "model")
    model = load_model(setup / "model", "causal_lm", tok.pad_token_id)
    ids = tokens(tok, str(setup / "held.txt"), 48)
    c, t = ids[:40].unsqueeze(0), ids[40:48].unsqueeze(0)
    evicted = continuation_logits(model, c, t, get_policy("snapkv", {"window_size": 8}), ratio=0.5)
    assert k["windows_rows"][0]["nll"] == pytest.approx(continuation_nll(evicted, t), abs=1e-5)
    assert k["windows_rows"][0]["nll_full"] == pytest.approx(continuation_nll(continuation_logits(model, c, t), t),
                                                            abs=1e-5)
    assert "## KV cache: snapkv" in (tmp_path / "out" / "report.md").read_text()


def test_ratio_zero_costs_nothing_and_decoding_eviction_is_reported(setup, tmp_path):  # noqa: F811
    data = kv_recipe(setup, {"policy": "knorm", "parameters": {}, "ratio": 0.0})
    del data["method"]
    report = slim(parse_slim_recipe(data), tmp_path / "zero", progress=False)
    s = report["kv"]["summary"]
    assert s["evicted"]["nll"] == pytest.approx(s["full"]["nll"], abs=1e-6) and s["evicted"]["kl"] < 1e-8
    data["kv"] |= {"ratio": None, "budget": 16, "decode_interval": 2}
    report = slim(parse_slim_recipe(data), tmp_path / "decode", progress=False)
    assert report["kv"]["decode_interval"] == 2 and report["kv"]["summary"]["evicted"]["kl"] > 0


def test_eviction_composes_with_pruning(setup, tmp_path):  # noqa: F811
    report = slim(parse_slim_recipe(kv_recipe(setup, method="magnitude")), tmp_path / "out", progress=False)
    assert report["pruned"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01) and "kv" in report
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "## KV cache" in (tmp_path / "out" / "report.md").read_text()


def test_dry_run_shows_the_kv_plan(setup, tmp_path):  # noqa: F811
    data = kv_recipe(setup, {"budget": 10, "ratio": None, "decode_interval": 4})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    res = cli("slim", path, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0 and "10 of a 40-token prompt's positions kept per KV head, and back to 10 every 4" \
        in res.output and "on the slimmed model" in res.output, res.output
    assert not (tmp_path / "out").exists()


KV_BAD = [
    ({"ratio": 1.0}, "kv.ratio"),
    ({"ratio": None, "budget": 35}, "kv.budget: 35 tokens is more than the prompt's 30"),
    ({"budget": 8}, "exactly one of ratio"),
    ({"policy": "lru"}, "unknown eviction policy 'lru'"),
    ({"parameters": {"window_size": 40}}, "kv.parameters.window_size"),
    ({"decode_interval": 0}, "kv.decode_interval"),
    ({"evaluate": SMALL | {"windows": 500}}, "fewer than the"),
    ({"evaluate": SMALL | {"source": "CAL"}}, "kv.evaluate.source"),
    ({"NO_METHOD": True, "policy": None}, "kv: "),
]


@pytest.mark.parametrize("change,needle", KV_BAD, ids=[b[1][:30] for b in KV_BAD])
def test_bad_kv_settings_are_one_line_exit_2_and_nothing_written(setup, tmp_path, change, needle):  # noqa: F811
    data = kv_recipe(setup)
    change = dict(change)
    if change.pop("NO_METHOD", False):
        del data["method"]
    for key, value in change.items():
        if key == "evaluate":
            value = value | {"source": str(setup / ("cal.txt" if value.get("source") == "CAL" else "held.txt"))}
        data["kv"][key] = value
    if data["kv"]["policy"] is None:
        data["kv"] = None
        needle = "method: give a slim method, a kv section"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    before = tree_digest(setup / "model")
    res = cli("slim", path, tmp_path / "out")
    assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists() and tree_digest(setup / "model") == before
