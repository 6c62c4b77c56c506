"""The slim engine, written once for every method: load the model, cut calibration windows from local text, run
the decoder layers one after another on them, let the method prune each layer's linear modules (or score each
layer and remove the least influential), write a checkpoint that loads with `from_pretrained`, and measure the
dense and the slimmed model side by side in the same run.

Calibration windows: `seq_len` tokens at random starts of the source, as the Wanda / SparseGPT code draws
wikitext2, without special tokens; for a model with a chat template (an instruct model) each window is then framed
as a user turn of that template, as llm-compressor's examples calibrate instruct models on chat-rendered data
(`calibration.chat_template`: auto, on, off).

Output folder:
    config.json, model.safetensors, tokenizer files    the slimmed checkpoint (the input's dtype)
    report.json, report.md                              what was pruned or removed, and what it cost and saved
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import time
from pathlib import Path

import torch

from malleable.data.word_relations import RELATIONS
from malleable.errors import InputError, RecipeError
from malleable.io.atomic import atomic_dir, check_output
from malleable.io.quiet import quiet_transformers
from malleable.recipes.slim import KV, SlimRecipe
from malleable.report import environment, peak_rss_mb, trusted, trusted_lines, write_report
from malleable.slim.evict import EvictionPolicy, get_policy, n_kept
from malleable.slim.registry import LayerRemover, ModuleSkipper, SlimMethod, WeightPruner, get_method

SCHEMA = "malleable.slim/1"
UNSTRUCTURED_NOTE = ("Unstructured zeros are stored densely and multiplied densely: they save neither disk "
                     "space, memory nor time here; only a sparse storage format or sparse kernels would.")
NM_NOTE = ("N:M zeros are stored densely too: a speed-up needs kernels for the pattern (2:4 on NVIDIA Ampere "
           "or newer sparse tensor cores, with the weights packed); on this CPU they save nothing.")


def check_recipe(recipe: SlimRecipe) -> SlimMethod | None:
    """The recipe's method built with checked parameters (None for an eviction-only recipe), its KV eviction
    checked against its evaluation sizes, and evaluation text checked to differ from the calibration text."""
    if recipe.method is None and recipe.kv is None:
        raise RecipeError("method: give a slim method, a kv section (KV-cache eviction), or both")
    method = get_method(recipe.method, recipe.parameters) if recipe.method is not None else None
    if recipe.kv is not None:
        kv_policy(recipe.kv)
    unknown = sorted(set(recipe.evaluate.tasks or []) - set(RELATIONS)) if recipe.evaluate is not None else []
    if unknown:
        raise RecipeError(f"evaluate.tasks: unknown word relation '{unknown[0]}' (known: {', '.join(RELATIONS)})")
    held_out = [("evaluate.source", recipe.evaluate), ("kv.evaluate.source", recipe.kv and recipe.kv.evaluate)]
    for key, section in held_out if method is not None else []:
        if section is not None and section.source == recipe.calibration.source:
            raise RecipeError(f"{key}: '{section.source}' is also the calibration text; evaluate on held-out text "
                              "(lee, when calibrating on lee_background)")
    return method


def kv_policy(kv: KV) -> EvictionPolicy:
    """The KV section's policy, checked against the prompts its evaluation evicts (the quality windows' context
    and, with needles, the haystack)."""
    policy = get_policy(kv.policy, kv.parameters, key="kv.parameters")
    ev = kv.evaluate
    for length in (ev.context, *((ev.haystack,) if ev.needles else ())):
        kept = n_kept(length, kv.ratio, kv.budget)
        try:
            policy.check(length, kept)
        except InputError as e:  # the policy names its own `parameters.`; here they sit under kv
            raise InputError(f"kv.{e}") from None
    return policy


# -- the model's structure ---------------------------------------------------------------------------------
def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_path(model) -> str:
    """The name of the module list that holds the decoder layers: the first list of config.num_hidden_layers
    modules in the model."""
    n = getattr(text_config(model), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name
    raise InputError(f"{type(model).__name__}: no list of {n} decoder layers found (config num_hidden_layers)")


def matches(name: str, pattern: str) -> bool:
    """A keep_dense entry names a module by its full name, a trailing part of it, or a glob."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def targets(model, keep_dense: list[str]) -> dict[int, dict[str, torch.nn.Linear]]:
    """{layer index: {module name: linear}}: the decoder layers' linear modules that keep_dense does not name.
    A keep_dense entry that names no module of the model is an error (a typo would silently prune it)."""
    names = [n for n, _ in model.named_modules()]
    for pattern in keep_dense:
        if not any(matches(n, pattern) for n in names):
            raise RecipeError(f"keep_dense: '{pattern}' names no module of the model (e.g. "
                              f"{', '.join(n for n in names if n.endswith(('embed_tokens', 'down_proj')))[:120]})")
    path = decoder_path(model)
    out: dict[int, dict[str, torch.nn.Linear]] = {}
    for i, layer in enumerate(model.get_submodule(path)):
        out[i] = {f"{path}.{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                  and not any(matches(f"{path}.{i}.{n}", p) for p in keep_dense)}
    return out


def check_fits(method: SlimMethod, model, chosen: dict[int, dict[str, torch.nn.Linear]]) -> None:
    """What the parameters need of the model: an N:M pattern dividing every pruned module's input width, and a
    layer count that leaves at least one layer."""
    if isinstance(method, WeightPruner):
        m = method.pattern.m
        for modules in chosen.values():
            for name, lin in modules.items():
                if m and lin.in_features % m:
                    raise RecipeError(f"parameters.pattern: {method.pattern.name} does not divide the input width "
                                      f"{lin.in_features} of {name}")
        if not any(chosen.values()):
            raise RecipeError("keep_dense: keeps every linear module of the decoder layers dense; nothing to prune")
    elif isinstance(method, LayerRemover):
        n = len(chosen)
        k = method.count(n)
        if k >= n:
            raise RecipeError(f"parameters: removing {k} of the model's {n} decoder layers would leave none")
        if k < 1:
            raise RecipeError(f"parameters.ratio: {method.p['ratio']} of {n} layers rounds to 0 layers to remove")


# -- calibration -----------------------------------------------------------------------------------------------
class _Caught(Exception):
    """Raised by the pre-hook on the first decoder layer once its inputs are caught."""


@torch.no_grad()
def first_inputs(model, layers, windows: torch.Tensor, batch_size: int) -> list[tuple]:
    """Per batch of windows: (hidden states, other positional args, keyword args) with which the model calls its
    first decoder layer (masks, rotary embeddings, ...), caught by a pre-hook that stops the forward there."""
    caught = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, tuple(args[1:]), kwargs))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for chunk in windows.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def run_layer(layer, inputs: list[tuple]) -> list[tuple]:
    """The layer's outputs for every caught batch, packed as the next layer's inputs (same masks and
    embeddings)."""
    out = []
    for hidden, args, kwargs in inputs:
        h = layer(hidden, *args, **kwargs)
        out.append((h[0] if isinstance(h, tuple) else h, args, kwargs))
    return out


@torch.no_grad()
def input_stats(layer, modules: dict[str, torch.nn.Linear], kind: str, inputs: list[tuple], samples: int
                ) -> dict[str, torch.Tensor]:
    """Per linear module, from one pass of the layer over the inputs: "norms", sum over tokens of x^2 per input
    feature / samples (Wanda's scaler_row); "hessian", 2 X^T X / samples (SparseGPT's H). Float32, as both."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            part = (x * x).sum(0) if kind == "norms" else x.T @ x
            sums[name] = part if name not in sums else sums[name] + part
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: s / samples if kind == "norms" else 2 * s / samples for n, s in sums.items()}


def prune_layers(method: WeightPruner, model, chosen, windows, batch_size: int, progress: bool) -> list[dict]:
    """Prune every chosen module, layer after layer; a method with `stats` calibrates each layer on the outputs
    of the already pruned layers before it. One row per module: name, shape, zeros."""
    from tqdm import tqdm

    layers = model.get_submodule(decoder_path(model))
    inputs = first_inputs(model, layers, windows, batch_size) if method.stats else []
    rows = []
    for i in tqdm(range(len(layers)), desc="pruning layers", disable=not progress, leave=False):
        modules = chosen[i]
        stats = input_stats(layers[i], modules, method.stats, inputs, len(windows)) if method.stats else {}
        for name, lin in modules.items():
            with torch.no_grad():
                new = method.prune(lin.weight.detach().float(), stats.get(name), method.pattern)
                lin.weight.copy_(new.to(lin.weight.dtype))
            rows.append({"module": name, "shape": list(lin.weight.shape),
                         "zeros": int((lin.weight == 0).sum()), "sparsity": float((lin.weight == 0).float().mean())})
        if method.stats and i + 1 < len(layers):
            inputs = run_layer(layers[i], inputs)
    return rows


def layer_influence(method: LayerRemover, model, windows, batch_size: int, progress: bool) -> list[float]:
    """Each decoder layer's score, averaged over every calibration token (one pass through the layers)."""
    from tqdm import tqdm

    layers = model.get_submodule(decoder_path(model))
    inputs = first_inputs(model, layers, windows, batch_size)
    scores = []
    for layer in tqdm(layers, desc="scoring layers", disable=not progress, leave=False):
        outputs = run_layer(layer, inputs)
        parts = [method.influence(a[0].reshape(-1, a[0].shape[-1]), b[0].reshape(-1, b[0].shape[-1]))
                 for a, b in zip(inputs, outputs)]
        scores.append(float(torch.cat(parts).mean()))
        inputs = outputs
    return scores


def remove_layers(model, drop: list[int]) -> None:
    """Remove decoder layers `drop` in place: the rest renumbered (their attention's layer_idx, which indexes the
    KV cache), config num_hidden_layers and layer_types updated; save_pretrained then writes the smaller model."""
    path = decoder_path(model)
    kept = [layer for i, layer in enumerate(model.get_submodule(path)) if i not in set(drop)]
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, torch.nn.ModuleList(kept))
    cfg = text_config(model)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(drop)]
    cfg.num_hidden_layers = len(kept)


# -- the run ---------------------------------------------------------------------------------------------------
def skeleton(recipe: SlimRecipe):
    """The model built from its config on the meta device (no weights read): names and shapes for the plan."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from malleable.models.checkpoints import Trust, check_model_folder

    base, _ = check_model_folder(recipe.model, Trust(recipe.trust_remote_code, recipe.allow_pickle))
    try:
        cfg = AutoConfig.from_pretrained(base, trust_remote_code=recipe.trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=recipe.trust_remote_code)
    except Exception as e:  # an unknown architecture or a config transformers rejects
        from malleable.errors import reason

        raise InputError(f"{base}: cannot build the model from its config ({reason(e, typed=True)})") from None


def plan(recipe: SlimRecipe, method: SlimMethod | None = None) -> dict:
    """What the run will do, from the config and weight headers alone; every check that needs the model's
    shapes runs here, before any weight is read."""
    from malleable.io.checkpoint import Checkpoint
    from malleable.models.checkpoints import checkpoint_base

    method = method or check_recipe(recipe)
    model = skeleton(recipe)
    ckpt = Checkpoint(checkpoint_base(recipe.model)[0], allow_pickle=recipe.allow_pickle)
    params = sum(p.numel() for p in model.parameters())
    out = {"model": str(recipe.model), "method": recipe.method, "parameters": method and method.p,
           "parameters_total": params, "checkpoint_bytes": ckpt.nbytes}
    if recipe.kv is not None:
        from malleable.slim.kv_eval import kv_bytes

        kv, ev = recipe.kv, recipe.kv.evaluate
        kept = n_kept(ev.context, kv.ratio, kv.budget)
        out["kv"] = {"policy": kv.policy, "parameters": kv_policy(kv).p, "ratio": kv.ratio, "budget": kv.budget,
                     "decode_interval": kv.decode_interval, "context": ev.context, "kept": kept,
                     "kv_bytes_full": kv_bytes(model.config, ev.context, 4), "kv_bytes_kept": kv_bytes(model.config,
                                                                                                      kept, 4)}
    if method is None:
        return out
    chosen = targets(model, recipe.keep_dense)
    check_fits(method, model, chosen)
    out["layers"] = len(chosen)
    if isinstance(method, WeightPruner):
        modules = [(n, lin.weight.numel()) for mods in chosen.values() for n, lin in mods.items()]
        out |= {"pattern": method.pattern.name, "sparsity": method.pattern.sparsity, "modules": len(modules),
                "module_names": [n for n, _ in modules],
                "parameters_zeroed": sum(int(k * method.pattern.sparsity) for _, k in modules),
                "bytes_saved": 0}
    elif isinstance(method, ModuleSkipper):
        out |= method.plan(model)
    else:
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in
                     model.get_submodule(decoder_path(model))]
        k = method.count(len(chosen))
        removed = sorted(per_layer)[:k]  # layers differ in size only in unusual models: the smallest k, a bound
        share = sum(removed) / params
        out |= {"remove_layers": k, "parameters_removed": sum(removed), "bytes_saved": int(ckpt.nbytes * share)}
    return out


def describe(p: dict) -> str:
    """The dry-run text."""
    lines = []
    head = f"slim {p['model']} with {p['method']} {json.dumps(p['parameters'])}: "
    if "summary" in p:
        return head + p["summary"]
    if "pattern" in p:
        lines.append(head + f"{p['pattern']} at sparsity {p['sparsity']:g} in {p['modules']} linear modules of "
                     f"{p['layers']} decoder layers (e.g. {', '.join(p['module_names'][:3])}); about "
                     f"{p['parameters_zeroed']:,} of {p['parameters_total']:,} parameters set to zero; checkpoint "
                     f"size unchanged ({p['checkpoint_bytes'] / 1e6:.1f} MB: zeros are stored densely)")
    elif "remove_layers" in p:
        lines.append(head + f"remove {p['remove_layers']} of {p['layers']} decoder layers (those of lowest Block "
                     f"Influence on the calibration text): {p['parameters_removed']:,} of {p['parameters_total']:,} "
                     f"parameters, checkpoint {p['checkpoint_bytes'] / 1e6:.1f} MB -> about "
                     f"{(p['checkpoint_bytes'] - p['bytes_saved']) / 1e6:.1f} MB")
    if "kv" in p:
        k = p["kv"]
        during = (f", and back to {k['kept']} every {k['decode_interval']} tokens decoded" if k["decode_interval"]
                  else "")
        lines.append(f"KV cache of {p['model']}: evict with {k['policy']} {json.dumps(k['parameters'])} after the "
                     f"prefill ({k['kept']} of a {k['context']}-token prompt's positions kept per KV head{during}); "
                     f"{k['kv_bytes_full'] / 2**20:.1f} -> {k['kv_bytes_kept'] / 2**20:.1f} MiB in float32; "
                     f"measured against the full cache{' on the slimmed model' if p['method'] else ''}")
    return "\n".join(lines)


def load(recipe: SlimRecipe, tokenizer, routed: bool = False):
    """The recipe's model; a SkipGPT checkpoint (routed) only where `routed` allows it (KV eviction alone, which
    changes no weights, on the model as it is served)."""
    from malleable.models.checkpoints import Trust, load_model

    model = load_model(recipe.model, "causal_lm", tokenizer.pad_token_id,
                       trust=Trust(recipe.trust_remote_code, recipe.allow_pickle))
    if hasattr(model, "peft_config"):
        raise InputError(f"{recipe.model}: a PEFT adapter; slim a full checkpoint (merge the adapter first)")
    if getattr(model, "_malleable_routing", None) is not None and not routed:
        raise InputError(f"{recipe.model}: a SkipGPT checkpoint (routers beside the weights); slim the dense model "
                         "it came from (a kv section without a method measures eviction on it as it is)")
    return model


def stored_dtype(recipe: SlimRecipe) -> torch.dtype:
    """The floating dtype most of the input's weight bytes are stored in (the output is written in it)."""
    from malleable.io.checkpoint import Checkpoint
    from malleable.models.checkpoints import checkpoint_base

    counts: dict[torch.dtype, int] = {}
    for m in Checkpoint(checkpoint_base(recipe.model)[0], allow_pickle=recipe.allow_pickle).meta.values():
        if m.dtype.is_floating_point:
            counts[m.dtype] = counts.get(m.dtype, 0) + m.dtype.itemsize * math.prod(m.shape)
    return max(counts, key=counts.get) if counts else torch.float32


def counts(model) -> dict:
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params), "nonzero": sum(int(torch.count_nonzero(p)) for p in params)}


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def slim(recipe: SlimRecipe, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Slim the recipe's model with its method; write the checkpoint and the report to `out`."""
    from malleable.data.corpus import chat_windows, consecutive_windows, random_windows, tokens
    from malleable.learn.data import uses_chat_template
    from malleable.models.checkpoints import Trust, checkpoint_base, load_tokenizer

    method = check_recipe(recipe)
    check_output(out, force, inputs=[recipe.model])
    the_plan = plan(recipe, method)
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe.model, Trust(recipe.trust_remote_code, recipe.allow_pickle))
    kv_ids = kv_text(tokenizer, recipe.kv) if recipe.kv is not None else None
    if method is None:
        return evict_only(recipe, out, force, the_plan, tokenizer, kv_ids, start)
    c, ev = recipe.calibration, recipe.evaluate
    needs_data = not (isinstance(method, WeightPruner) and method.stats is None)
    windows = random_windows(tokenizer, c.source, c.n_samples, c.seq_len, recipe.seed) if needs_data else None
    chat = needs_data and uses_chat_template(tokenizer, c.chat_template, "calibration.chat_template")
    if chat:
        windows = chat_windows(tokenizer, windows)
    held_out = consecutive_windows(tokenizer, ev.source, ev.seq_len, ev.max_windows) if ev is not None else None
    if ev is not None and ev.speed:
        tokens(tokenizer, ev.source, ev.prompt_tokens)
    task_records = relation_records(ev.tasks, ev.task_items) if ev is not None else {}
    model = load(recipe, tokenizer)
    dtype = stored_dtype(recipe)
    seconds = {"load": round(time.perf_counter() - start, 3)}
    dense = copy.deepcopy(model) if recipe.evaluate is not None else None
    before = counts(model)
    t = time.perf_counter()
    chosen = targets(model, recipe.keep_dense)
    result: dict = {}
    if isinstance(method, WeightPruner):
        rows = prune_layers(method, model, chosen, windows, c.batch_size, progress)
        result["modules"] = rows
        zeros, size = sum(r["zeros"] for r in rows), sum(r["shape"][0] * r["shape"][1] for r in rows)
        result["pruned"] = {"pattern": method.pattern.name, "requested_sparsity": method.pattern.sparsity,
                            "achieved_sparsity": zeros / size, "modules": len(rows), "zeros": zeros,
                            "min_module_sparsity": min(r["sparsity"] for r in rows),
                            "max_module_sparsity": max(r["sparsity"] for r in rows)}
    elif isinstance(method, ModuleSkipper):
        result["routing"] = method.train(model, windows, c, recipe.seed, progress)
    else:
        scores = layer_influence(method, model, windows, c.batch_size, progress)
        k = method.count(len(scores))
        drop = sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])
        remove_layers(model, drop)
        result["layers"] = {"influence": scores, "removed": drop, "kept": len(scores) - k, "of": len(scores)}
    seconds["slim"] = round(time.perf_counter() - t, 3)
    after = counts(model)
    report = {"schema": SCHEMA, "recipe": recipe.model_dump(mode="json"), "method": recipe.method,
              "parameters": method.p, "calibration": {**c.model_dump(), "tokens": 0 if windows is None else
                                                      int(windows.numel()), "chat_template": chat},
              **result, "counts": {"dense": before, "slim": after}, "dtype": str(dtype).removeprefix("torch."),
              "trusted": trusted(recipe), "plan": the_plan}
    with atomic_dir(out, force, inputs=[recipe.model]) as tmp:
        with quiet_transformers():
            model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if isinstance(method, ModuleSkipper):
            method.write(model, tmp)
        model.float()
        report["bytes"] = {"dense": weight_bytes(checkpoint_base(recipe.model)[0]), "slim": weight_bytes(tmp)}
        t = time.perf_counter()
        if recipe.evaluate is not None:
            report["evaluation"] = evaluate(dense, model, tokenizer, recipe, held_out, task_records)
            if isinstance(method, ModuleSkipper):
                report["routing"] |= method.finish(model)
        seconds["evaluate"] = round(time.perf_counter() - t, 3)
        if recipe.kv is not None:
            t = time.perf_counter()
            report["kv"] = measure_kv(model, tokenizer, recipe, kv_ids)
            seconds["kv"] = round(time.perf_counter() - t, 3)
        report |= {"seconds": seconds, "wall_time_s": round(time.perf_counter() - start, 3),
                   "peak_rss_mb": peak_rss_mb(), "environment": environment()}
        write_report(tmp, report, markdown(report))
    report["output"] = {"path": str(Path(out).absolute())}
    return report


def kv_text(tokenizer, kv: KV) -> torch.Tensor:
    """The KV evaluation's held-out text as one row of ids, checked long enough for its windows and haystacks."""
    from malleable.data.corpus import tokens
    from malleable.slim.kv_eval import tokens_needed

    ev = kv.evaluate
    return tokens(tokenizer, ev.source, tokens_needed(ev.context, ev.continuation, ev.windows, ev.haystack,
                                                      ev.needles))


def measure_kv(model, tokenizer, recipe: SlimRecipe, ids: torch.Tensor) -> dict:
    """The recipe's KV eviction against the full cache on `model` (slim/kv_eval.py)."""
    from malleable.slim.kv_eval import measure

    kv, ev = recipe.kv, recipe.kv.evaluate
    policy = kv_policy(kv)
    size = {"ratio": kv.ratio, "budget": kv.budget, "decode_interval": kv.decode_interval}
    result = measure(model.eval(), tokenizer, ids, policy, size, context=ev.context, continuation=ev.continuation,
                     windows=ev.windows, haystack=ev.haystack, per_depth=ev.needles, seed=recipe.seed)
    return {"policy": kv.policy, "parameters": policy.p, **size, "source": ev.source, **result}


def evict_only(recipe: SlimRecipe, out, force: bool, the_plan: dict, tokenizer, ids: torch.Tensor,
               start: float) -> dict:
    """A recipe without a method: no weight changes; the eviction measured against the full cache, and the
    report (no checkpoint: serve the input model with the recipe's kv settings). A SkipGPT checkpoint is measured
    with its routers, as served."""
    model = load(recipe, tokenizer, routed=True)
    t = time.perf_counter()
    report = {"schema": SCHEMA, "recipe": recipe.model_dump(mode="json"), "method": None,
              "kv": measure_kv(model, tokenizer, recipe, ids), "trusted": trusted(recipe), "plan": the_plan}
    report |= {"seconds": {"load": round(t - start, 3), "kv": round(time.perf_counter() - t, 3)},
               "wall_time_s": round(time.perf_counter() - start, 3), "peak_rss_mb": peak_rss_mb(),
               "environment": environment()}
    with atomic_dir(out, force, inputs=[recipe.model]) as tmp:
        write_report(tmp, report, markdown(report))
    report["output"] = {"path": str(Path(out).absolute())}
    return report


def relation_records(tasks: list[str] | None, items: int) -> dict[str, list[dict]]:
    """{relation: the first `items` records of its test split} (word_relations, seed 0), read before the
    model loads so that a missing questions-words.txt fails first."""
    from malleable.data.word_relations import word_relations

    return {name: word_relations(name)["test"][:items] for name in tasks or []}


def task_accuracy(models: dict, tokenizer, records: dict[str, list[dict]]) -> dict:
    """Per relation and its mean, per model, from greedy answers of up to 16 new tokens (through the chat template
    when the tokenizer has one): exact match as the adapter zoo scores (the answer starts with the gold word; an
    untuned instruct model, which answers in a sentence, scores near 0) and `mention` (the gold word anywhere in
    the answer, the informative score for such a model)."""
    from malleable.evaluate.generation import generate, is_match, mentions
    from malleable.learn.data import uses_chat_template

    chat = uses_chat_template(tokenizer, "auto")
    out = {"exact": {}, "mention": {}}
    for name, recs in records.items():
        for k, m in models.items():
            answers = generate(m.eval(), tokenizer, [r["prompt"] for r in recs], max_new_tokens=16, chat=chat)
            for score, match in (("exact", is_match), ("mention", mentions)):
                hits = sum(match(a, r["completion"]) for a, r in zip(answers, recs, strict=True))
                out[score].setdefault(name, {})[k] = hits / len(recs)
    mean = {score: {k: sum(per[name][k] for name in per) / len(per) for k in models} for score, per in out.items()}
    return {"relations": out["exact"], "mention": out["mention"], "items": {n: len(r) for n, r in records.items()},
            "mean": mean["exact"], "mean_mention": mean["mention"], "chat_template": chat, "max_new_tokens": 16}


def evaluate(dense, slimmed, tokenizer, recipe: SlimRecipe, windows: torch.Tensor,
             task_records: dict[str, list[dict]]) -> dict:
    """Perplexity on the held-out windows, exact match on word relations, and prefill / decode speed, dense and
    slimmed, in this run."""
    from malleable.data.corpus import tokens
    from malleable.evaluate.perplexity import perplexity, speeds, window_nll

    ev = recipe.evaluate
    nll = {"dense": window_nll(dense, windows), "slim": window_nll(slimmed, windows)}
    ppl = {k: perplexity(v, ev.seq_len) for k, v in nll.items()}
    out = {"source": ev.source, "seq_len": ev.seq_len, "windows": len(windows), "tokens": int(windows.numel()),
           "perplexity": ppl | {"ratio": ppl["slim"] / ppl["dense"]}, "window_nll": nll}
    if task_records:
        out["tasks"] = task_accuracy({"dense": dense, "slim": slimmed}, tokenizer, task_records)
    if ev.speed:
        prompt = tokens(tokenizer, ev.source, ev.prompt_tokens)[:ev.prompt_tokens].unsqueeze(0)
        load = os.getloadavg()
        s = speeds({"dense": dense, "slim": slimmed}, prompt, ev.new_tokens, ev.repeats)
        out["speed"] = {**s, "prompt_tokens": ev.prompt_tokens, "new_tokens": ev.new_tokens, "repeats": ev.repeats,
                        "threads": torch.get_num_threads(), "loadavg_before": list(load),
                        "loadavg_after": list(os.getloadavg()),
                        "decode_ratio": s["slim"]["decode_tokens_per_s"] / s["dense"]["decode_tokens_per_s"],
                        "prefill_ratio": s["slim"]["prefill_tokens_per_s"] / s["dense"]["prefill_tokens_per_s"]}
    return out


def _n(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def kv_markdown(k: dict) -> list[str]:
    size = f"ratio {k['ratio']:g}" if k["ratio"] is not None else f"budget {k['budget']} tokens"
    during = f", and every {k['decode_interval']} tokens decoded" if k["decode_interval"] else ""
    full, ev = k["summary"]["full"], k["summary"]["evicted"]

    def needle(x):
        return "—" if x is None else f"{x:.2f}"

    return ["", f"## KV cache: {k['policy']} `{json.dumps(k['parameters'])}`, {size}", "",
            f"Evicted after the prefill{during}: {k['kept_positions']} of {k['context']} positions kept per KV head. "
            f"Quality: {k['windows']} windows of `{k['source']}`, the next {k['continuation']} tokens teacher forced "
            f"after {k['context']} tokens of context; retrieval: {k['needles']} needles in a {k['haystack']}-token "
            "haystack (at 10%, 50% and 90%). Both sides run on the same model in this run.", "",
            "| | full cache | evicted | ratio |", "|---|---|---|---|",
            f"| KV memory at {k['context']} tokens (MiB) | {full['kv_bytes'] / 2**20:.2f} | "
            f"{ev['kv_bytes'] / 2**20:.2f} | {ev['kv_bytes'] / full['kv_bytes']:.3f} |",
            f"| continuation NLL (nats/token) | {_n(full['nll'])} | {_n(ev['nll'])} | "
            f"{ev['nll'] / full['nll']:.3f} |",
            f"| KL from the full cache (nats/token) | 0 | {_n(ev['kl'])} | |",
            f"| needles found | {needle(full['needle'])} | {needle(ev['needle'])} | |",
            f"| seconds per window (median) | {_n(full['seconds'])} | {_n(ev['seconds'])} | |"]


def markdown(report: dict) -> str:
    r = report["recipe"]
    if report["method"] is None:
        return "\n".join([f"# slim: KV-cache eviction ({report['kv']['policy']})", "", f"- model: `{r['model']}` "
                          "(no weight changes)", *trusted_lines(report["trusted"]), *kv_markdown(report["kv"]), "",
                          f"Wall time {report['wall_time_s']} s, peak RSS {report['peak_rss_mb']} MB."]) + "\n"
    framed = "each a user turn of the chat template" if report["calibration"]["chat_template"] else "plain text"
    lines = [f"# slim: {report['method']}", "", f"- model: `{r['model']}`", f"- parameters: "
             f"`{json.dumps(report['parameters'])}`", f"- calibration: {r['calibration']['n_samples']} windows of "
             f"{r['calibration']['seq_len']} tokens from `{r['calibration']['source']}` ({framed}, seed {r['seed']})"
             if report["calibration"]["tokens"] else "- calibration: none (the method reads no data)",
             *trusted_lines(report["trusted"])]
    if "pruned" in report:
        p = report["pruned"]
        lines += [f"- pruned {p['modules']} linear modules ({p['pattern']}): {p['zeros']:,} weights set to zero, "
                  f"sparsity {p['achieved_sparsity']:.4f} (requested {p['requested_sparsity']:g}; per module "
                  f"{p['min_module_sparsity']:.4f}..{p['max_module_sparsity']:.4f})",
                  f"- kept dense: {', '.join(r['keep_dense'])} and everything outside the decoder layers", "",
                  UNSTRUCTURED_NOTE if p["pattern"] == "unstructured" else NM_NOTE]
    elif "routing" in report:
        from malleable.slim.skipgpt import routing_lines

        lines += routing_lines(report["routing"], report["parameters"])
    else:
        lay = report["layers"]
        lines += [f"- removed decoder layers {lay['removed']} of {lay['of']} (lowest Block Influence); "
                  f"{lay['kept']} remain", "", "| layer | Block Influence |", "|---|---|"]
        lines += [f"| {i}{' (removed)' if i in lay['removed'] else ''} | {_n(b)} |"
                  for i, b in enumerate(lay["influence"])]
    c, b = report["counts"], report["bytes"]
    lines += ["", "## Cost", "", "| | dense | slim | ratio |", "|---|---|---|---|",
              f"| parameters | {c['dense']['parameters']:,} | {c['slim']['parameters']:,} | "
              f"{c['slim']['parameters'] / c['dense']['parameters']:.3f} |",
              f"| non-zero parameters | {c['dense']['nonzero']:,} | {c['slim']['nonzero']:,} | "
              f"{c['slim']['nonzero'] / c['dense']['nonzero']:.3f} |",
              f"| weights on disk (MB, {report['dtype']}) | {b['dense'] / 1e6:.1f} | {b['slim'] / 1e6:.1f} | "
              f"{b['slim'] / b['dense']:.3f} |"]
    e = report.get("evaluation")
    if e:
        pp = e["perplexity"]
        lines.append(f"| perplexity on `{e['source']}` ({e['windows']} windows of {e['seq_len']} tokens) | "
                     f"{_n(pp['dense'])} | {_n(pp['slim'])} | {pp['ratio']:.3f} |")
        t = e.get("tasks")
        if t:
            m = t["mean"]
            ratio = f"{m['slim'] / m['dense']:.3f}" if m["dense"] else "—"
            lines.append(f"| exact match, mean of {len(t['relations'])} word relations (test items: "
                         f"{', '.join(str(n) for n in t['items'].values())}) | {m['dense']:.3f} | {m['slim']:.3f} | "
                         f"{ratio} |")
            m = t["mean_mention"]
            ratio = f"{m['slim'] / m['dense']:.3f}" if m["dense"] else "—"
            lines.append(f"| answer mentions the gold word, same items | {m['dense']:.3f} | {m['slim']:.3f} | "
                         f"{ratio} |")
        s = e.get("speed")
        if s:
            for k, what in (("prefill", f"prefill tokens/s ({s['prompt_tokens']}-token prompt)"),
                            ("decode", f"decode tokens/s ({s['new_tokens']} new tokens)")):
                lines.append(f"| {what} | {_n(s['dense'][f'{k}_tokens_per_s'])} | {_n(s['slim'][f'{k}_tokens_per_s'])}"
                             f" | {s[f'{k}_ratio']:.3f} |")
            lines += ["", f"Speed: medians of {s['repeats']} interleaved repeats after a warm-up, batch 1, "
                      f"{s['threads']} torch threads, load average {s['loadavg_before'][0]:.2f} before and "
                      f"{s['loadavg_after'][0]:.2f} after."]
    if "kv" in report:
        lines += kv_markdown(report["kv"])
    lines += ["", f"Wall time {report['wall_time_s']} s, peak RSS {report['peak_rss_mb']} MB."]
    return "\n".join(lines) + "\n"
