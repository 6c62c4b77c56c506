"""Inference-Time Intervention (Li et al. 2023, likenneth/honest_llama): shift a few attention heads' outputs along
a direction that tells the positives from the negatives."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from malleable.errors import InputError, RecipeError
from malleable.params import Param
from malleable.steer.apply import FORMS, decoder_layers
from malleable.steer.registry import SteeringMethod, steering_method

MODULE = "self_attn.o_proj"


def head_count(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_attention_heads)


def o_proj(model, layer: int, where: str = "parameters") -> torch.nn.Linear:
    """Decoder layer `layer`'s attention output projection, whose input is the heads' outputs side by side."""
    lin = getattr(getattr(decoder_layers(model)[layer], "self_attn", None), "o_proj", None)
    if not isinstance(lin, torch.nn.Linear) or lin.in_features % head_count(model):
        raise InputError(f"{where}: decoder layer {layer} has no {MODULE} linear layer whose input splits into "
                         f"{head_count(model)} heads; ITI needs one")
    return lin


@steering_method("iti", read="last", params={
    "heads": Param(24, "K: the attention heads to shift, the top-K by their probe's validation accuracy", gt=0),
    "alpha": Param(4.0, "alpha: the default strength, in standard deviations of the activations along each "
                   "head's direction (0: the unsteered model)", ge=0),
    "val_ratio": Param(0.2, "share of the training pairs held out to rank the heads' probes", gt=0, le=0.9),
    "direction": Param("mass_mean", "mass_mean: positives' mean minus negatives' mean (the authors' "
                       "--use_center_of_mass); probe: the head's probe weights", choices=("mass_mean", "probe")),
    "C": Param(1.0, "the probes' inverse L2 regularisation (scikit-learn's default, as the authors)", gt=0),
    "max_iter": Param(1000, "the probes' solver iterations (the authors' 1000)", ge=1),
})
class ITI(SteeringMethod):
    """A logistic probe per attention head on the head's output (its slice of o_proj's input) at the last token,
    the top-K heads by validation accuracy, each shifted by alpha * std * direction at every position.

    As honest_llama (utils.py train_probes / get_top_heads / get_com_directions / get_interventions_dict,
    validation/validate_2fold.py): the training pairs are split at random (seed) into probe training and
    validation (val_ratio 0.2); a `LogisticRegression(random_state=seed, max_iter=1000)` per (layer, head) on the
    raw head activations, labels 1 (positive) / 0 (negative), ranked by validation accuracy
    (`np.argsort(acc)[::-1][:K]`: among equal accuracies the later head, here with a stable sort); the direction
    is the mass-mean difference over train + validation pairs, normalised; its scale is the standard deviation
    of the activations (positives and negatives) projected on it (`np.std`, ddof 0); the head's slice of
    o_proj's input gets alpha * std * direction. The artefact holds std * direction per steered layer
    (`layers.<i>.offset`, o_proj's input width, zero outside the chosen heads) and the default strength alpha.

    K and alpha for small models: the authors use K = 48 of 1024 heads (4.7%) and alpha 15 on 7B LLaMAs. On
    SmolLM2-135M-Instruct (270 heads) and the sentiment pairs (bench/results/steer_iti_k_alpha.md, 3 seeds, 20
    held-out pairs each), alpha 15 costs 12 to 95 nats of UtilOdds for K = 6..48, and K = 24 at alpha 4 moves the
    mean PrefOdds by +6.3 [2.3, 10.4] for -5.2 [-14.6, 4.2] nats (K = 48 at alpha 4: +8.6 for -10.7; K = 12:
    +3.2 for -2.4), so the defaults are K = 24 (9% of the heads) and alpha 4 (chosen on seed 0). One concept:
    set both for your model and data (`--strengths` sweeps alpha).

    Ours differs: (1) the shift goes to every text position (as the authors' baked models, whose o_proj bias
    adds it everywhere); their pyvene intervener adds it to the last position of each forward pass only (the
    prompt's last token, then each generated one). (2) The std is taken over the training pairs' own
    activations; the authors take it over a separate "tuning" set (TruthfulQA questions with generated
    answers), which a contrast-pair recipe does not have. (3) Baking adds W_o (alpha std direction) to o_proj's
    bias, exact for o_proj(x + d) = o_proj(x) + W_o d; the authors' edit_weight.py stores the displacement
    itself as the bias (the W_o product is commented out), which is the same only where W_o is the identity.
    (4) A pair is the unit of the split (the authors split by TruthfulQA question).
    """

    form = "head_offsets"
    fitted = True
    every_layer = True
    fitting = "fit a logistic probe per attention head at o_proj's input and shift the top heads ({form})"

    def check_model(self, model, rows: list[dict], layers: list[int] | None) -> None:
        for i in range(len(decoder_layers(model))):
            o_proj(model, i, "model")
        n, k, heads = len(rows), self.p["heads"], head_count(model) * len(layers)
        n_fit = int(n * (1 - self.p["val_ratio"]))
        if n_fit < 1 or n_fit == n:
            raise RecipeError(f"parameters.val_ratio: {self.p['val_ratio']} of {n} training pairs leaves no pair to "
                              "fit or to rank the probes on; give more pairs")
        if k > heads:
            raise RecipeError(f"parameters.heads: {k} is more than the {heads} heads of the layers given")

    def default_strength(self) -> float:
        return float(self.p["alpha"])

    def artefact_config(self) -> dict[str, Any]:
        return {"module": MODULE, "heads": {str(i): h for i, h in sorted(self.chosen.items())}}

    def fit(self, model, tokenizer, rows: list[dict], layers: list[int], seed: int = 0, progress: bool = False,
            read: str | int = "last", batch_size: int = 16) -> tuple[dict[int, Any], dict]:
        from malleable.steer.engine import collect

        self.check_model(model, rows, layers)
        n, heads, k = len(rows), head_count(model), self.p["heads"]
        n_fit = int(n * (1 - self.p["val_ratio"]))
        rng = np.random.default_rng(seed)
        fit_idx = np.sort(rng.choice(n, n_fit, replace=False))
        val_idx = np.setdiff1d(np.arange(n), fit_idx)
        acts = collect(model, tokenizer, rows, read, batch_size, progress, "reading heads",
                       modules=[o_proj(model, i) for i in layers], inputs=True)
        pos = {layer: acts["positive"][j].reshape(n, heads, -1) for j, layer in enumerate(layers)}
        neg = {layer: acts["negative"][j].reshape(n, heads, -1) for j, layer in enumerate(layers)}
        accuracy, probes = probe_heads(pos, neg, fit_idx, val_idx, self.p["C"], self.p["max_iter"], seed)
        offsets: dict[int, np.ndarray] = {}
        chosen = []
        for layer, h in top_heads(accuracy, k):
            p, q = pos[layer][:, h], neg[layer][:, h]
            d = p.mean(0) - q.mean(0) if self.p["direction"] == "mass_mean" else probes[layer][h]
            if not np.isfinite(d).all() or not np.linalg.norm(d) > 0:
                raise InputError(f"the iti direction of layer {layer} head {h} is zero or not finite (the pairs do "
                                 "not differ there)")
            shift, std = scaled_direction(d, np.concatenate([p, q]))
            width = d.shape[0]
            offsets.setdefault(layer, np.zeros(heads * width))[h * width:(h + 1) * width] = shift
            chosen.append({"layer": layer, "head": h, "accuracy": accuracy[layer][h], "std": std})
        self.chosen = {i: sorted(c["head"] for c in chosen if c["layer"] == i) for i in offsets}
        log = {"probe_pairs": len(fit_idx), "ranking_pairs": len(val_idx), "heads": chosen,
               "head_accuracy": {str(i): accuracy[i] for i in layers}}
        return {i: {"offset": torch.from_numpy(o).float()} for i, o in offsets.items()}, log

    def summary(self, log: dict | None) -> list[str]:
        if not log:
            return []
        heads = ", ".join(f"{c['layer']}.{c['head']} ({c['accuracy']:.2f})" for c in log["heads"])
        return [f"- probes fitted on {log['probe_pairs']} training pairs, ranked on {log['ranking_pairs']} others; "
                f"top {len(log['heads'])} heads (layer.head, validation accuracy): {heads}"]


def probe_heads(pos: dict[int, np.ndarray], neg: dict[int, np.ndarray], fit_idx: np.ndarray, val_idx: np.ndarray,
                C: float = 1.0, max_iter: int = 1000, seed: int = 0
                ) -> tuple[dict[int, list[float]], dict[int, list[np.ndarray]]]:
    """A logistic probe per head of each layer ((pairs, heads, head_dim) positives and negatives): fitted on the
    `fit_idx` pairs' members (1 positive, 0 negative), scored by accuracy on the `val_idx` pairs' members, as the
    authors' train_probes. Returns (accuracy per layer and head, the probes' weights)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    accuracy: dict[int, list[float]] = {}
    weights: dict[int, list[np.ndarray]] = {}
    y_fit = np.r_[np.ones(len(fit_idx)), np.zeros(len(fit_idx))]
    y_val = np.r_[np.ones(len(val_idx)), np.zeros(len(val_idx))]
    for layer in pos:
        accuracy[layer], weights[layer] = [], []
        for h in range(pos[layer].shape[1]):
            x_fit = np.concatenate([pos[layer][fit_idx, h], neg[layer][fit_idx, h]])
            x_val = np.concatenate([pos[layer][val_idx, h], neg[layer][val_idx, h]])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(x_fit, y_fit)
            accuracy[layer].append(float(np.mean(clf.predict(x_val) == y_val)))
            weights[layer].append(clf.coef_[0].astype(np.float64))
    return accuracy, weights


def top_heads(accuracy: dict[int, list[float]], k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of highest accuracy, best first; among equals the later one, as the authors'
    `np.argsort(acc)[::-1]` (with a stable sort, so the order is defined)."""
    flat = [(layer, h) for layer in accuracy for h in range(len(accuracy[layer]))]
    scores = np.array([accuracy[layer][h] for layer, h in flat])
    return [flat[j] for j in np.argsort(scores, kind="stable")[::-1][:k]]


def scaled_direction(direction: np.ndarray, acts: np.ndarray) -> tuple[np.ndarray, float]:
    """(std * unit direction, std): std the standard deviation (ddof 0) of `acts` projected on the unit
    direction, as the authors' get_interventions_dict."""
    unit = direction / np.linalg.norm(direction)
    std = float(np.std(acts @ unit))
    return std * unit, std


def _offsets(model, artefact) -> dict[int, tuple[torch.nn.Linear, torch.Tensor]]:
    """Each steered layer's o_proj and offset, shapes checked against the model."""
    out = {}
    for i, t in artefact.vectors.items():
        lin, offset = o_proj(model, i, artefact.where()), t.get("offset") if isinstance(t, dict) else None
        if offset is None or offset.dim() != 1 or offset.shape[0] != lin.in_features:
            raise InputError(f"{artefact.where()}: layer {i} needs an offset of o_proj's input width "
                             f"({lin.in_features})")
        out[i] = (lin, offset)
    return out


def _hooks(model, artefact, strength: float, where) -> list:
    """Add `strength * offset` to o_proj's input at every text position of each steered layer."""
    handles = []
    for lin, offset in _offsets(model, artefact).values():
        def shift(module, args, offset=offset):
            x = args[0]
            add = (strength * offset).to(device=x.device, dtype=x.dtype)
            mask, _ = where.at(x)
            return (x + (add if mask is None else add * mask), *args[1:])

        handles.append(lin.register_forward_pre_hook(shift))
    return handles


def _bake(model, artefact, strength: float) -> str:
    """o_proj(x + m d) = o_proj(x) + m W_o d: a bias on each steered layer's o_proj. Llama-style configs switch
    the q, k, v and o biases of every layer together (`attention_bias`), so all of them get zero biases and the
    steered o_projs m W_o d."""
    if not hasattr(model.config, "attention_bias"):
        raise InputError(f"{artefact.where()}: baking needs a model whose config has `attention_bias` (the Llama "
                         f"family; {model.config.model_type} has none); apply it with hooks instead")
    offsets = _offsets(model, artefact)
    for layer in decoder_layers(model):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name, None)
            if not isinstance(lin, torch.nn.Linear):
                raise InputError(f"{type(layer.self_attn).__name__}: no {name} linear layer to carry the bias")
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                          device=lin.weight.device), requires_grad=False)
    with torch.no_grad():
        for lin, offset in offsets.values():
            shift = strength * (lin.weight.to(torch.float64) @ offset.to(lin.weight.device, torch.float64))
            lin.bias.add_(shift.to(lin.bias.dtype))
    model.config.attention_bias = True
    return ("a bias W_o (strength x offset) on each steered layer's self_attn.o_proj (config attention_bias: "
            "true; the other attention biases are zero)")


FORMS["head_offsets"] = (_hooks, _bake)
