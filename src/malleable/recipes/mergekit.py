"""Read a mergekit YAML (the `models:` form, or `slices:`: layer ranges stacked into a deeper or shallower model,
one source per slice as in passthrough frankenmerges, or several models merged over equally long ranges per
slice) as a malleable merge recipe, with mergekit 0.1.5's semantics.

`dtype` is the precision inputs are read in (we round to it, then compute in float32; mergekit computes most
methods in it), `out_dtype` (else `dtype`) the written one, also recorded in config.json. `chat_template` (a
built-in name, `auto` or a Jinja string) is written as mergekit writes it. `tokenizer_source` and the
`tokenizer:` block (source, per-token `tokens:`, `pad_to_multiple_of`) become our `tokenizer` section
(`malleable.merge.vocab`: mergekit's vocabulary merging), with `models:` and with `slices:` alike.
Several `---`-separated documents are mergekit-multi (`read_documents`, run by `malleable.merge.multi`): named
merges go to a temporary folder and serve as models for the others; the unnamed one is the output.

mergekit's defaults differ per method (ties normalises by the agreeing weights, dare_ties does not; both
elect signs from the weighted task vectors), so each method maps to our rule with those defaults made
explicit. Options that change nothing numerically (`int8_mask`, `density` for task_arithmetic) are dropped.
One known difference: mergekit's DARE rescales kept entries to the input's L1 norm, ours by 1/density
(the paper's); DARE masks are random in both tools, so their outputs never match bit for bit anyway.
breadcrumbs and della rescale as mergekit does (L1). della's draws are random in both tools (different RNG
streams); everything else matches (bench/mergekit_parity.py). Where mergekit accepts values we refuse: slerp's
`t` outside [0, 1], nearswap's negative `t`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from malleable.errors import RecipeError
from malleable.recipes.common import Strict, read_yaml, validate
from malleable.recipes.param_spec import ParamSpec

# mergekit method -> (our rule, our defaults that reproduce mergekit's, mergekit parameters to drop)
METHODS: dict[str, tuple[str, dict[str, Any], set[str]]] = {
    "linear": ("linear", {"normalize": True}, set()),
    "task_arithmetic": ("task_arithmetic", {"normalize": False}, {"int8_mask", "density", "rescale"}),
    "ties": ("ties", {"normalize": "weights", "weighted_election": True}, {"int8_mask"}),
    "dare_ties": ("dare_ties", {"normalize": "none", "weighted_election": True}, {"int8_mask"}),
    "dare_linear": ("dare_linear", {"normalize": False}, {"int8_mask"}),
    "slerp": ("slerp", {}, set()),
    "nearswap": ("nearswap", {}, set()),
    "model_stock": ("model_stock", {"filter_wise": False}, set()),
    "breadcrumbs": ("breadcrumbs", {"normalize": False, "rescale": False}, {"int8_mask"}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"normalize": "none", "rescale": False}, {"int8_mask"}),
    "della": ("della", {"normalize": "weights", "rescale": True}, {"int8_mask"}),
    "della_linear": ("della_linear", {"normalize": False, "rescale": True}, {"int8_mask"}),
    "sce": ("sce", {"select_topk": 1.0}, {"int8_mask"}),
    "nuslerp": ("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, set()),
    "multislerp": ("multislerp", {"normalize_weights": True}, set()),
    "karcher": ("karcher", {"max_iter": 10, "tol": 1e-5}, set()),
    "arcee_fusion": ("arcee_fusion", {}, set()),
    "passthrough": ("passthrough", {}, set()),
    "ram": ("ram", {}, set()),
    "ramplus_tl": ("ramplus_tl", {}, set()),
}
# rules with no base: mergekit's base_model is one more input
BASE_AS_INPUT = {"linear", "karcher", "passthrough"}
# rules whose mergekit `normalize: true/false` is our "weights"/"none" (TIES' disjoint merge)
DISJOINT = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
# rules that take mergekit's `rescale` (the others refuse rescale: true)
RESCALABLE = {"dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
PER_INPUT = {"weight", "density", "gamma", "epsilon", "scale"}
Params = dict[str, ParamSpec]


class Model(Strict):
    model: str
    parameters: Params = Field(default_factory=dict)


class Source(Model):
    layer_range: list[int] | None = None


class Slice(Strict):
    sources: list[Source] = Field(min_length=1)
    parameters: Params = Field(default_factory=dict)
    base_model: str | None = None  # this slice's base (stacked slices): one of its sources
    residual_weight: float | None = None  # refused: mergekit 0.1.5 declares it and never reads it


class Mergekit(Strict):
    """mergekit's config keys and their types, checked before translating: a wrong type is one line naming
    the key, as in our own recipes."""

    merge_method: str
    models: list[Model] | None = None
    slices: list[Slice] | None = Field(default=None, min_length=1)
    base_model: str | None = None
    parameters: Params = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # base, union or a model: our `tokenizer.source`
    tokenizer: Any = None  # source, tokens, pad_to_multiple_of: our `tokenizer` section
    chat_template: str | None = None
    name: str | None = None


def _normalize(rule: str, value: Any) -> Any:
    """mergekit's boolean `normalize` as our rule's value."""
    if rule in DISJOINT and isinstance(value, bool):
        return "weights" if value else "none"
    return value


def _translate(rule: str, params: dict, drop: set[str], where: str) -> dict:
    out = {}
    for key, value in (params or {}).items():
        if key in drop:
            continue
        if key == "rescale" and rule in RESCALABLE:
            out["rescale"] = value
        elif key == "rescale":
            if value:
                raise RecipeError(f"{where}.rescale: mergekit's rescale for '{rule}' is not supported")
        elif key == "lambda":
            out["scale"] = value
        elif key == "normalize":
            out["normalize"] = _normalize(rule, value)
        else:
            out[key] = value
    return out


def _num_layers(model: str, source: str) -> int | None:
    """num_hidden_layers from the model's config.json (a relative path is tried from the recipe's folder)."""
    path = Path(model)
    if not path.is_absolute() and (Path(source).parent / path).exists():
        path = Path(source).parent / path
    try:
        return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _slices_as_models(data: dict, source: str) -> dict:
    """The `slices:` form that is the `models:` form in disguise: one slice whose sources all take every layer
    (layer_range [0, num_hidden_layers]). The slice's `parameters` rank between the models' own and the
    top-level ones, as in mergekit. Anything else (stacking or mixing layer ranges) is refused."""
    if "models" in data:
        raise RecipeError(f"{source}: slices: give either `models:` or `slices:`, not both")
    slices = data["slices"]
    if len(slices) != 1:
        raise RecipeError(f"{source}: slices: only one slice taking every layer of every model is supported "
                          "(stacking or mixing layer ranges is not); use `models:`")
    models = []
    for i, src in enumerate(slices[0]["sources"]):
        where = f"{source}: slices.0.sources.{i}"
        layers = _num_layers(src["model"], source)
        if layers is None:
            raise RecipeError(f"{where}.layer_range: cannot read num_hidden_layers from {src['model']}/config.json "
                              "to check that the slice takes every layer")
        if src.get("layer_range") != [0, layers]:
            raise RecipeError(f"{where}.layer_range: {src.get('layer_range')} is not every layer ([0, {layers}]); "
                              "only slices equivalent to `models:` are supported")
        models.append({k: v for k, v in src.items() if k != "layer_range"})
    top, own = dict(data.get("parameters") or {}), dict(slices[0].get("parameters") or {})
    for key in set(top) & set(own):
        if isinstance(own[key], list) and any(isinstance(v, dict) for v in own[key]):
            raise RecipeError(f"{source}: slices.0.parameters.{key}: filtered values that fall back to the "
                              "top-level parameters are not supported; set the key in one place")
    rest = {k: v for k, v in data.items() if k != "slices"}
    if slices[0].get("base_model") is not None:  # the one slice's base is the merge's base
        rest["base_model"] = slices[0]["base_model"]
    return {**rest, "models": models, "parameters": {**top, **own}}


def _is_models(data: dict, source: str) -> bool:
    """Whether `slices:` is the `models:` form in disguise: one slice whose sources all take every layer."""
    slices = data["slices"]
    return len(slices) == 1 and all(
        src.get("layer_range") == [0, _num_layers(src["model"], source)] for src in slices[0]["sources"])


def _per_input(rule: str, params: dict, drop: set[str], where: str) -> dict:
    per = _translate(rule, params, drop, where)
    extra = sorted(set(per) - PER_INPUT)
    if extra:
        raise RecipeError(f"{where}.{extra[0]}: not a per-model parameter")
    return per


def _stacked_slices(data: dict, source: str, rule: str, drop: set[str]) -> dict:
    """Slices that stack layer ranges (frankenmerges, or merges over layer ranges): the inputs are the distinct
    models in order of first use (the base apart, for rules that take it separately: its range is the slice's
    base_layers). A source's parameters rank above its slice's, and those above the top-level ones, as in
    mergekit."""
    if "models" in data:
        raise RecipeError(f"{source}: slices: give either `models:` or `slices:`, not both")
    base = data.get("base_model")
    paths: list[str] = []
    slices = []
    top = dict(data.get("parameters") or {})
    for n, sl in enumerate(data["slices"]):
        where = f"{source}: slices.{n}"
        own = dict(sl.get("parameters") or {})
        for i, src in enumerate(sl["sources"]):
            if src.get("layer_range") is None:
                raise RecipeError(f"{where}.sources.{i}.layer_range: required when slices stack layers")
            if len(src["layer_range"]) != 2:
                raise RecipeError(f"{where}.sources.{i}.layer_range: expected [start, end], got "
                                  f"{src['layer_range']}")
        if len(sl["sources"]) == 1:  # one source: its parameters and the slice's are the slice's
            src = sl["sources"][0]
            own = {**own, **dict(src.get("parameters") or {})}
        for key in set(top) & set(own):
            if isinstance(own[key], list) and any(isinstance(v, dict) for v in own[key]):
                raise RecipeError(f"{where}.parameters.{key}: filtered values that fall back to the top-level "
                                  "parameters are not supported; set the key in one place")
        spec: dict[str, Any] = {}
        params = _translate(rule, own, drop, f"slices.{n}.parameters")
        if len(sl["sources"]) == 1:
            if src["model"] not in paths:
                paths.append(src["model"])
            spec = {"input": paths.index(src["model"]), "layers": src["layer_range"]}
            if "weight" in params:  # an input's weight, not a parameter of the rule
                spec = {"sources": [{**spec, "weight": params.pop("weight")}]}
        else:
            weight = params.pop("weight", None)
            spec["sources"] = []
            own_base = sl.get("base_model")  # mergekit: a slice's base_model replaces the top-level one there
            slice_base = own_base or base
            if own_base is not None and rule not in BASE_AS_INPUT and all(
                    src["model"] != own_base for src in sl["sources"]):
                raise RecipeError(f"{where}.base_model: {own_base} is not one of the slice's sources (its layer "
                                  "range is the base's)")
            for i, src in enumerate(sl["sources"]):
                if slice_base is not None and src["model"] == slice_base and rule not in BASE_AS_INPUT:
                    spec["base_layers"] = src["layer_range"]  # the base contributes no task vector
                    if slice_base != base:  # read from that model, one more input
                        if slice_base not in paths:
                            paths.append(slice_base)
                        spec["base_input"] = paths.index(slice_base)
                    continue
                if src["model"] not in paths:
                    paths.append(src["model"])
                per = _per_input(rule, dict(src.get("parameters") or {}), drop, f"{where}.sources.{i}.parameters")
                w = per.pop("weight", weight)
                spec["sources"].append({"input": paths.index(src["model"]), "layers": src["layer_range"],
                                        "parameters": per, **({"weight": w} if w is not None else {})})
        slices.append({**spec, "parameters": params})
    rest = {k: v for k, v in data.items() if k != "slices"}
    return {**rest, "models": [{"model": p} for p in paths], "slice_specs": slices}


def from_mergekit(data: dict, source: str) -> dict:
    """Translate a mergekit config dict into a malleable recipe dict (validated afterwards as usual)."""
    data = validate(Mergekit, data, source).model_dump(exclude_unset=True)
    for n, sl in enumerate(data.get("slices") or []):
        if sl.get("residual_weight") is not None:
            raise RecipeError(f"{source}: slices.{n}.residual_weight: not supported (mergekit 0.1.5 accepts it and "
                              "never uses it); remove it")
    tokenizer = _tokenizer(data, source)
    method = data["merge_method"]
    if method not in METHODS:
        raise RecipeError(f"{source}: merge_method: mergekit method '{method}' is not available in malleable "
                          f"(mergekit methods it reads: {', '.join(METHODS)}; `malleable methods` lists its own)")
    rule, defaults, drop = METHODS[method]
    if "slices" in data:
        data = (_slices_as_models(data, source) if _is_models(data, source)
                else _stacked_slices(data, source, rule, drop))
    base = data.get("base_model")
    top = _translate(rule, dict(data.get("parameters") or {}), drop, "parameters")
    shared_weight = top.pop("weight", None)
    inputs = []
    entries = list(data.get("models") or [])
    stacked = "slice_specs" in data
    if base is not None and rule in BASE_AS_INPUT and not stacked and all(e.get("model") != base for e in entries):
        entries.append({"model": base})  # mergekit: linear and karcher treat base_model as one more input
    for i, entry in enumerate(entries):
        if rule not in BASE_AS_INPUT and entry["model"] == base and not stacked:
            continue  # mergekit: the base contributes no task vector
        per = _per_input(rule, dict(entry.get("parameters") or {}), drop, f"{source}: models.{i}.parameters")
        weight = per.pop("weight", shared_weight)
        spec: dict[str, Any] = {"path": entry["model"], "parameters": per}
        if weight is not None:
            spec["weight"] = weight
        inputs.append(spec)
    recipe: dict[str, Any] = {"method": rule, "inputs": inputs, "parameters": {**defaults, **top}}
    if base is not None and (rule not in BASE_AS_INPUT or stacked):
        recipe["base"] = base  # with stacked slices: only config.json and the tokenizer come from it
    if stacked:
        recipe["slices"] = data["slice_specs"]
    # mergekit: tensors are read (and merged) in `dtype` and written in `out_dtype`, else in `dtype`
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype:
        recipe["output"] = {"dtype": out_dtype}
    if data.get("dtype"):
        recipe["read_dtype"] = data["dtype"]
    if data.get("chat_template") is not None:
        recipe["chat_template"] = data["chat_template"]
    if tokenizer is not None:
        recipe["tokenizer"] = {**tokenizer, **({"base": base} if base is not None else {})}
    return recipe


def _tokenizer(data: dict, source: str) -> dict | None:
    """mergekit's `tokenizer_source` or `tokenizer:` block as our `tokenizer` section (mergekit reads
    `tokenizer:` when both are given, its source defaulting to union). A token's source that is a string names
    a model."""
    block = data.get("tokenizer")
    if block is None:
        src = data.get("tokenizer_source")
        return None if src is None else {"source": src}
    if not isinstance(block, dict):
        raise RecipeError(f"{source}: tokenizer: expected a mapping (source, tokens, pad_to_multiple_of)")
    extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    if extra:
        raise RecipeError(f"{source}: tokenizer.{extra[0]}: not a mergekit tokenizer key (source, tokens, "
                          "pad_to_multiple_of)")
    out = {k: v for k, v in block.items() if v is not None}
    out.setdefault("source", "union")
    return out


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _map_tokenizer_models(doc: dict, fn) -> dict:
    """`doc` with `fn` applied to every model its tokenizer settings name: `tokenizer_source` and
    `tokenizer.source` (other than base / union), and each `tokenizer.tokens` entry's source (a model name, or
    a `model_token` mapping's `model`)."""
    def ref(v):
        return fn(v) if isinstance(v, str) and v not in ("base", "union") else v

    doc = dict(doc)
    if "tokenizer_source" in doc:
        doc["tokenizer_source"] = ref(doc["tokenizer_source"])
    block = doc.get("tokenizer")
    if isinstance(block, dict):
        block = dict(block)
        if "source" in block:
            block["source"] = ref(block["source"])
        if isinstance(block.get("tokens"), dict):
            tokens = {}
            for t, spec in block["tokens"].items():
                if isinstance(spec, dict) and isinstance(spec.get("source"), str):
                    spec = {**spec, "source": fn(spec["source"])}
                elif isinstance(spec, dict) and isinstance(spec.get("source"), dict) and "model" in spec["source"]:
                    spec = {**spec, "source": {**spec["source"], "model": ref(spec["source"]["model"])}}
                tokens[t] = spec
            block["tokens"] = tokens
        doc["tokenizer"] = block
    return doc


def _references(doc: dict) -> list[str]:
    """Every model a mergekit document names: base_model, models[].model, slices[].sources[].model, and the
    models its tokenizer settings take tokens from."""
    refs = [doc.get("base_model")]
    refs += [m.get("model") for m in doc.get("models") or [] if isinstance(m, dict)]
    for sl in doc.get("slices") or []:
        if isinstance(sl, dict):
            refs += [s.get("model") for s in sl.get("sources") or [] if isinstance(s, dict)]
    _map_tokenizer_models(doc, lambda v: refs.append(v) or v)
    return [r for r in refs if isinstance(r, str)]


def substitute(doc: dict, paths: dict[str, str]) -> dict:
    """`doc` with the names of other documents' merges replaced by their output folders."""
    def sub(v):
        return paths.get(v, v) if isinstance(v, str) else v

    doc = _map_tokenizer_models(doc, sub)
    if "base_model" in doc:
        doc["base_model"] = sub(doc["base_model"])
    if isinstance(doc.get("models"), list):
        doc["models"] = [{**m, "model": sub(m.get("model"))} if isinstance(m, dict) else m for m in doc["models"]]
    if isinstance(doc.get("slices"), list):
        doc["slices"] = [{**sl, "sources": [{**s, "model": sub(s.get("model"))} if isinstance(s, dict) else s
                                            for s in sl.get("sources") or []]}
                         if isinstance(sl, dict) else sl for sl in doc["slices"]]
    return doc


def read_documents(path: str | Path) -> list[tuple[str | None, dict, set[str]]] | None:
    """A mergekit-multi file as (name, document, names it uses) in an order where each merge comes after the
    merges it uses, the unnamed output last; None for a file of one document. Checked before any work: every
    document a mergekit merge, one without a name, names unique and usable as folder names, no cycles, every
    named merge used."""
    path = Path(path)
    docs = [d for d in read_yaml(path, documents=True) if d is not None]
    if len(docs) <= 1:
        return None
    names: dict[str, int] = {}
    for i, d in enumerate(docs):
        where = f"{path}: document {i + 1}"
        if not isinstance(d, dict) or "merge_method" not in d:
            raise RecipeError(f"{where}: a file of several documents is read as mergekit-multi, and each must be a "
                              "mergekit merge (merge_method: ...)")
        name = d.get("name")
        if name is None:
            continue
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
            raise RecipeError(f"{where}: name: {name!r:.60} is not a usable merge name (letters, digits, . _ -)")
        if name in names:
            raise RecipeError(f"{where}: name: '{name}' is also the name of document {names[name] + 1}")
        names[name] = i
    unnamed = [i for i, d in enumerate(docs) if d.get("name") is None]
    if len(unnamed) != 1:
        raise RecipeError(f"{path}: exactly one document must have no `name:` (the merge written to the output); "
                          f"{len(unnamed)} have none")
    uses = [set(_references(d)) & set(names) for d in docs]
    for i, d in enumerate(docs):
        if d.get("name") in uses[i]:
            raise RecipeError(f"{path}: document {i + 1}: merge '{d['name']}' uses itself")
    used = set().union(*uses)
    for name, i in names.items():
        if name not in used:
            raise RecipeError(f"{path}: document {i + 1}: merge '{name}' is used by no other document")
    order, done = [], set()
    while len(order) < len(docs):
        ready = [i for i in range(len(docs)) if i not in order and uses[i] <= done and i != unnamed[0]]
        if not ready:
            if uses[unnamed[0]] <= done and len(order) == len(docs) - 1:
                ready = unnamed
            else:
                raise RecipeError(f"{path}: the documents use each other in a cycle")
        order.append(ready[0])
        done.add(docs[ready[0]].get("name"))
    return [(docs[i].get("name"), docs[i], uses[i]) for i in order]
