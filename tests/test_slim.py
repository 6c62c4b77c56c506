"""slim through the real engine on tiny random Llamas: the patterns and sparsities achieved, ShortGPT's smaller
checkpoint against the original with those layers skipped, the report, and every bad input refused in one line."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from conftest import TINY, WORDS, tiny_tokenizer, tree_digest
from malleable.cli import app
from malleable.errors import RecipeError
from malleable.recipes.slim import parse_slim_recipe
from malleable.slim.engine import remove_layers, slim

QUICK = {"source": None, "seq_len": 16, "max_windows": 4, "speed": False, "tasks": None}


def text(seed: int, n: int = 1500) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-layer tiny Llama with its tokenizer, and calibration and held-out text on its vocabulary."""
    root = tmp_path_factory.mktemp("slim")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": 4}))).eval().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "cal.txt").write_text(text(0))
    (root / "held.txt").write_text(text(1))
    (root / "empty.txt").write_text("  \n")
    return root


def recipe(root, method="wanda", parameters=None, **kw) -> dict:
    return {"model": str(root / "model"), "method": method, "parameters": parameters or {},
            "calibration": {"source": str(root / "cal.txt"), "n_samples": 6, "seq_len": 24, "batch_size": 4},
            "evaluate": QUICK | {"source": str(root / "held.txt")}} | kw


def run(root, out, **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    report = slim(parse_slim_recipe(recipe(root, **kw)), root / out, force=True, progress=False)
    return report, load_file(root / out / "model.safetensors")


def pruned(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: w for k, w in weights.items() if ".layers." in k and w.dim() == 2}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_has_exactly_n_zeros_in_every_group(setup, method, n, m):
    report, w = run(setup, f"{method}-{n}{m}", method=method, parameters={"pattern": f"{n}:{m}"})
    assert len(pruned(w)) == 28
    for name, t in pruned(w).items():
        zeros = (t.reshape(t.shape[0], -1, m) == 0).sum(-1)
        assert (zeros == n).all(), name
    assert report["pruned"]["achieved_sparsity"] == n / m
    assert not (w["model.embed_tokens.weight"] == 0).any() and not (w["lm_head.weight"] == 0).any()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_sparsity_is_the_requested_one_in_every_module(setup, method):
    s = 0.3
    report, w = run(setup, f"{method}-u", method=method, parameters={"sparsity": s, "blocksize": 48}
                    if method == "sparsegpt" else {"sparsity": s})
    for name, t in pruned(w).items():
        rows, cols = t.shape
        if method == "magnitude":  # one threshold per module
            want = int(t.numel() * s)
        elif method == "wanda":  # per output row
            want = rows * int(cols * s)
            assert ((t == 0).sum(1) == int(cols * s)).all(), name
        else:  # per block of columns
            want = sum(int(rows * (min(a + 48, cols) - a) * s) for a in range(0, cols, 48))
        assert int((t == 0).sum()) == want, name
    row = {r["module"]: r for r in report["modules"]}["model.layers.0.mlp.down_proj"]
    assert row["zeros"] == int((w["model.layers.0.mlp.down_proj.weight"] == 0).sum())


def test_sparsegpt_updates_the_kept_weights_and_wanda_does_not(setup):
    base = load_file(setup / "model" / "model.safetensors")
    _, wanda = run(setup, "wanda-keep", method="wanda")
    _, sgpt = run(setup, "sgpt-keep", method="sparsegpt")
    key = "model.layers.1.self_attn.o_proj.weight"
    kept = wanda[key] != 0
    assert torch.equal(wanda[key][kept], base[key][kept])
    assert not torch.allclose(sgpt[key][sgpt[key] != 0], base[key][sgpt[key] != 0])


def test_keep_dense_leaves_modules_untouched(setup):
    base = load_file(setup / "model" / "model.safetensors")
    report, w = run(setup, "keep", method="magnitude", keep_dense=["embed_tokens", "lm_head", "mlp.down_proj",
                                                                    "model.layers.0.*"])
    for k in base:
        if "down_proj" in k or k.startswith("model.layers.0."):
            assert torch.equal(w[k], base[k]), k
    assert report["pruned"]["modules"] == 3 * 6


def test_report_and_output_load(setup):
    report, _ = run(setup, "report", method="wanda")
    out = setup / "report"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    saved = json.loads((out / "report.json").read_text())
    assert saved["schema"] == "malleable.slim/1" and saved["bytes"]["slim"] == saved["bytes"]["dense"]
    e = saved["evaluation"]
    assert e["windows"] == 4 and e["seq_len"] == 16 and e["perplexity"]["dense"] > 1
    assert e["perplexity"]["ratio"] == pytest.approx(e["perplexity"]["slim"] / e["perplexity"]["dense"])
    assert saved["counts"]["slim"]["nonzero"] < saved["counts"]["dense"]["nonzero"]
    assert "save neither disk space" in (out / "report.md").read_text()


def test_same_recipe_same_bytes(setup):
    run(setup, "det1", method="sparsegpt")
    run(setup, "det2", method="sparsegpt")
    assert (setup / "det1" / "model.safetensors").read_bytes() == (setup / "det2" / "model.safetensors").read_bytes()


def test_speed_is_measured_side_by_side(setup):
    report, _ = run(setup, "speed", method="shortgpt", parameters={"remove": 1},
                    evaluate=QUICK | {"source": str(setup / "held.txt"), "speed": True, "repeats": 2,
                                      "prompt_tokens": 8, "new_tokens": 4})
    s = report["evaluation"]["speed"]
    assert len(s["dense"]["decode_repeats"]) == 2 and s["slim"]["prefill_tokens_per_s"] > 0
    assert s["decode_ratio"] == pytest.approx(s["slim"]["decode_tokens_per_s"] / s["dense"]["decode_tokens_per_s"])


def hidden_pairs(model, ids):
    """Every decoder layer's (input, output) states, caught by hooks in one full forward pass."""
    got = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, (a[0], o[0] if isinstance(
        o, tuple) else o)), with_kwargs=False) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return got


def test_shortgpt_block_influence_and_smaller_checkpoint(setup):
    from malleable.data.corpus import chat_windows, random_windows

    report, w = run(setup, "short", method="shortgpt", parameters={"ratio": 0.5})
    lay = report["layers"]
    original = AutoModelForCausalLM.from_pretrained(setup / "model").eval()
    ids = chat_windows(tiny_tokenizer(), random_windows(tiny_tokenizer(), str(setup / "cal.txt"), 6, 24, 0))
    pairs = hidden_pairs(original, ids)
    bi = [float(1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())
          for a, b in (pairs[i] for i in range(4))]
    assert lay["influence"] == pytest.approx(bi, rel=1e-5)
    assert lay["removed"] == sorted(sorted(range(4), key=bi.__getitem__)[:2])
    slimmed = AutoModelForCausalLM.from_pretrained(setup / "short").eval()
    assert slimmed.config.num_hidden_layers == 2 and not any(k.startswith("model.layers.2") for k in w)
    # the original with the removed layers skipped: each returns its input
    skips = [original.model.layers[i].register_forward_hook(lambda m, a, o: (a[0],) if isinstance(o, tuple)
                                                             else a[0]) for i in lay["removed"]]
    test = torch.tensor([[7 + (i * 13) % 100 for i in range(20)]])
    with torch.no_grad():
        want = original(input_ids=test).logits
        got = slimmed(input_ids=test).logits
    for h in skips:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert report["bytes"]["slim"] < report["bytes"]["dense"]
    assert report["counts"]["slim"]["parameters"] < report["counts"]["dense"]["parameters"]
    with torch.no_grad():  # the KV cache indexes the renumbered layers: greedy generation runs
        slimmed.generate(test[:, :5], max_new_tokens=3, do_sample=False)


def test_remove_layers_updates_layer_types():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": 3}))).eval()
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    remove_layers(model, [1])
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == ["full_attention"] * 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_dry_run_prints_the_plan_and_writes_nothing(setup, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(setup, method="sparsegpt", parameters={"pattern": "2:4"})))
    res = cli("slim", path, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "2:4 at sparsity 0.5 in 28 linear modules of 4 decoder layers" in res.output
    path.write_text(yaml.safe_dump(recipe(setup, method="shortgpt", parameters={"remove": 1})))
    res = cli("slim", path, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0 and "remove 1 of 4 decoder layers" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_checkpoint(setup, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(setup, method="magnitude", parameters={"sparsity": 0.5})))
    res = cli("slim", path, tmp_path / "out", "-q")
    assert res.exit_code == 0 and "sparsity 0.5000" in res.output, res.output
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "report.md").is_file()


BAD = [
    ({"method": "wanda", "parameters": {"sparsity": 1.0}}, "sparsity: 1.0 is outside [0, 1)"),
    ({"method": "wanda", "parameters": {"sparsity": -0.1}}, "parameters.sparsity"),
    ({"method": "magnitude", "parameters": {"pattern": "3:5"}}, "does not divide the input width 64"),
    ({"method": "wanda", "parameters": {"pattern": "4:2"}}, "parameters.pattern"),
    ({"method": "sparsegpt", "parameters": {"pattern": "2:4", "sparsity": 0.3}}, "contradicts pattern 2:4"),
    ({"method": "shortgpt", "parameters": {"remove": 4}}, "would leave none"),
    ({"method": "shortgpt", "parameters": {"ratio": 1.0}}, "parameters.ratio"),
    ({"method": "shortgpt", "parameters": {}}, "give exactly one of remove"),
    ({"method": "pruneall"}, "unknown slim method"),
    ({"keep_dense": ["embed_tokens", "mlp.donw_proj"]}, "keep_dense: 'mlp.donw_proj' names no module"),
    ({"calibration": {"source": "EMPTY"}}, "holds no text"),
    ({"calibration": {"source": "SHORT", "seq_len": 10_000}}, "fewer than the 10001 needed"),
    ({"calibration": {"source": "nowhere"}}, "not a text source"),
    ({"evaluate": {"source": "CAL"}}, "evaluate.source"),
    ({"calibration": {"n_sample": 3}}, "calibration.n_sample: unknown key"),
    ({"evaluate": {"tasks": ["capital-world", "capitals"]}}, "evaluate.tasks: unknown word relation 'capitals'"),
]


@pytest.mark.parametrize("change,needle", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, tmp_path, change, needle):
    data = recipe(setup)
    swap = {"EMPTY": str(setup / "empty.txt"), "SHORT": str(setup / "cal.txt"), "CAL": str(setup / "cal.txt")}
    for key, value in change.items():
        if isinstance(value, dict):
            value = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in value.items()}
            data[key] = (data.get(key) or {}) | value if key != "parameters" else value
        else:
            data[key] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    before = tree_digest(setup / "model")
    res = cli("slim", path, tmp_path / "out")
    assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists() and tree_digest(setup / "model") == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_existing_output_needs_force(setup, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(setup, method="magnitude")))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    res = cli("slim", path, tmp_path / "out")
    assert res.exit_code == 2 and "--force" in res.output and len(res.output.strip().splitlines()) == 1
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep" and len(list((tmp_path / "out").iterdir())) == 1
    res = cli("slim", path, setup / "model" / "inside", "--force")
    assert res.exit_code == 2 and "overwrite input" in res.output


def test_perplexity_equals_the_models_own_loss(setup):
    from malleable.evaluate.perplexity import perplexity, window_nll

    model = AutoModelForCausalLM.from_pretrained(setup / "model").eval()
    windows = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    nll = window_nll(model, windows, batch_size=2)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert nll == pytest.approx([x * 11 for x in losses], rel=1e-5)
    assert perplexity(nll, 12) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


@pytest.mark.parametrize("method", ["sparse_full", "full"])
def test_recovery_fine_tuning_keeps_the_pruned_weights_at_zero(setup, tmp_path, method):
    """`learn` with sparse_full on a 2:4 Wanda model: the zeros stay exactly zero, every other weight trains;
    plain full fine-tuning (the control) fills them in."""
    from conftest import toy_records, write_jsonl
    from malleable.api import learn

    run(setup, "to-recover", method="wanda", parameters={"pattern": "2:4"}, evaluate=None)
    pruned_model = setup / "to-recover"
    before = load_file(pruned_model / "model.safetensors")
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(16))
    learn({"model": str(pruned_model), "method": method, "data": {"train": str(train)},
           "training": {"steps": 3, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1, "log_every": 1}},
          tmp_path / "out", progress=False)
    after = load_file(tmp_path / "out" / "model.safetensors")
    key = "model.layers.2.mlp.up_proj.weight"
    zero = before[key] == 0
    assert zero.float().mean() == 0.5
    assert not torch.equal(after[key][~zero], before[key][~zero])
    if method == "sparse_full":
        assert (after[key][zero] == 0).all()
        for name, t in pruned(after).items():
            assert (t.reshape(t.shape[0], -1, 4) == 0).sum(-1).eq(2).all(), name
    else:
        assert (after[key][zero] != 0).all()


def test_text_files_are_found_beside_the_recipe(setup, tmp_path):
    from malleable.api import slim_plan

    for name in ("cal.txt", "held.txt"):
        (tmp_path / name).write_text((setup / name).read_text())
    data = recipe(setup, method="shortgpt", parameters={"remove": 1})
    data["calibration"]["source"], data["evaluate"]["source"] = "cal.txt", "held.txt"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert "remove 1 of 4" in slim_plan(tmp_path / "r.yaml")
    res = cli("slim", tmp_path / "r.yaml", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recipe"]["calibration"]["source"] == str(tmp_path / "cal.txt")


def test_output_keeps_the_inputs_dtype(setup, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(setup / "model").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tiny_tokenizer().save_pretrained(tmp_path / "bf16")
    data = recipe(setup, method="magnitude", evaluate=None) | {"model": str(tmp_path / "bf16")}
    report = slim(parse_slim_recipe(data), tmp_path / "out", progress=False)
    w = load_file(tmp_path / "out" / "model.safetensors")
    assert report["dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in w.values())
    assert report["bytes"]["slim"] == report["bytes"]["dense"]


def test_word_relation_exact_match_is_measured_on_both_models(setup, tmp_path):
    """The report's exact match is evaluate.generation's on the test split's first items, for the dense model
    (the input) and the slimmed one (the output), as each loads from disk."""
    from malleable.data.word_relations import word_relations
    from malleable.evaluate.generation import generate, is_match, mentions
    from malleable.models.checkpoints import load_model, load_tokenizer

    data = recipe(setup, method="magnitude", parameters={"sparsity": 0.5})
    data["evaluate"] |= {"tasks": ["capital-world", "currency"], "task_items": 5}
    report = slim(parse_slim_recipe(data), tmp_path / "out", progress=False)
    t = report["evaluation"]["tasks"]
    assert t["items"] == {"capital-world": 5, "currency": 5} and set(t["mean"]) == {"dense", "slim"}
    tok = load_tokenizer(setup / "model")
    for key, folder in (("dense", setup / "model"), ("slim", tmp_path / "out")):
        model = load_model(folder, "causal_lm", tok.pad_token_id)
        for name in t["relations"]:
            recs = word_relations(name)["test"][:5]
            answers = generate(model, tok, [r["prompt"] for r in recs], max_new_tokens=16, chat=True)
            assert t["relations"][name][key] == sum(map(is_match, answers, [r["completion"] for r in recs])) / 5
            assert t["mention"][name][key] == sum(map(mentions, answers, [r["completion"] for r in recs])) / 5
    assert "exact match, mean of 2 word relations" in (tmp_path / "out" / "report.md").read_text()


def test_calibration_windows_are_chat_turns_for_a_model_with_a_template(setup, tmp_path):
    """auto (the default) frames each window as a user turn of the template: the same template tokens around
    the window's first tokens, the length kept; off keeps the plain windows; on without a template is refused."""
    from malleable.data.corpus import chat_windows, random_windows
    from malleable.learn.data import uses_chat_template
    from malleable.models.chat import render_user_turn

    tok = tiny_tokenizer()
    plain = random_windows(tok, str(setup / "cal.txt"), 6, 24, 0)
    framed = chat_windows(tok, plain)
    before, _, after = render_user_turn(tok, "\x00").partition("\x00")
    head, tail = (tok(x, add_special_tokens=False)["input_ids"] for x in (before, after))
    room = 24 - len(head) - len(tail)
    assert framed.shape == plain.shape and room > 0
    assert (framed[:, :len(head)] == torch.tensor(head)).all()
    assert (framed[:, 24 - len(tail):] == torch.tensor(tail)).all()
    assert torch.equal(framed[:, len(head):len(head) + room], plain[:, :room])
    report, _ = run(setup, "chat", method="wanda")
    assert report["calibration"]["chat_template"] is True
    plain_calibration = {**recipe(setup)["calibration"], "chat_template": "off"}
    report, _ = run(setup, "plain", method="wanda", calibration=plain_calibration)
    assert report["calibration"]["chat_template"] is False
    with pytest.raises(RecipeError, match="calibration.seq_len: 2 tokens leave no room"):
        chat_windows(tok, plain[:, :len(head) + len(tail)])
    tok.chat_template = None
    with pytest.raises(RecipeError, match="calibration.chat_template: on, but"):
        uses_chat_template(tok, "on", "calibration.chat_template")
