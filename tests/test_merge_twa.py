"""Trainable Weight Averaging (merge/twa.py): the combination, the quantised projection, training through learn's
step, the `malleable merge` path with data, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (TINY, make_adapter, save_finetune, tiny_llama, tiny_tokenizer, toy_records, tree_digest,
                      write_jsonl)
from typer.testing import CliRunner

from malleable.cli import app
from malleable.errors import InputError, RecipeError
from malleable.forget.data import collate_classification
from malleable.merge.twa import (Averaged, Block, _Project, journal_blocks, mean_state, pack_codes, param_blocks,
                                 quantize, twa, twa_params, unpack_codes)
from malleable.models.vision import small_cnn


@pytest.fixture(scope="module")
def cnns():
    """Four differently perturbed 8x8 CNNs (one architecture) and 256 digits to train coefficients on."""
    from malleable.data.vision import load_image_dataset

    torch.manual_seed(0)
    template = small_cnn(image_size=8, width=4)
    models = []
    for i in range(4):
        m = small_cnn(image_size=8, width=4)
        m.load_state_dict(template.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1 * (i + 1))
        models.append(m)
    data = load_image_dataset("digits")["train"].examples()[:256]
    return template, models, data


def flat(state, names) -> torch.Tensor:
    return torch.cat([state[n].float().reshape(-1) for n in names])


def loss_of(template, state, data) -> float:
    net = small_cnn(image_size=8, width=4)
    net.load_state_dict(state)
    b = collate_classification(data)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(b["x"]), b["labels"]))


FAST = {"lr": 0.05, "epochs": 2, "batch_size": 32}


@pytest.mark.parametrize("form,extra", [("twa", {"lr": 0.5}), ("twa_v", {"bits": 32}), ("twa_v", {"layer_size": 100,
                                                                                                    "bits": 32})])
def test_weights_stay_in_span_and_training_moves_them(cnns, form, extra):
    template, models, data = cnns
    names = [n for n, _ in template.named_parameters()]
    result = twa(models, template, data, collate=collate_classification, form=form, parameters={**FAST, **extra})
    rows = torch.stack([flat(m.state_dict(), names) for m in models]).double()
    w = flat(result.state, names).double()
    # twa: in the span of the whole checkpoints; twa_v: each block in the span of the checkpoints' blocks
    spans = [(0, w.numel())] if form == "twa" else param_blocks([p.numel() for p in template.parameters()],
                                                                extra.get("layer_size", 0))
    assert len(spans) == (1 if form == "twa" else 8 if "layer_size" not in extra else 4)
    for start, size in spans:
        r, wb = rows[:, start:start + size], w[start:start + size]
        coef = torch.linalg.lstsq(r.T, wb.unsqueeze(1)).solution
        assert float(((r.T @ coef).squeeze(1) - wb).norm() / wb.norm()) < 1e-5
    mean = flat(mean_state([m.state_dict() for m in models]), names).double()
    assert float((w - mean).norm() / mean.norm()) > 1e-3  # it trained: not the plain average
    assert loss_of(template, result.state, data) < loss_of(template, mean_state([m.state_dict() for m in models]),
                                                           data)


@pytest.mark.parametrize("bits", [1, 4, 32])
def test_zero_coefficients_give_the_mean(cnns, bits):
    template, models, _ = cnns
    names = [n for n, _ in template.named_parameters()]
    rows = torch.stack([flat(m.state_dict(), names) for m in models])
    mean = rows.mean(0)
    spans = param_blocks([p.numel() for p in template.parameters()], 0)
    blocks = journal_blocks(rows, mean, mean, spans, bits)
    averaged = Averaged(small_cnn(image_size=8, width=4), names, blocks, torch.zeros(len(models), len(spans)))
    assert torch.equal(torch.cat([averaged.weights()[n].reshape(-1) for n in names]), mean)


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantised_projection_dequantises_within_its_step(bits):
    block = torch.randn(5, 300)
    codes, step, zero = quantize(block, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    assert float((codes.float() * step + zero - block).abs().max()) <= step / 2 + 1e-6
    assert step == pytest.approx(float(block.max() - block.min()) / (2 ** bits - 1))


def test_block_gradient_is_the_dense_one():
    """The block product's hand-written backward (P_b g, from the uint8 codes) equals autograd's."""
    block = torch.randn(3, 50)
    codes, step, zero = quantize(block, 4)
    center, x, g = torch.randn(50), torch.randn(3, requires_grad=True), torch.randn(50)
    (_Project.apply(x, Block(0, 50, codes, step, zero, center)) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ((center + x2 @ (codes.float() * step + zero)) * g).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_param_blocks_follow_the_authors_rule():
    assert param_blocks([4, 3, 5], 0) == [(0, 4), (4, 3), (7, 5)]
    assert param_blocks([4, 3, 5, 2], 6) == [(0, 7), (7, 7)]  # a block takes tensors while it holds <= 6


def test_single_checkpoint_gives_itself(cnns):
    """twa_v / twa_t average around the mean: one checkpoint is its own mean and has no direction to move in.
    twa's span is the line through the origin and the checkpoint: it may only rescale it (as the authors')."""
    template, models, data = cnns
    for form in ("twa_v", "twa_t"):
        result = twa(models[:1], template, data, collate=collate_classification, form=form, parameters=FAST)
        for k, v in models[0].state_dict().items():
            assert torch.allclose(result.state[k], v, atol=1e-6), (form, k)
    result = twa(models[:1], template, data, collate=collate_classification, form="twa", parameters=FAST)
    names = [n for n, _ in template.named_parameters()]
    w, w0 = flat(result.state, names), flat(models[0].state_dict(), names)
    assert float(torch.nn.functional.cosine_similarity(w, w0, dim=0)) > 1 - 1e-6


def test_chunks_and_defaults(cnns):
    template, models, data = cnns
    assert twa_params("twa_v", {})["bits"] == 4 and twa_params("twa", {})["optimizer"] == "sgd"
    result = twa(models, template, data[:64], collate=collate_classification, form="twa_t",
                 parameters={**FAST, "model_batch": 3})
    assert [tuple(x.shape) for x in result.coefficients] == [(3, 8), (1, 8)]
    # the default 4 bits, packed two codes a byte: half a byte per entry of the 3-checkpoint chunk, per block
    assert result.info["projection_bytes"] == sum((3 * p.numel() * 4 + 7) // 8 for p in template.parameters())


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_codes_unpack_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 3, 7, 9, 17, 1001):
        codes = torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpack_codes(packed, bits, n), codes)
    top = torch.full((13,), 2 ** bits - 1, dtype=torch.uint8)  # every bit set: nothing may leak or fall off
    assert torch.equal(unpack_codes(pack_codes(top, bits), bits, 13), top)


def test_packed_layout_is_lowest_bits_first():
    one = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.uint8)
    assert pack_codes(one, 1).tolist() == [0b10001101, 0b1]  # 8 codes a byte
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b11]
    # 3 bits: the third code (6 = 0b110) spans bytes 0 and 1: its low 2 bits end byte 0, its high bit starts byte 1
    assert pack_codes(torch.tensor([5, 1, 6], dtype=torch.uint8), 3).tolist() == [0b10001101, 0b1]


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_packing_changes_the_bytes_not_the_result(cnns, bits):
    template, models, data = cnns
    runs = [twa(models, template, data[:96], collate=collate_classification, form="twa_v",
                parameters={**FAST, "bits": bits, "pack": pack}) for pack in (True, False)]
    assert all(torch.equal(runs[0].state[k], runs[1].state[k]) for k in runs[1].state)  # bit for bit
    assert torch.equal(runs[0].coefficients[0], runs[1].coefficients[0])
    assert float(runs[0].coefficients[0].abs().min()) > 0  # the coefficients trained away from 0
    sizes = [p.numel() for p in template.parameters()]
    assert runs[1].info["projection_bytes"] == 4 * sum(sizes)
    assert runs[0].info["projection_bytes"] == sum((4 * n * bits + 7) // 8 for n in sizes)


def test_bad_input_in_memory(cnns):
    template, models, data = cnns
    other = small_cnn(image_size=8, width=8)
    with pytest.raises(InputError, match=r"inputs\[1\]: tensor '0.weight' has shape"):
        twa([models[0], other], template, data, collate=collate_classification)
    with pytest.raises(InputError, match="data: no examples"):
        twa(models, template, [], collate=collate_classification)
    for bits in (0, 9):
        with pytest.raises(RecipeError, match="parameters.bits"):
            twa(models, template, data, collate=collate_classification, parameters={"bits": bits})
    with pytest.raises(RecipeError, match="parameters.bits"):
        twa(models, template, data, collate=collate_classification, form="twa", parameters={"bits": 4})


# ---------------------------------------------------------------- `malleable merge` with data


@pytest.fixture(scope="module")
def lm_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("twa")
    base = tiny_llama(0)
    paths = []
    for i in range(3):
        p = save_finetune(base, root / f"ft{i}", seed=300 + i)
        tiny_tokenizer().save_pretrained(p)
        paths.append(p)
    write_jsonl(root / "train.jsonl", toy_records(32, seed=0))
    write_jsonl(root / "val.jsonl", toy_records(16, seed=0))
    return root, paths


def recipe(root, paths, **kw) -> dict:
    return {"method": "twa_v", "inputs": [{"path": str(p)} for p in paths],
            "data": {"train": str(root / "train.jsonl"), "validation": str(root / "val.jsonl")},
            "parameters": {"lr": 0.01, "epochs": 1, "batch_size": 8}, **kw}


def invoke(root, r: dict, out, *extra):
    (root / "r.yaml").write_text(yaml.safe_dump(r))
    return CliRunner().invoke(app, ["merge", str(root / "r.yaml"), str(out), "-q", *extra])


def test_merge_cli_writes_a_loadable_checkpoint(lm_work, tmp_path):
    from transformers import AutoModelForCausalLM

    root, paths = lm_work
    before = [tree_digest(p) for p in paths]
    dry = invoke(root, recipe(root, paths), tmp_path / "dry", "--dry-run")
    assert dry.exit_code == 0 and "data: train" in dry.stdout and not (tmp_path / "dry").exists()
    result = invoke(root, recipe(root, paths), tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "twa_v" and report["data"]["examples"] == 16 and report["twa"]["blocks"] == 21
    assert len(report["twa"]["coefficients"][0]) == 3
    sds = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in paths]
    names = [n for n, _ in merged.named_parameters()]
    w, mean = flat(merged.state_dict(), names), flat(mean_state(sds), names)
    assert 0 < float((w - mean).norm()) < 0.1 * float(mean.norm())
    assert [tree_digest(p) for p in paths] == before


def test_merge_cli_bad_input_is_one_line_and_writes_nothing(lm_work, tmp_path):
    root, paths = lm_work
    odd = tmp_path / "odd"
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 96})).save_pretrained(odd)
    tiny_tokenizer().save_pretrained(odd)
    (root / "empty.jsonl").write_text("")
    cases = [
        (recipe(root, [paths[0], odd]), "has shape [64, 96]"),
        (recipe(root, paths, parameters={"bits": 9}), "parameters.bits"),
        (recipe(root, paths, parameters={"bits": 0}), "parameters.bits"),
        ({**recipe(root, paths), "data": {"train": str(root / "train.jsonl"),
                                          "validation": str(root / "empty.jsonl")}}, "empty.jsonl"),
        ({k: v for k, v in recipe(root, paths).items() if k != "data"}, "data"),
        ({**recipe(root, paths), "method": "linear"}, "data"),
    ]
    for r, mentions in cases:
        out = tmp_path / "out"
        result = invoke(root, r, out)
        assert result.exit_code == 2, (mentions, result.output, result.exception)
        assert result.stderr.count("\n") == 1 and mentions in result.stderr, (mentions, result.stderr)
        assert not out.exists()


def test_soups_and_swa(cnns):
    from malleable.merge.soups import greedy_soup, swa

    template, models, _ = cnns
    sds = [m.state_dict() for m in models]
    averaged = swa(models).state_dict()
    for k, v in mean_state(sds).items():
        assert torch.allclose(averaged[k], v, atol=1e-6), k
    # a hand-made held-out score: -distance to a target between models 0 and 2 (only their soup gets closer)
    target = mean_state([sds[0], sds[2]])
    names = [n for n, _ in template.named_parameters()]

    def score(sd):
        return -float((flat(sd, names) - flat(target, names)).norm())

    soup, chosen = greedy_soup(models, score)
    assert chosen == [0, 2] and score(soup) == pytest.approx(0.0, abs=1e-5)


def test_bn_update_recomputes_batchnorm_statistics(cnns):
    _, _, data = cnns
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(4 * 36, 10))

    template, models = net(), []
    for i in range(3):
        m = net()
        m.load_state_dict(template.state_dict())
        m[1].running_mean.fill_(float(i))
        models.append(m)
    kept = twa(models, template, data, collate=collate_classification, parameters=FAST)
    assert torch.allclose(kept.state["1.running_mean"], torch.ones(4))  # the checkpoints' mean
    fresh = twa(models, template, data, collate=collate_classification, parameters={**FAST, "bn_update": True})
    x = collate_classification(data)["x"]
    probe = net()
    probe.load_state_dict(fresh.state)
    expected = probe[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(fresh.state["1.running_mean"], expected, atol=1e-4)


@pytest.fixture(scope="module")
def lora_work(models, tmp_path_factory):
    """Three rank-4 adapters on the tiny base (the first with a tokenizer: learn's data needs one), and data."""
    root = tmp_path_factory.mktemp("twa_lora")
    paths = [make_adapter(models["base"], root / f"lora{i}", seed=400 + i) for i in range(3)]
    tiny_tokenizer().save_pretrained(paths[0])
    write_jsonl(root / "train.jsonl", toy_records(16, seed=0))
    write_jsonl(root / "val.jsonl", toy_records(8, seed=0))
    return root, paths


def test_merge_cli_averages_lora_adapters(lora_work, models, tmp_path):
    """Adapters of one shape: only their factors are averaged, each adapter read into one model on the base (not
    a copy of the base per adapter), and the result is what TWA gives on the adapters loaded whole; the output is
    a PEFT adapter on the same base, and the inputs are untouched."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from malleable.learn.data import collate, load_examples
    from malleable.models.checkpoints import load_model, load_tokenizer
    from malleable.recipes.learn import DataSpec

    root, paths = lora_work
    before = [tree_digest(p) for p in paths]
    r = recipe(root, paths)
    result = invoke(root, r, tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), tmp_path / "out")
    lora = {k: v for k, v in merged.state_dict().items() if "lora_" in k}
    assert lora and json.loads((tmp_path / "out" / "report.json").read_text())["twa"]["blocks"] == len(lora)
    assert [tree_digest(p) for p in paths] == before

    tokenizer = load_tokenizer(paths[0])  # the oracle: every adapter loaded whole, on its own copy of the base
    whole = [load_model(p, "causal_lm", tokenizer.pad_token_id) for p in paths]
    items = load_examples(root / "val.jsonl", DataSpec(train=root / "train.jsonl"), tokenizer).items
    expected = twa(whole, whole[0], items, collate=lambda b: collate(b, tokenizer.pad_token_id), form="twa_v",
                   parameters=r["parameters"], seed=0)
    for k, v in lora.items():
        assert torch.allclose(v, expected.state[k], atol=1e-6), k
    assert not torch.allclose(lora[next(iter(lora))], whole[0].state_dict()[next(iter(lora))])


def test_merge_cli_refuses_adapters_that_do_not_average(lora_work, models, tmp_path):
    """An adapter of another scale, rank or base, or a full checkpoint beside adapters: one line naming the input."""
    import shutil

    root, paths = lora_work
    alpha = make_adapter(models["base"], tmp_path / "alpha", seed=9, alpha=16)
    rank = make_adapter(models["base"], tmp_path / "rank", seed=9, r=8)
    other = tmp_path / "other-base"
    shutil.copytree(models["base"], other)
    moved = make_adapter(other, tmp_path / "moved", seed=9)
    shuffled = Path(shutil.copytree(paths[1], tmp_path / "shuffled"))  # the same targets, listed in another order
    config = json.loads((shuffled / "adapter_config.json").read_text())
    first = json.loads((paths[0] / "adapter_config.json").read_text())["target_modules"]
    config["target_modules"] = first[::-1]
    assert len(set(first)) > 1 and config["target_modules"] != first
    (shuffled / "adapter_config.json").write_text(json.dumps(config))
    assert invoke(root, recipe(root, [paths[0], shuffled]), tmp_path / "fine").exit_code == 0
    cases = [(alpha, "lora_alpha 16"), (rank, "has r 8"), (moved, "adapter for base model"),
             (models["base"], "mixes full checkpoints with LoRA adapters")]
    for odd, mentions in cases:
        out = tmp_path / "out"
        result = invoke(root, recipe(root, [paths[0], odd]), out)
        assert result.exit_code == 2, (mentions, result.output, result.exception)
        assert result.stderr.count("\n") == 1 and mentions in result.stderr, \
            (mentions, result.stderr)
        assert not out.exists()


def test_tied_weights_stay_tied():
    """A model that ties lm_head to the embeddings: the averaged embeddings are what both names load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from malleable.learn.data import collate

    def model(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": True}))

    models = [model(s) for s in range(2)]
    items = [([1, 5 + i, 6 + i, 7 + i], [-100, -100, 6 + i, 7 + i]) for i in range(8)]
    result = twa(models, model(0), items, collate=lambda b: collate(b, 0), parameters={**FAST, "batch_size": 4})
    assert torch.equal(result.state["lm_head.weight"], result.state["model.embed_tokens.weight"])
    mean = (models[0].model.embed_tokens.weight + models[1].model.embed_tokens.weight) / 2
    assert not torch.allclose(result.state["lm_head.weight"], mean)  # trained, and not overwritten by the mean


def test_two_processes_follow_the_one_process_run_and_write_one_output(lm_work, tmp_path):
    """Under torchrun (gloo, CPU) each process trains on its half of every batch: the coefficients' loss and the
    averaged weights follow the one-process run, and the main process alone writes the output and speaks."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root, paths = lm_work
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(root, paths)))
    logs = {}
    for procs in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(29700 + os.getpid() % 200 + procs), "-m", "malleable", "merge", str(tmp_path / "r.yaml"),
               str(tmp_path / f"out{procs}"), "-q"]
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        logs[procs] = done.stdout
    one, two = (json.loads((tmp_path / f"out{n}" / "report.json").read_text()) for n in (1, 2))
    assert two["processes"] == 2 and logs[2].count("merged ") == 1
    assert [h["loss"] for h in two["twa"]["history"]] == pytest.approx([h["loss"] for h in one["twa"]["history"]],
                                                                       abs=1e-5)
    a, b = (load_file(tmp_path / f"out{n}" / "model.safetensors") for n in (1, 2))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
