"""One fresh process of bench/steer_peers.py: one tool extracts one steering vector (or measures generation
throughput) and reports its own timings and peak RSS (VmHWM, this process only). Runs in malleable's venv (tool
`ours`, `ours_steer`) or in the steering peers' venv (`repeng`, `sv`); imports only what its tool needs.

    python _steer_peers_worker.py TOOL extract METHOD MODEL_DIR PAIRS_DIR LAYERS OUT     (METHOD: mean, pca)
    python _steer_peers_worker.py TOOL generate VECTORS MODEL_DIR PROMPT LAYERS OUT STRENGTH NEW_TOKENS ROUNDS

OUT.json gets {"load_s", "extract_s", "total_s", "vmhwm_mb", ...}; OUT.safetensors the vectors (`layer.<i>`).
"""

import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def vmhwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def pairs(folder: str, split: str = "train") -> list[dict]:
    return [json.loads(x) for x in open(f"{folder}/sentiment.{split}.jsonl") if x.strip()]


def hf_model(model_dir: str):
    """The peers' loading: transformers 4 from the same checkpoint; the tokenizer from tokenizer.json with the
    checkpoint's special tokens (its tokenizer_config names a transformers 5 class)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from transformers import AutoConfig

    cfg = json.load(open(f"{model_dir}/tokenizer_config.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json",
                                  **{k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
    # transformers 5 writes rope_theta inside `rope_parameters`, which transformers 4 does not read (it would
    # fall back to 10000 where SmolLM2 has 100000): hand it over, so that both sides run the same model
    config = AutoConfig.from_pretrained(model_dir)
    rope = json.load(open(f"{model_dir}/config.json")).get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, torch_dtype=torch.float32).eval()
    return model, tok


def ours_model(model_dir: str):
    from malleable.models.checkpoints import Trust, load_model, load_tokenizer

    tok = load_tokenizer(model_dir, Trust())
    return load_model(model_dir, "causal_lm", tok.pad_token_id, trust=Trust()), tok


def extract(tool: str, method: str, model_dir: str, pairs_dir: str, layers: list[int], out: str) -> dict:
    import numpy as np

    rows = pairs(pairs_dir)
    info = {}
    if tool == "ours_steer":  # the whole `malleable steer` command: validation probes on every layer, report
        from malleable.api import steer

        t = time.perf_counter()
        report = steer({"model": model_dir, "method": "caa" if method == "mean" else "pca_diff", "layers": layers,
                        "read_position": "last", "batch_size": 16,
                        "data": {"train": f"{pairs_dir}/sentiment.train.jsonl",
                                 "validation": f"{pairs_dir}/sentiment.validation.jsonl"}}, out + ".steer",
                       force=True, progress=False)
        from malleable.steer import load_artefact

        vectors = {i: v.numpy() for i, v in load_artefact(out + ".steer").vectors.items()}
        info["extract_s"] = round(time.perf_counter() - t, 3)
        info["load_s"] = report["seconds"]["load"]
    elif tool == "ours":  # the extraction itself: load, read the last token of every layer, the formula
        from malleable.steer.engine import collect
        from malleable.steer.registry import get_method

        t = time.perf_counter()
        model, tok = ours_model(model_dir)
        info["load_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        acts = collect(model, tok, rows, "last", batch_size=16)
        m = get_method("caa" if method == "mean" else "pca_diff", {})
        vectors = {i: m.direction(acts["positive"][i], acts["negative"][i]) for i in layers}
        info["extract_s"] = round(time.perf_counter() - t, 3)
    else:
        t = time.perf_counter()
        model, tok = hf_model(model_dir)
        info["load_s"] = round(time.perf_counter() - t, 3)
        texts = [(r["prompt"] + r["positive"], r["prompt"] + r["negative"]) for r in rows]
        t = time.perf_counter()
        if tool == "repeng":  # repeng has PCA readings only (pca_diff: its default)
            from repeng import ControlVector, DatasetEntry

            entries = [DatasetEntry(positive=a, negative=b) for a, b in texts]
            vec = ControlVector.train(model, tok, entries, hidden_layers=layers, method="pca_diff", batch_size=16)
            vectors = dict(vec.directions)
        else:
            from steering_vectors import train_steering_vector
            from steering_vectors.aggregators import mean_aggregator, pca_aggregator

            agg = mean_aggregator() if method == "mean" else pca_aggregator()
            sv = train_steering_vector(model, tok, texts, layers=layers, read_token_index=-1, aggregator=agg,
                                       batch_size=16, show_progress=False)
            vectors = {i: v.float().numpy() for i, v in sv.layer_activations.items()}
        info["extract_s"] = round(time.perf_counter() - t, 3)
    from safetensors.numpy import save_file

    save_file({f"layer.{i}": np.ascontiguousarray(v, dtype=np.float32) for i, v in vectors.items()},
              out + ".safetensors")
    return info


def generate(tool: str, vectors_file: str, model_dir: str, prompt: str, layers: list[int], out: str,
             strength: float, new_tokens: int, rounds: int) -> dict:
    """Greedy generation of exactly `new_tokens` tokens, batch 1: the unsteered model and the steered one (and
    for ours the baked checkpoint), interleaved over `rounds` after one warm-up each; tokens per second."""
    import copy

    import torch
    from safetensors.torch import load_file

    vec = {i: t for i, t in ((int(k.split(".")[1]), t) for k, t in load_file(vectors_file).items()) if i in layers}
    model, tok = ours_model(model_dir) if tool == "ours" else hf_model(model_dir)
    batch = {k: v for k, v in tok(prompt, return_tensors="pt").items() if k in ("input_ids", "attention_mask")}

    def run(m) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            ids = m.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t
        assert ids.shape[1] - batch["input_ids"].shape[1] == new_tokens
        return new_tokens / dt

    variants = {"unsteered": lambda: run(model)}
    if tool == "ours":
        from malleable.steer.apply import applied, bake_model
        from malleable.steer.artefact import Artefact, model_identity

        artefact = Artefact(vec, {"form": "vector", "method": "caa", "layers": sorted(vec),
                                  "model": model_identity(model), "default_strength": strength})
        baked = bake_model(copy.deepcopy(model), artefact, strength)

        def steered():
            with applied(model, artefact, strength=strength):
                return run(model)

        import tempfile

        from peft import PeftModel

        from malleable.steer.peft_export import export_peft

        adapter = export_peft(artefact, model_dir, Path(tempfile.mkdtemp()) / "adapter", strength=strength)
        with_adapter = PeftModel.from_pretrained(copy.deepcopy(model), adapter).eval()
        variants |= {"steered": steered, "baked": lambda: run(baked), "peft": lambda: run(with_adapter)}
    elif tool == "repeng":
        import numpy as np
        from repeng import ControlModel, ControlVector

        control = ControlVector(model_type=model.config.model_type, directions={i: v.numpy().astype(np.float32)
                                                                                for i, v in vec.items()})

        def steered():  # wrapped for the run only, so the unsteered runs see the plain model
            cm = ControlModel(model, sorted(vec))
            cm.set_control(control, strength)
            try:
                return run(cm)
            finally:
                cm.unwrap()

        variants["steered"] = steered
    else:
        from steering_vectors import SteeringVector

        sv = SteeringVector(layer_activations=dict(vec), layer_type="decoder_block")

        def steered():
            with sv.apply(model, multiplier=strength):
                return run(model)

        variants["steered"] = steered
    for f in variants.values():  # warm-up
        f()
    per = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            per[k].append(round(f(), 3))
    return {"tokens_per_s": per, "threads": torch.get_num_threads()}


def main() -> None:
    tool, task = sys.argv[1:3]
    if task == "extract":
        method, model_dir, pairs_dir, layers, out = sys.argv[3:8]
        info = extract(tool, method, model_dir, pairs_dir, [int(x) for x in layers.split(",")], out)
    else:
        vectors, model_dir, prompt, layers, out, strength, new_tokens, rounds = sys.argv[3:11]
        info = generate(tool, vectors, model_dir, prompt, [int(x) for x in layers.split(",")], out, float(strength),
                        int(new_tokens), int(rounds))
    info |= {"total_s": round(time.perf_counter() - T0, 3), "vmhwm_mb": vmhwm_mb()}
    with open(out + ".json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
