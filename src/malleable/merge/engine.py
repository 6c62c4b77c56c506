"""The merge machinery, written once for every rule: plan (validate everything), then stream.

`plan_merge` opens every input's headers, checks architectures, tensor sets, shapes and every parameter
value for every tensor, and computes the output layout: nothing is read beyond headers and nothing is
written. `run_merge` then streams: for each tensor, read it from each input, merge, write it into its
place in the output shard, free. Peak memory is a few tensors, whatever the model size.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from malleable.deltas.linalg import lowrank_from_dense
from malleable.deltas.lowrank import LowRankDelta
from malleable.errors import InputError, RecipeError
from malleable.io.adapter import LoraAdapter, is_adapter, read_adapter, write_adapter
from malleable.io.atomic import atomic_dir, check_output
from malleable.io.checkpoint import Checkpoint, dtype_from_name
from malleable.io.hashing import BackgroundHasher
from malleable.io.paths import check_folder
from malleable.io.writer import ShardedWriter, parse_size, split_shards
from malleable.merge import chat_template, vocab
from malleable.merge.params import ParamResolver, layer_index, rename_layer
from malleable.merge.registry import LoraJob, Rule, get_rule, rule_params
from malleable.recipes.merge import MergeRecipe
from malleable.report import environment, peak_rss_mb, write_report

# files copied from the base (or first) model next to merged weights, so the output loads as-is
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
               "added_tokens.json")


# why models whose vocabularies differ are refused without a tokenizer section
VOCAB_HINT = ("the vocabularies differ; set tokenizer_source (or a tokenizer: section) to merge them over one "
              "vocabulary")
# config.json lists with one entry per layer: re-laid out with the layers when slices stack them
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
# tensors outside the layers that sit before them (taken from the first slice's model; the rest from the last's);
# GPT-NeoX's output embedding (embed_out) sits after them, as in mergekit's gpt-neox architecture
_PRE_LAYER = re.compile(r"embed(?!_out)|wte|wpe|word_embeddings")


@dataclass(frozen=True)
class TensorSource:
    """Where one output tensor comes from: tensor `names[i]` of input `inputs[i]` (an index into `plan.models`) and
    tensor `base` of the base (None: the base is not read; of input `base_input` where a slice names its own base),
    its parameters resolved by `resolver` with per-layer gradients read at position `layer`."""

    names: tuple[str, ...]
    inputs: tuple[int, ...]
    base: str | None
    resolver: ParamResolver
    layer: int | None
    base_input: int | None = None  # the base tensor is input `base_input`'s, not the recipe base's (slices)


@dataclass
class MergePlan:
    recipe: MergeRecipe
    rule: Rule
    resolver: ParamResolver
    input_kind: str  # "model" or "adapter"
    output_kind: str  # "model" or "adapter"
    base: Checkpoint | None
    models: list[Checkpoint] = field(default_factory=list)
    adapters: list[LoraAdapter] = field(default_factory=list)
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # LoRA modules, in output order
    rank: int | None = None
    # output tensor -> its source, where it is not "the same name in every input" (slices rename layers)
    sources: dict[str, TensorSource] = field(default_factory=dict)
    # slices: output layer i is layer layer_map[i][1] of plan.models[layer_map[i][0]]
    layer_map: list[tuple[int, int]] | None = None
    donor: Checkpoint | None = None  # config.json and tokenizer files come from it (default: base or first input)
    vocab: vocab.Vocab | None = None  # vocabulary merging: the output tokenizer and where each model's rows go

    @property
    def donor_root(self) -> Path:
        """The folder config.json and the tokenizer files are copied from."""
        return (self.donor or self.base or self.models[0]).root

    def source(self, name: str) -> TensorSource:
        src = self.sources.get(name)
        if src is None:
            n = len(self.models)
            src = TensorSource((name,) * n, tuple(range(n)), name if self.base else None, self.resolver,
                               layer_index(name))
        return src

    def vocab_members(self, src: TensorSource) -> tuple[int, ...]:
        """The models merged into a tensor, as indices into the vocabulary's members (the base first when the
        recipe has one, then the inputs), in the order `_merge_floats` hands over their tensors."""
        shift = int(self.base is not None)
        base = () if src.base is None else (0,) if src.base_input is None else (src.base_input + shift,)
        return base + tuple(i + shift for i in src.inputs)

    def base_of(self, src: TensorSource | None) -> Checkpoint | None:
        """The checkpoint a tensor's base is read from: the recipe's base, or a slice's own (an input)."""
        return self.models[src.base_input] if src is not None and src.base_input is not None else self.base

    @property
    def base_used(self) -> bool:
        """LoRA adapters merged into an adapter never read the base (it is only checked, if given)."""
        return self.base is not None and not (self.input_kind == "adapter" and self.output_kind == "adapter")

    @property
    def input_files(self) -> list[Path]:
        """Every file the merge reads (and hashes for the report)."""
        files = list(self.base.files) if self.base_used else []
        for m in self.models:
            files += m.files
        for a in self.adapters:
            files += a.files
        return files

    @property
    def peak_estimate_bytes(self) -> int:
        """Float32 working set of the largest tensor: one reused buffer per input, the base and two output
        buffers (rules work in place, their temporaries are small blocks)."""
        if self.output_kind == "adapter":
            return sum(4 * (d.B.numel() + d.A.numel()) for a in self.adapters for d in a.deltas.values())
        largest = max((math.prod(s) for _, _, s in self.tensors), default=0)
        n_inputs = len(self.models) or len(self.adapters)
        return 4 * largest * (n_inputs + 3)


def _num_layers(config: dict | None, names: list[str]) -> int:
    if config:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(config.get(key), int):
                return config[key]
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else 1


def _inner_name(recipe: MergeRecipe, rule: Rule) -> str | None:
    """The full-space rule a LoRA rule applies to its coordinates (None for rules without one)."""
    return recipe.parameters.get("inner", rule.params["inner"].default) if rule.inner else None


def _output_plan(recipe: MergeRecipe, source: Checkpoint) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """`source`'s tensors in order, floating ones cast to the recipe's output dtype when it sets one."""
    out = dtype_from_name(recipe.output.dtype) if recipe.output.dtype else None
    return [(name, out if (out and meta.dtype.is_floating_point) else meta.dtype, meta.shape)
            for name, meta in source.meta.items()]


def plan_merge(recipe: MergeRecipe) -> MergePlan:
    """Validate the recipe against its inputs. Raises a MalleableError naming the key or file."""
    rule = get_rule(recipe.method)
    inner = _inner_name(recipe, rule)
    if rule.inner and not isinstance(inner, str):
        raise RecipeError("parameters.inner: expected the name of a full-space merge rule")
    params = rule_params(rule, inner)
    if (rule.space == "learned") != (recipe.data is not None):
        raise RecipeError(f"data: method '{rule.name}' learns from data and needs a data section" if recipe.data is None
                          else f"data: method '{rule.name}' does not learn from data; remove the data section")
    for p in ([recipe.base] if recipe.base else []) + [i.path for i in recipe.inputs]:
        if not p.exists():
            raise InputError(f"{p}: no such file or directory")
        check_folder(p if p.is_dir() else p.parent)  # its config and tokenizer files are copied to the output
    adapters_in = [is_adapter(i.path) for i in recipe.inputs]
    if any(adapters_in) and not all(adapters_in):
        raise InputError(f"{recipe.inputs[adapters_in.index(False)].path}: mixes full checkpoints with LoRA "
                         "adapters; merge either checkpoints or adapters")
    base = Checkpoint(recipe.base, recipe.allow_pickle) if recipe.base else None
    if all(adapters_in):
        if recipe.slices is not None:
            raise RecipeError("slices: stack or merge layer ranges of full checkpoints, not of LoRA adapters")
        plan = _plan_adapters(recipe, rule, params, base)
    else:
        plan = _plan_models(recipe, rule, params, base)
    if recipe.output.rank is not None and plan.output_kind == "model" and rule.space == "full":
        raise RecipeError("output.rank: this merge writes a model with a full-space rule; there is no rank to set")
    if plan.input_kind == "adapter" and recipe.read_dtype:
        raise RecipeError("read_dtype: applies to merging full checkpoints, not LoRA adapters")
    if recipe.tokenizer is not None and (plan.output_kind != "model" or plan.input_kind != "model"):
        raise RecipeError("tokenizer: vocabulary merging applies to full checkpoints merged into a model")
    if recipe.chat_template is not None:
        if plan.output_kind != "model":
            raise RecipeError("chat_template: the output is a LoRA adapter, which carries no tokenizer")
        chat_template.check(recipe.chat_template, plan.donor_root)
    for where, n in ([(f"slices.{i}", len(sl.all_sources())) for i, sl in enumerate(recipe.slices)]
                     if recipe.slices is not None else [("inputs", len(recipe.inputs))]):
        low, high = rule.inputs
        if not low <= n <= (high if high is not None else n):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise RecipeError(f"{where}: method '{rule.name}' merges {want} input(s) besides the base, got {n}")
    for name, _, _ in plan.tensors:  # every parameter value for every tensor, checked before any work
        src = plan.source(name)
        src.resolver.values(name, src.layer)
        src.resolver.weights(name, src.layer)
        if plan.vocab is not None and vocab.is_vocab_tensor(name):  # and every token's row has a source
            plan.vocab.layout(plan.vocab_members(src), f"'{name}'")
    return plan


def _plan_models(recipe: MergeRecipe, rule: Rule, params, base: Checkpoint | None) -> MergePlan:
    if rule.space == "lora":
        raise RecipeError(f"method: '{rule.name}' merges LoRA adapters, but the inputs are full checkpoints")
    own_bases = recipe.slices is not None and all(sl.base_input is not None for sl in recipe.slices)
    if rule.uses_base in (True, "raw") and base is None and not own_bases:  # else every slice names its base
        what = "interpolates from the base model" if rule.uses_base == "raw" else "works on task vectors"
        raise RecipeError(f"base: method '{rule.name}' {what} and needs a base model")
    if recipe.output.kind == "adapter":
        raise RecipeError("output.kind: full checkpoints merge into a model, not an adapter")
    models = [Checkpoint(i.path, recipe.allow_pickle) for i in recipe.inputs]
    if recipe.slices is not None:
        return _plan_slices(recipe, rule, params, base, models)
    ref = base or models[0]
    everyone = models + ([base] if base else [])
    _same_architecture(everyone, ref, ("model_type", "hidden_size", "num_hidden_layers"),
                       "different architectures cannot be merged")
    if recipe.tokenizer is None:
        _same_architecture(everyone, ref, ("vocab_size",), VOCAB_HINT)
    for m in everyone:
        for name, meta in ref.meta.items():
            if name not in m.meta:
                raise InputError(f"{m.path}: tensor '{name}' is missing (present in {ref.path})")
            if recipe.tokenizer and vocab.is_vocab_tensor(name):  # rows differ per vocabulary; the rest may not
                if m.meta[name].shape[1:] != meta.shape[1:]:
                    raise InputError(f"{m.path}: tensor '{name}' has shape {list(m.meta[name].shape)}, but "
                                     f"{ref.path} has {list(meta.shape)} (only the rows may differ)")
            elif m.meta[name].shape != meta.shape:
                raise InputError(f"{m.path}: tensor '{name}' has shape {list(m.meta[name].shape)}, but "
                                 f"{ref.path} has {list(meta.shape)}")
        extra = set(m.meta) - set(ref.meta)
        if extra:
            raise InputError(f"{m.path}: tensor '{sorted(extra)[0]}' is not in {ref.path}")
    tensors = _output_plan(recipe, ref)
    resolver = ParamResolver(recipe, params, _num_layers(ref.config, ref.names))
    plan = MergePlan(recipe, rule, resolver, "model", "model", base, models=models, tensors=tensors)
    if recipe.tokenizer is not None:
        plan.vocab = _plan_vocab(recipe, [base] * (base is not None) + models)
        plan.tensors = [(n, d, (plan.vocab.size, *shape[1:]) if vocab.is_vocab_tensor(n) else shape)
                        for n, d, shape in tensors]
    return plan


def _plan_vocab(recipe: MergeRecipe, members: list[Checkpoint]) -> vocab.Vocab:
    """The output vocabulary over `members` (the base first when it is read, then the inputs, the order the
    engine reads them in)."""
    spec = recipe.tokenizer
    roots = [m.root.resolve() for m in members]
    if spec.base is not None:
        if spec.base.resolve() not in roots:
            raise RecipeError(f"tokenizer.base: {spec.base} is not one of the merged models")
        start = base_index = roots.index(spec.base.resolve())
    else:
        start, base_index = 0, 0 if recipe.base is not None else None

    def rows(m: Checkpoint) -> int | None:
        shapes = [meta.shape[0] for name, meta in m.meta.items() if vocab.is_vocab_tensor(name)]
        return min(shapes) if shapes else None

    return vocab.plan_vocab(spec, [(m.root, m.config, rows(m)) for m in members], base_index, start)


def _same_architecture(checkpoints: list[Checkpoint], ref: Checkpoint, keys: tuple[str, ...], why: str) -> None:
    """Refuse a checkpoint whose config.json differs from `ref`'s in one of `keys` (where both set it), saying `why`."""
    ref_cfg = ref.config or {}
    for m in checkpoints:
        cfg = m.config or {}
        for key in keys:
            if key in cfg and key in ref_cfg and cfg[key] != ref_cfg[key]:
                raise InputError(f"{m.root / 'config.json'}: {key} is {cfg[key]}, but {ref.path} has "
                                 f"{ref_cfg[key]}: {why}")


def _plan_slices(recipe: MergeRecipe, rule: Rule, params, base: Checkpoint | None,
                 models: list[Checkpoint]) -> MergePlan:
    """Stack the slices into a deeper (or shallower) model. Output layer i of a slice is its sources' layer
    start + i (renamed to the output index), merged by the rule (passthrough: copied); tensors outside the layers
    before them (embeddings) are merged from the first slice's sources, the others (final norm, lm_head) from the
    last slice's, as in mergekit (which, where the last slice has more sources than the first, silently merges only
    as many of them as the first slice has; we merge them all). The base is read only where a slice names its
    `base_layers`; it always lends config.json and the tokenizer files. With a `tokenizer` section, the vocabulary
    is built from every model the recipe names and each embedding / lm_head row laid out over it with the default
    rows of that tensor's own models (`vocab.Vocab.layout`)."""
    slices = [sl.all_sources() for sl in recipe.slices]
    for n, (sl, srcs) in enumerate(zip(recipe.slices, slices)):
        for i, s in enumerate(srcs):
            if s.input >= len(models):
                where = f"slices.{n}.input" if sl.sources is None else f"slices.{n}.sources.{i}.input"
                raise RecipeError(f"{where}: {s.input} is not an input (there are {len(models)})")
        if sl.base_input is not None and sl.base_input >= len(models):
            raise RecipeError(f"slices.{n}.base_input: {sl.base_input} is not an input (there are {len(models)})")
        if sl.base_layers is not None and base is None and sl.base_input is None:
            raise RecipeError(f"slices.{n}.base_layers: the recipe has no base")
        if rule.uses_base in (True, "raw") and sl.base_layers is None:
            raise RecipeError(f"slices.{n}.base_layers: method '{rule.name}' needs the base's layers in every slice")
    bases = [base if sl.base_input is None else models[sl.base_input] for sl in recipe.slices]
    unused = sorted(set(range(len(models))) - {s.input for srcs in slices for s in srcs}
                    - {sl.base_input for sl in recipe.slices})
    if unused:
        raise RecipeError(f"inputs.{unused[0]}: no slice takes layers from it")
    ref = base or models[slices[0][0].input]
    # stacked layers may come from models of other depths: the layer count is not compared; with vocabulary
    # merging, nor the vocabulary size
    everyone = models + ([base] if base else [])
    _same_architecture(everyone, ref, ("model_type", "hidden_size"), "layers of different architectures cannot be "
                       "stacked")
    if recipe.tokenizer is None:
        _same_architecture(everyone, ref, ("vocab_size",), VOCAB_HINT)
    layers: dict[int, dict[int, list[str]]] = {}  # per checkpoint (by id): layer -> its tensor names, file order
    for m in models + ([base] if base else []):
        by_layer: dict[int, list[str]] = {}
        for name in m.meta:
            if (i := layer_index(name)) is not None:
                by_layer.setdefault(i, []).append(name)
        layers[id(m)] = by_layer
    out_dtype = dtype_from_name(recipe.output.dtype) if recipe.output.dtype else None
    tensors, sources, layer_map = [], {}, []

    def check(ckpt: Checkpoint, name: str, like: tuple[int, ...], where: str) -> None:
        if name not in ckpt.meta:
            raise InputError(f"{ckpt.path}: has no tensor '{name}' ({where})")
        have = ckpt.meta[name].shape
        if recipe.tokenizer is not None and vocab.is_vocab_tensor(name) and have[1:] == like[1:]:
            return  # rows differ per vocabulary: laid out over the output one when merged
        if have != like:
            raise InputError(f"{ckpt.path}: tensor '{name}' has shape {list(ckpt.meta[name].shape)}, but the "
                             f"tensor it is merged or stacked with has {list(like)} ({where})")

    def add(out_name: str, names: list[str], n: int, base_name: str | None, layer: int | None, where: str) -> None:
        srcs = slices[n]
        meta = models[srcs[0].input].meta[names[0]]
        for s, name in zip(srcs, names):
            check(models[s.input], name, meta.shape, where)
        if base_name is not None:
            check(bases[n], base_name, meta.shape, where)
        if out_name in sources:
            raise InputError(f"{models[srcs[0].input].path}: tensor '{names[0]}' would be written twice as "
                             f"'{out_name}'")
        tensors.append((out_name, out_dtype if (out_dtype and meta.dtype.is_floating_point) else meta.dtype,
                        meta.shape))
        sources[out_name] = TensorSource(tuple(names), tuple(s.input for s in srcs), base_name, resolvers[n], layer,
                                         recipe.slices[n].base_input)

    resolvers = []
    for n, (sl, srcs) in enumerate(zip(recipe.slices, slices)):
        lengths = {s.layers[1] - s.layers[0] for s in srcs}
        if sl.base_layers is not None:
            lengths.add(sl.base_layers[1] - sl.base_layers[0])
        if len(lengths) != 1:
            raise RecipeError(f"slices.{n}: its sources' layer ranges differ in length ({sorted(lengths)})")
        for i, s in enumerate(srcs):
            have = _num_layers(models[s.input].config, models[s.input].names)
            if s.layers[1] > have:
                where = f"slices.{n}.layers" if sl.sources is None else f"slices.{n}.sources.{i}.layers"
                raise RecipeError(f"{where}: [{s.layers[0]}, {s.layers[1]}] goes past the {have} layers of "
                                  f"{models[s.input].path}")
        if sl.base_layers is not None and sl.base_layers[1] > (have := _num_layers(bases[n].config, bases[n].names)):
            raise RecipeError(f"slices.{n}.base_layers: {list(sl.base_layers)} goes past the {have} layers of "
                              f"{bases[n].path}")
        inputs = []
        for s in srcs:
            own = recipe.inputs[s.input]
            inputs.append(own.model_copy(update={"parameters": {**own.parameters, **s.parameters},
                                                 **({"weight": s.weight} if s.weight is not None else {})}))
        sub = recipe.model_copy(update={"inputs": inputs, "slices": None,
                                        "parameters": {**recipe.parameters, **sl.parameters}})
        resolvers.append(ParamResolver(sub, params, lengths.pop()))

    def outside(n: int, pre: bool) -> None:
        first = models[slices[n][0].input]
        for name in first.meta:
            if layer_index(name) is None and bool(_PRE_LAYER.search(name)) == pre:
                add(name, [name] * len(slices[n]), n, name if recipe.slices[n].base_layers else None, None,
                    f"slices.{n}")

    outside(0, True)
    for n, (sl, srcs) in enumerate(zip(recipe.slices, slices)):
        head = models[srcs[0].input]
        for off in range(srcs[0].layers[1] - srcs[0].layers[0]):
            j = srcs[0].layers[0] + off
            if j not in layers[id(head)]:
                raise InputError(f"{head.path}: has no tensors of layer {j} (slices.{n})")
            template = layers[id(head)][j]
            if layer_map:
                k0, j0 = layer_map[0]
                want = {rename_layer(t, 0): models[k0].meta[t].shape for t in layers[id(models[k0])][j0]}
                have_ = {rename_layer(t, 0): head.meta[t].shape for t in template}
                if have_ != want:
                    odd = sorted(set(have_.items()) ^ set(want.items()))[0][0]
                    raise InputError(f"{head.path}: layer {j} does not match the layers stacked before it "
                                     f"(tensor '{odd}')")
            for t in template:
                names = [rename_layer(t, s.layers[0] + off) for s in srcs]
                base_name = rename_layer(t, sl.base_layers[0] + off) if sl.base_layers else None
                add(rename_layer(t, len(layer_map)), names, n, base_name, off, f"slices.{n}")
            layer_map.append((srcs[0].input, j))
    outside(len(slices) - 1, False)
    plan = MergePlan(recipe, rule, resolvers[0], "model", "model", base, models=models, tensors=tensors,
                     sources=sources, layer_map=layer_map, donor=base or models[slices[0][0].input])
    if recipe.tokenizer is not None:  # built from every model the recipe names, as mergekit's
        plan.vocab = _plan_vocab(recipe, [base] * (base is not None) + models)
        plan.tensors = [(n, d, (plan.vocab.size, *shape[1:]) if vocab.is_vocab_tensor(n) else shape)
                        for n, d, shape in tensors]
    return plan


def _plan_adapters(recipe: MergeRecipe, rule: Rule, params, base: Checkpoint | None) -> MergePlan:
    if rule.uses_base == "raw":
        raise RecipeError(f"method: '{rule.name}' interpolates between the base's and the inputs' own weights; "
                          "it merges full checkpoints, not LoRA adapters")
    adapters = [read_adapter(i.path) for i in recipe.inputs]
    first = adapters[0]
    for a in adapters[1:]:
        if a.base_model and first.base_model and a.base_model != first.base_model:
            raise InputError(f"{a.path / 'adapter_config.json'}: adapter for base model '{a.base_model}', but "
                             f"{first.path} is for '{first.base_model}'")
        if set(a.deltas) != set(first.deltas):
            odd = sorted(set(a.deltas) ^ set(first.deltas))[0]
            raise InputError(f"{a.path}: adapts a different set of modules than {first.path} (e.g. '{odd}')")
        for m, d in a.deltas.items():
            if d.shape != first.deltas[m].shape:
                raise InputError(f"{a.path}: module '{m}' has delta shape {list(d.shape)}, but {first.path} "
                                 f"has {list(first.deltas[m].shape)}")
    kind = recipe.output.kind if recipe.output.kind != "auto" else "adapter"
    modules = sorted(first.deltas)
    max_rank = max(d.rank for a in adapters for d in a.deltas.values())
    sum_rank = min(sum(a.deltas[m].rank for a in adapters) for m in modules)
    rank = recipe.output.rank
    if rule.space == "full" and kind == "adapter":
        rank = rank or max_rank
    # a full-space result is compressed to `rank` (at most a layer's width); a LoRA rule's result lives in the
    # span of the inputs' factors (at most the sum of their ranks): a larger rank would be clamped silently
    smallest = min(min(first.deltas[m].shape) for m in modules)
    limit = smallest if rule.space == "full" else min(smallest, sum_rank)
    if rank is not None and rank > limit:
        raise RecipeError(f"output.rank: {rank} is larger than these inputs allow ({limit})")
    if rule.name == "concat" and rank is not None and rank < sum_rank:
        raise RecipeError(f"output.rank: concat is exact and needs rank {sum_rank} (the sum of the input ranks)")
    if kind == "model":
        if base is None:
            raise RecipeError("base: merging LoRA adapters into a model needs the base checkpoint")
        for m in modules:
            w = first.weight_name(m)
            want = first.deltas[m].shape[::-1] if first.fan_in_fan_out else first.deltas[m].shape
            if w not in base.meta:
                raise InputError(f"{base.path}: has no tensor '{w}' that adapter {first.path} targets")
            if base.meta[w].shape != tuple(want):
                raise InputError(f"{base.path}: tensor '{w}' has shape {list(base.meta[w].shape)}, but adapter "
                                 f"{first.path} makes a delta of shape {list(want)}")
        tensors = _output_plan(recipe, base)
    else:
        tensors = [(m, torch.float32, first.deltas[m].shape) for m in modules]
    resolver = ParamResolver(recipe, params, _num_layers(base.config if base else None, modules))
    return MergePlan(recipe, rule, resolver, "adapter", kind, base, adapters=adapters, tensors=tensors,
                     modules=modules, rank=rank)


def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per tensor, from the seed and the tensor's name: results do not depend on order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _all_finite(t: torch.Tensor) -> bool:
    """A finite sum proves every entry finite (one fast reduction); only otherwise check entry by entry."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, name: str, source: Path, allow: bool) -> None:
    if not allow and t.is_floating_point() and not _all_finite(t):
        raise InputError(f"{source}: tensor '{name}' contains NaN or inf (set allow_nonfinite: true to merge "
                         "anyway)")


class _Stats:
    """Per-tensor norms and ranks for the report."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, name: str, delta: torch.Tensor | None = None, rank: int | None = None) -> None:
        row: dict = {"name": name}
        if delta is not None:
            row["delta_norm"] = round(float(delta.float().norm()), 6)
        if rank is not None:
            row["rank"] = rank
        self.rows.append(row)


def _merge_dense(plan: MergePlan, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Apply a full-space rule to output tensor `name`'s float32 task vectors (uses_base) or weights."""
    src = plan.source(name)
    params = src.resolver.values(name, src.layer)
    return plan.rule.fn(tensors, src.resolver.weights(name, src.layer), _generator(plan.recipe.seed, name),
                        **params)


def _merge_module(plan: MergePlan, module: str) -> tuple[LowRankDelta | None, torch.Tensor | None]:
    """Merge one LoRA module: a low-rank result (LoRA rules, or full rules compressed to the output rank),
    or for full rules into a model the dense delta itself (no compression needed)."""
    deltas = [a.deltas[module] for a in plan.adapters]
    if plan.rule.space == "lora":
        params = plan.resolver.values(module)
        out = plan.rule.fn(deltas, plan.resolver.weights(module), _generator(plan.recipe.seed, module),
                           rank=plan.rank, **params)
        return out, None
    dense = _merge_dense(plan, module, [d.dense() for d in deltas])
    if plan.output_kind == "model":
        return None, dense
    return lowrank_from_dense(dense, plan.rank), None


def _keep_tensor_buffers_mmapped() -> None:
    """Make freed tensor buffers go back to the OS at once.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which tensor
    buffers come from the heap and stay in RSS when freed; streaming then grows by a model's worth.
    Pinning the threshold keeps every buffer over 1 MiB mmapped. The rules' block-sized temporaries stay
    below it, on the heap: a 64 MiB trim threshold keeps freed heap for the next block instead of returning
    it and faulting it back in each time (about 15% of TIES' disjoint merge). No-op where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _Buffers:
    """One reusable buffer per role (an input's float32 copy, the base's, the two output buffers).

    A fresh multi-MB tensor is mmapped zero pages, and faulting them in costs more than the arithmetic on
    them (a 64 MB bf16->float32 conversion: 39 ms into a new tensor, 13 ms into a reused one). Each role keeps
    the largest buffer it has needed and hands out views of its start, so the model's largest tensor still
    bounds peak memory.
    """

    def __init__(self) -> None:
        self._bytes: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        buf = self._bytes.get(role)
        if buf is None or buf.numel() < n:
            self._bytes[role] = buf = torch.empty(n, dtype=torch.uint8)
        return buf[:n].view(dtype).view(shape)

    def read_float(self, ckpt: Checkpoint, name: str, role: str) -> torch.Tensor:
        """`name` from `ckpt` as float32, in buffer `role`."""
        return ckpt.read(name, self.get(role, ckpt.meta[name].shape, torch.float32))


def _merge_batched(plan: MergePlan) -> dict[str, LowRankDelta]:
    """Every module through the rule's ``batch`` (a LoRA rule that merges many modules at once), with the same
    per-module arguments `_merge_module` would pass; {} for rules without one. Its results are low-rank, so
    holding all of them is holding one adapter."""
    if plan.input_kind != "adapter" or plan.rule.space != "lora" or plan.rule.batch is None:
        return {}
    jobs = [LoraJob([a.deltas[m] for a in plan.adapters], plan.resolver.weights(m),
                    _generator(plan.recipe.seed, m), plan.rank, plan.resolver.values(m)) for m in plan.modules]
    return dict(zip(plan.modules, plan.rule.batch(jobs)))


def run_merge(plan: MergePlan, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Execute a validated plan into `out` (atomically); returns the report dict."""
    if plan.rule.space == "learned":  # the rule trains and writes its own output (see registry)
        return plan.rule.fn(plan, out, force=force, progress=progress)
    start = time.perf_counter()
    _keep_tensor_buffers_mmapped()
    recipe = plan.recipe
    out = check_output(out, force, inputs=[i.path for i in recipe.inputs] + ([recipe.base] if recipe.base else []))
    hasher = BackgroundHasher(plan.input_files)
    stats = _Stats()
    with atomic_dir(out, force) as tmp:
        if plan.input_kind == "adapter" and plan.output_kind == "adapter":
            merged = _merge_batched(plan)
            for m in tqdm(plan.modules, desc=f"merge {recipe.method}", unit="module", disable=not progress):
                if m not in merged:
                    merged[m], _ = _merge_module(plan, m)
                stats.add(m, rank=merged[m].rank)
            dtype = next(iter(plan.adapters[0].deltas.values())).A.dtype
            if recipe.output.dtype:
                dtype = dtype_from_name(recipe.output.dtype)
            write_adapter(tmp, merged, plan.adapters[0].config, dtype)
        else:
            _stream_model(plan, tmp, stats, progress)
        report = _report(plan, out, tmp, stats, hasher.results(), time.perf_counter() - start)
        write_report(tmp, report, _markdown(report))
    return report


def _stream_model(plan: MergePlan, tmp: Path, stats: _Stats, progress: bool) -> None:
    recipe = plan.recipe
    writer = ShardedWriter(tmp, plan.tensors, parse_size(recipe.output.max_shard_size),
                           {"merged_by": "malleable", "method": recipe.method})
    # writing runs on a thread (file writes release the GIL) while the next tensor merges; results
    # alternate between two output buffers, and a buffer is refilled only after its write has finished
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as write_thread:
        _merge_tensors(plan, writer, write_thread, stats, progress)
    writer.close()
    donor = plan.donor_root
    for f in MODEL_FILES:
        if (donor / f).is_file():
            shutil.copy2(donor / f, tmp / f)
    if (donor / "config.json").is_file() and (plan.layer_map is not None or recipe.output.dtype or plan.vocab):
        _write_config(plan, donor / "config.json", tmp / "config.json")
    if plan.vocab is not None:  # the merged vocabulary's tokenizer replaces the donor's files
        for f in MODEL_FILES:
            if f != "config.json" and f != "generation_config.json":
                (tmp / f).unlink(missing_ok=True)
        plan.vocab.tokenizer.save_pretrained(tmp)
        donor = tmp
    if recipe.chat_template is not None:
        folders = ([recipe.base] if recipe.base else []) + [i.path for i in recipe.inputs]
        chat_template.write(recipe.chat_template, donor, folders, tmp)


def _merge_tensors(plan: MergePlan, writer: ShardedWriter, write_thread: ThreadPoolExecutor, stats: _Stats,
                   progress: bool) -> None:
    recipe = plan.recipe
    lora_targets = {plan.adapters[0].weight_name(m): m for m in plan.modules} if plan.adapters else {}
    fan_in_fan_out = bool(plan.adapters) and plan.adapters[0].fan_in_fan_out
    buffers = _Buffers()
    batched = _merge_batched(plan)
    pending: Future | None = None
    for i, (name, dtype, _) in enumerate(tqdm(plan.tensors, desc=f"merge {recipe.method}", unit="tensor",
                                              disable=not progress)):
        base = None
        src = plan.source(name) if plan.input_kind == "model" else None
        base_name = src.base if src is not None else name if plan.base else None
        owner = plan.base_of(src)
        if base_name is not None and (plan.input_kind == "adapter"
                                      or not owner.meta[base_name].dtype.is_floating_point):
            base = owner.read(base_name)
            _check_finite(base, base_name, owner.path, recipe.allow_nonfinite)
        if plan.input_kind == "adapter":
            if name in lora_targets:
                module = lora_targets[name]
                low, dense = (batched.pop(module), None) if module in batched else _merge_module(plan, module)
                delta = low.dense() if low is not None else dense
                delta = delta.T if fan_in_fan_out else delta
                result = base.float() + delta
                stats.add(name, delta, low.rank if low is not None else None)
            else:
                result = base
        elif not plan.models[src.inputs[0]].meta[src.names[0]].dtype.is_floating_point:
            result = base if base is not None else plan.models[src.inputs[0]].read(src.names[0])
        else:
            result = _merge_floats(plan, name, buffers, stats)
        if not recipe.allow_nonfinite and result.is_floating_point() and not _all_finite(result):
            raise InputError(f"tensor '{name}': the merge produced NaN or inf (check the weights and parameters)")
        out = buffers.get(f"out{i % 2}", result.shape, dtype).copy_(result)
        if pending is not None:
            pending.result()
        pending = write_thread.submit(writer.write, name, out)
    if pending is not None:
        pending.result()


def _merge_floats(plan: MergePlan, name: str, buffers: _Buffers, stats: _Stats) -> torch.Tensor:
    """Merge one floating tensor of full checkpoints; the result may live in one of `buffers`."""
    allow = plan.recipe.allow_nonfinite
    src = plan.source(name)
    owner = plan.base_of(src)
    base = _read_float(plan, buffers, owner, src.base, "base") if src.base is not None else None
    if base is not None:
        _check_finite(base, src.base, owner.path, allow)
    raw_base = plan.rule.uses_base == "raw"  # the rule gets the base's raw weight first, then the inputs'
    task_vectors = plan.rule.uses_base is True or (plan.rule.uses_base == "optional" and base is not None)
    inputs = []
    for pos, (i, tensor_name) in enumerate(zip(src.inputs, src.names)):
        m = plan.models[i]
        t = _read_float(plan, buffers, m, tensor_name, f"input{pos}")  # one buffer per position: an input may
        _check_finite(t, tensor_name, m.path, allow)  # appear twice in a slice
        inputs.append(t)
    if plan.vocab is not None and vocab.is_vocab_tensor(name):  # every model's rows over the output vocabulary
        aligned = plan.vocab.align([base] * (base is not None) + inputs, plan.vocab_members(src))
        base, inputs = (aligned[0], aligned[1:]) if base is not None else (None, aligned)
    tensors = [base] if raw_base else []
    for t in inputs:
        tensors.append(t.sub_(base) if task_vectors else t)  # task vectors in place
    merged = _merge_dense(plan, name, tensors)
    del tensors
    if not task_vectors:
        stats.add(name, merged - base if base is not None else None)
        return merged
    stats.add(name, merged)
    return merged.add_(base)


def _read_float(plan: MergePlan, buffers: _Buffers, ckpt: Checkpoint, name: str, role: str) -> torch.Tensor:
    """`name` from `ckpt` as float32, first rounded to the recipe's read_dtype (mergekit's `dtype`) if it sets one."""
    t = buffers.read_float(ckpt, name, role)
    if plan.recipe.read_dtype:
        t.copy_(t.to(dtype_from_name(plan.recipe.read_dtype)))
    return t


def _write_config(plan: MergePlan, source: Path, dest: Path) -> None:
    """config.json from the donor, with the layer count (and per-layer lists) of stacked slices and the dtype of
    the written tensors, when those differ from the donor's."""
    cfg = json.loads(source.read_text())
    if plan.layer_map is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                cfg[key] = len(plan.layer_map)
                break
        for key in PER_LAYER_CONFIG:
            lists = [(plan.models[k].config or {}).get(key) for k in range(len(plan.models))]
            if isinstance(cfg.get(key), list):
                if not all(isinstance(v, list) for v in lists):
                    raise InputError(f"{source}: {key} is per layer, but an input's config.json has none")
                cfg[key] = [lists[k][j] for k, j in plan.layer_map]
    if plan.vocab is not None:
        cfg["vocab_size"] = plan.vocab.size
    if plan.recipe.output.dtype:
        name = str(dtype_from_name(plan.recipe.output.dtype)).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
        for key in keys:
            cfg[key] = name
    dest.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _report(plan: MergePlan, out: Path, tmp: Path, stats: _Stats, hashes: dict[str, str], wall: float) -> dict:
    recipe = plan.recipe

    def files(paths):
        return [{"path": str(p), "sha256": hashes[str(p)], "bytes": Path(p).stat().st_size} for p in paths]

    inputs = []
    if plan.base_used:
        inputs.append({"role": "base", "path": str(recipe.base), "files": files(plan.base.files)})
    elif plan.base:
        inputs.append({"role": "base", "path": str(recipe.base), "files": [], "note": "not read: LoRA -> LoRA"})
    sources = plan.models or plan.adapters
    for spec, src in zip(recipe.inputs, sources):
        inputs.append({"role": "input", "path": str(spec.path), "kind": plan.input_kind,
                       "weight": spec.model_dump(mode="json")["weight"], "files": files(src.files)})
    out_files = sorted(p.name for p in tmp.iterdir())
    return {
        "schema": "malleable.merge.report/1",
        "method": recipe.method,
        "parameters": recipe.model_dump(mode="json")["parameters"],
        "seed": recipe.seed,
        "inputs": inputs,
        "output": {"path": str(out), "kind": plan.output_kind, "files": out_files, "rank": plan.rank,
                   "dtype": recipe.output.dtype},
        "tensors": stats.rows,
        "wall_time_s": round(wall, 3),
        "peak_rss_mb": peak_rss_mb(),
        "environment": environment(),
    }


def _markdown(r: dict) -> str:
    lines = [f"# Merge report: {r['method']}", "",
             f"- output: `{r['output']['path']}` ({r['output']['kind']})",
             f"- parameters: `{r['parameters']}`, seed {r['seed']}",
             f"- wall time: {r['wall_time_s']} s, peak RSS: {r['peak_rss_mb']} MB",
             f"- tensors merged: {len(r['tensors'])}", "", "| role | path | sha256 |", "|---|---|---|"]
    for i in r["inputs"]:
        for f in i["files"]:
            lines.append(f"| {i['role']} | `{f['path']}` | `{f['sha256'][:16]}…` |")
    norms = [t for t in r["tensors"] if "delta_norm" in t]
    if norms:
        lines += ["", "Largest merged deltas (Frobenius norm):", "", "| tensor | norm | rank |", "|---|---|---|"]
        for t in sorted(norms, key=lambda t: -t["delta_norm"])[:10]:
            lines.append(f"| `{t['name']}` | {t['delta_norm']:.4g} | {t.get('rank', '')} |")
    return "\n".join(lines) + "\n"


def describe(plan: MergePlan) -> str:
    """The `--dry-run` text: what would be read, computed and written."""
    r = plan.recipe
    inner = _inner_name(r, plan.rule)
    random = plan.rule.random or (inner is not None and get_rule(inner).random)
    lines = [f"method: {r.method} ({plan.rule.space}-space{', random, seed ' + str(r.seed) if random else ''})"]
    if plan.base:
        lines.append(f"base:   {plan.base.path} ({len(plan.base.meta)} tensors, {plan.base.nbytes / 1e6:.1f} MB)")
    for spec, src in zip(r.inputs, plan.models or plan.adapters):
        desc = (f"{len(src.meta)} tensors, {src.nbytes / 1e6:.1f} MB" if isinstance(src, Checkpoint)
                else f"LoRA, {len(src.deltas)} modules, ranks {sorted({d.rank for d in src.deltas.values()})}")
        own = f", {spec.model_dump(mode='json')['parameters']}" if spec.parameters else ""
        lines.append(f"input:  {spec.path} (weight {spec.weight}{own}; {desc})")
    lines.append(f"parameters: {r.model_dump(mode='json')['parameters'] or 'defaults'}")
    if r.data is not None:
        lines.append(f"data: train {r.data.train}" + (f", validation {r.data.validation}" if r.data.validation else ""))
    if plan.layer_map is not None:
        for n, sl in enumerate(r.slices):
            srcs = ", ".join(f"inputs.{s.input} layers {list(s.layers)}" for s in sl.all_sources())
            owner = "base" if sl.base_input is None else f"inputs.{sl.base_input}"
            base = f", {owner} layers {list(sl.base_layers)} as the base" if sl.base_layers else ""
            lines.append(f"slice {n}: {srcs}{base}")
        lines.append(f"layers: {len(plan.layer_map)} in the output")
    if plan.vocab is not None:
        lines.append(f"vocabulary: {plan.vocab.n_tokens} tokens (tokenizer source {r.tokenizer.source}), "
                     f"{plan.vocab.size} embedding rows")
    lines.append(f"output: {plan.output_kind}, {len(plan.tensors)} tensors"
                 + (f", rank {plan.rank}" if plan.rank else "")
                 + (f", dtype {r.output.dtype}" if r.output.dtype else ""))
    if plan.output_kind == "model":
        shards = len(split_shards(plan.tensors, parse_size(r.output.max_shard_size)))
        lines.append(f"shards: {shards} (max {r.output.max_shard_size})")
    lines.append(f"estimated peak working memory: {plan.peak_estimate_bytes / 1e6:.1f} MB (plus the Python process)")
    if plan.rule.describe is not None:
        lines += plan.rule.describe(plan)
    return "\n".join(lines)
