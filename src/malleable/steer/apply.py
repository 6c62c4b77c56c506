"""Applying an artefact three ways that give the same logits: forward hooks at inference, a bias baked into a
plain transformers checkpoint, and a llama.cpp control-vector GGUF.

Each artefact form (steering.json `form`) has its applier in FORMS: the hooks it installs for `applied()` and
the weights it changes for `bake()`. The vector form is here; SPLIT's LoRA and local weight forms add their
entries from their own files (split_lora.py, split_weight.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from malleable.errors import InputError, RecipeError
from malleable.io.atomic import check_output_file
from malleable.steer.artefact import Artefact, check_compatible, load_artefact


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers (Llama-style `model.layers`, GPT-2's `transformer.h`, GPT-NeoX's `layers`);
    a PEFT wrapper is looked through."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise InputError(f"{type(inner).__name__}: cannot find its decoder layers (model.layers / transformer.h)")


def check_strength(strength: float, key: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise RecipeError(f"{key}: {strength!r} is not a finite number")
    return float(strength)


class _Positions:
    """Which positions of the current forward are text (not padding), and each one's index in its text, from the
    attention mask the model was called with (it covers the cached tokens too during generation)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.past = 0

    def capture(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("past_key_values")
        self.past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0

    def at(self, h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(text mask (batch, seq, 1) in h's dtype or None when all is text, index in the text (batch, seq))."""
        seq = h.shape[1]
        if self.mask is None:
            index = torch.arange(self.past, self.past + seq, device=h.device).expand(h.shape[0], seq)
            return None, index
        mask = self.mask.to(h.device)
        index = (mask.long().cumsum(1) - 1)[:, -seq:]
        return mask[:, -seq:, None].to(h.dtype), index


def _vector_hooks(model, artefact: Artefact, strength: float, where: _Positions) -> list:
    """The vector form: add `strength * vector` to a decoder layer's output at every text position (a (hidden,)
    vector), or row i at text position i for the first positions (ActAdd's (positions, hidden))."""
    layers = decoder_layers(model)
    handles = []
    for i, v in artefact.vectors.items():
        def hook(module, args, output, v=v):
            h = output[0] if isinstance(output, tuple) else output
            add = (strength * v).to(device=h.device, dtype=h.dtype)
            mask, index = where.at(h)
            if add.dim() == 1:
                delta = add if mask is None else add * mask
            else:  # (positions, hidden): text position i < positions gets row i
                inside = index < add.shape[0]
                rows = add[index.clamp(0, add.shape[0] - 1)]
                keep = inside[..., None].to(h.dtype) * (mask if mask is not None else 1)
                delta = rows * keep
            h = h + delta
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(layers[i].register_forward_hook(hook))
    return handles


def _vector_bake(model, artefact: Artefact, strength: float) -> None:
    """The vector form baked: a constant addition to a layer's output is a bias on its MLP's output projection.
    Llama-style configs carry `mlp_bias` (one switch for gate, up and down projections of every layer), which
    plain `from_pretrained` honours with no custom code: every MLP gets zero biases, the steered layers' down
    projection gets `strength * vector`."""
    if not hasattr(model.config, "mlp_bias"):
        raise InputError(f"{artefact.where()}: baking needs a model whose config has `mlp_bias` (the Llama family; "
                         f"{model.config.model_type} has none); apply it with hooks or export a GGUF instead")
    if any(v.dim() != 1 for v in artefact.vectors.values()):
        raise InputError(f"{artefact.where()}: a vector added over the first positions only (ActAdd) is not a "
                         "constant bias and cannot be baked; apply it with hooks")
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name, None)
            if not isinstance(lin, torch.nn.Linear):
                raise InputError(f"{type(mlp).__name__}: no {name} linear layer to carry the bias")
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                          device=lin.weight.device), requires_grad=False)
        if i in artefact.vectors:
            with torch.no_grad():
                bias = mlp.down_proj.bias
                bias.add_((strength * artefact.vectors[i].to(torch.float64)).to(bias.dtype))
    model.config.mlp_bias = True


# form -> (install hooks for `applied`, change weights for `bake`)
FORMS: dict[str, tuple[Callable, Callable]] = {"vector": (_vector_hooks, _vector_bake)}


def _form(artefact: Artefact) -> tuple[Callable, Callable]:
    if artefact.form not in FORMS:
        raise InputError(f"{artefact.where()}: form '{artefact.form}' is not known here (known: {sorted(FORMS)})")
    return FORMS[artefact.form]


def as_artefact(artefact: Artefact | str | Path) -> Artefact:
    return artefact if isinstance(artefact, Artefact) else load_artefact(artefact)


@contextlib.contextmanager
def applied(model, artefact: Artefact | str | Path, strength: float | None = None) -> Iterator[object]:
    """Steer `model` inside the block: `with applied(model, "out/", strength=4): model.generate(...)`.

    `strength` multiplies the artefact's vectors (default: its default_strength); 0 installs nothing, so the
    model is the unsteered one bit for bit. Padding on either side is left alone (the attention mask tells text
    from padding); a position's index in its text, for ActAdd's first positions, counts text tokens only."""
    artefact = as_artefact(artefact)
    strength = check_strength(artefact.default_strength if strength is None else strength)
    check_compatible(artefact, model)
    hooks, _ = _form(artefact)
    if strength == 0:
        yield model
        return
    where = _Positions()
    handles = [model.register_forward_pre_hook(where.capture, with_kwargs=True)]
    try:
        handles += hooks(model, artefact, strength, where)
        yield model
    finally:
        for h in handles:
            h.remove()


def bake_model(model, artefact: Artefact | str | Path, strength: float | None = None):
    """`model` with the artefact folded into its weights, in place (see the form's baker)."""
    bake_in_place(model, as_artefact(artefact), strength)
    return model


def bake_in_place(model, artefact: Artefact, strength: float | None) -> str:
    """Bake in place; returns where the change went (the form's baker says, or the default words)."""
    strength = check_strength(artefact.default_strength if strength is None else strength)
    check_compatible(artefact, model)
    _, baker = _form(artefact)
    return baker(model, artefact, strength) or (
        "a bias on each steered layer's mlp.down_proj (config mlp_bias: true; the other MLP biases are zero)"
        if artefact.form == "vector" else f"the {artefact.form} intervention folded into each steered layer's "
        "mlp.down_proj weight (its bias, if any, as mlp_bias)")


def load_base(model_dir: str | Path, allow_pickle: bool = False, dtype="auto"):
    """(the checkpoint folder, its causal LM) for baking or exporting into; a PEFT adapter is refused."""
    from transformers import AutoModelForCausalLM

    from malleable.io.quiet import quiet_transformers
    from malleable.models.checkpoints import Trust, check_model_folder

    base, adapter = check_model_folder(Path(model_dir), Trust(pickle=allow_pickle))
    if adapter:
        raise InputError(f"{model_dir}: a PEFT adapter; give the full checkpoint it was trained on (merge the "
                         "adapter first)")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True,
                                                         use_safetensors=None if allow_pickle else True)
    except Exception as e:  # an unknown architecture, a damaged file
        raise InputError(f"{base}: cannot load the model ({type(e).__name__})") from None
    return base, model


def bake(artefact: Artefact | str | Path, model_dir: str | Path, out: str | Path, strength: float | None = None,
         force: bool = False, allow_pickle: bool = False) -> Path:
    """Write `out`: the checkpoint at `model_dir` with the artefact baked in at `strength`, a plain transformers
    checkpoint (safetensors, with its tokenizer) that loads with `from_pretrained` and no custom code."""
    from malleable.io.atomic import atomic_dir, check_output
    from malleable.models.checkpoints import load_tokenizer
    from malleable.report import write_report

    artefact = as_artefact(artefact)
    inputs = [model_dir] + ([artefact.path] if artefact.path is not None else [])
    check_output(out, force, inputs=inputs)
    strength = check_strength(artefact.default_strength if strength is None else strength)
    base, model = load_base(model_dir, allow_pickle)
    how = bake_in_place(model, artefact, strength)
    tokenizer = load_tokenizer(base) if (base / "tokenizer_config.json").is_file() else None
    report = {"schema": "malleable.steer.bake/1", "artefact": artefact.where(), "model": str(model_dir),
              "strength": strength, "layers": sorted(artefact.vectors), "method": artefact.config["method"],
              "how": how}
    with atomic_dir(out, force, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report, f"# steering baked\n\n{artefact.config['method']} at strength {strength} on "
                                  f"layers {sorted(artefact.vectors)} of {model_dir}: {how}.\n")
    return Path(out)


def export_gguf(artefact: Artefact | str | Path, out: str | Path, strength: float | None = None,
                force: bool = False) -> Path:
    """Write a llama.cpp control vector (`--control-vector FILE`) as repeng's ControlVector.export_gguf writes
    it: architecture "controlvector", `controlvector.model_hint` (the model_type), `controlvector.layer_count`,
    and one float32 tensor `direction.<layer>` per layer, here already times `strength` (default: the
    artefact's default strength; llama.cpp's `--control-vector-scaled FILE S` scales it further). llama.cpp adds
    direction.<i> to the output of its layer i and has no slot for layer 0, so layer 0 is refused."""
    import gguf

    artefact = as_artefact(artefact)
    strength = check_strength(artefact.default_strength if strength is None else strength)
    out = check_output_file(out, force, [artefact.path] if artefact.path is not None else [])
    if artefact.form != "vector":
        raise InputError(f"{artefact.where()}: a {artefact.form}-form intervention is not a control vector (only "
                         "vectors export to llama.cpp; bake it into a checkpoint instead)")
    if 0 in artefact.vectors:
        raise InputError(f"{artefact.where()}: steers layer 0, which a llama.cpp control vector cannot hold")
    if any(v.dim() != 1 for v in artefact.vectors.values()):
        raise InputError(f"{artefact.where()}: a vector over the first positions only (ActAdd) is not a "
                         "control vector")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", artefact.config["model"]["model_type"])
        writer.add_uint32("controlvector.layer_count", len(artefact.vectors))
        for i, v in sorted(artefact.vectors.items()):
            writer.add_tensor(f"direction.{i}", (strength * v.to(torch.float64)).to(torch.float32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
