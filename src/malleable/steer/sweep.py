"""The strength sweep behind `malleable steer --strengths`: on the validation pairs only, per strength m, the
mean PrefOdds and UtilOdds of the steered model (evaluate/preference.py), the unsteered model's perplexity of
the steered greedy samples and their distinct-1/2; then the paper's fitted curves and a plot.

Likelihoods: each answer is scored as its tokens plus the end-of-sequence token after the raw prompt text (no
chat template: the pairs were read as `prompt + answer`), so L is a whole-sequence NLL and p_pos + p_neg <= 1.
A plain-text pair (empty prompt) is scored after the BOS token (EOS where the tokenizer has none), so that its
first token has a context to be predicted from.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from malleable.evaluate.preference import distinct_n, fit_curves, pref_odds, pref_curve, util_curve, util_odds
from malleable.evaluate.scoring import score_pairs, without_eos
from malleable.steer.apply import applied
from malleable.steer.artefact import Artefact


def context(tokenizer, prompt: str) -> str:
    return prompt or tokenizer.bos_token or tokenizer.eos_token


def pair_nll(model, tokenizer, rows: list[dict], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(L_pos, L_neg): each pair's answers' whole-sequence negative log-likelihoods (nats), under whatever hooks
    are installed on `model`."""
    out = []
    for member in ("positive", "negative"):
        scored = score_pairs(model, tokenizer, [(context(tokenizer, r["prompt"]), r[member]) for r in rows],
                             batch_size=batch_size, chat=False)
        out.append(np.array([-float(np.sum(s["logprobs"], dtype=np.float64)) for s in scored]))
    return out[0], out[1]


def perplexity(model, tokenizer, prompts: list[str], texts: list[str]) -> float | None:
    """exp of the mean token NLL of the texts after their prompts (tokens pooled; the appended EOS left out);
    None when every text is empty."""
    keep = [(context(tokenizer, p), t) for p, t in zip(prompts, texts) if t.strip()]
    if not keep:
        return None
    lps = np.concatenate([without_eos(s)["logprobs"] for s in score_pairs(model, tokenizer, keep, chat=False)])
    return float(math.exp(-np.mean(lps, dtype=np.float64))) if len(lps) else None


def sweep(model, tokenizer, artefact: Artefact, val: list[dict], samples: list[dict], batch_size: int = 16) -> dict:
    """{"rows": per strength, "fits": the fitted curves}; `samples` are generate_samples' output (one entry
    per strength, the strengths to sweep)."""
    rows = []
    for s in samples:
        m = s["strength"]
        with applied(model, artefact, strength=m):
            l_pos, l_neg = pair_nll(model, tokenizer, val, batch_size)
        texts = [g["text"] for g in s["generations"]]
        rows.append({"strength": m, "pref_odds": float(np.mean(pref_odds(l_pos, l_neg))),
                     "util_odds": float(np.mean(util_odds(l_pos, l_neg))),
                     "nll_positive": float(np.mean(l_pos)), "nll_negative": float(np.mean(l_neg)),
                     "preference_accuracy": float(np.mean(l_pos < l_neg)),
                     "sample_perplexity": perplexity(model, tokenizer, [g["prompt"] for g in s["generations"]], texts),
                     "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)})
    m = [r["strength"] for r in rows]
    fits = fit_curves(m, [r["pref_odds"] for r in rows], [r["util_odds"] for r in rows])
    return {"pairs": len(val), "samples_per_strength": len(samples[0]["generations"]) if samples else 0,
            "rows": rows, "fits": fits}


def plot(path: Path, result: dict, title: str) -> None:
    """PrefOdds and UtilOdds against m, the measured points and each side's fitted curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array([r["strength"] for r in result["rows"]])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, kind, key, f, label in ((axes[0], "pref", "pref_odds", pref_curve, "PrefOdds (L_neg - L_pos)"),
                                    (axes[1], "util", "util_odds", util_curve, "UtilOdds")):
        ax.plot(m, [r[key] for r in result["rows"]], "o", label="measured")
        for side, grid in (("positive", np.linspace(0, m.max(), 50)), ("negative", np.linspace(m.min(), 0, 50))):
            fit = result["fits"][kind][side]
            if fit.get("fitted") and len(grid) and grid.max() > grid.min():
                ax.plot(grid, f(grid, *fit["params"].values()), "-", color="C1",
                        label=f"fit m{'>=' if side == 'positive' else '<='}0 (R² {fit['r2']:.2f})")
        ax.set_xlabel("strength m")
        ax.set_ylabel(label)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def number(x) -> str:
    """A report cell: three decimals, or n/a for a missing or non-finite value."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def markdown(result: dict) -> list[str]:
    lines = ["", f"## Preference and utility against strength ({result['pairs']} validation pairs)", "",
             "| m | PrefOdds | UtilOdds | NLL pos | NLL neg | pos preferred | sample perplexity (unsteered) "
             "| distinct-1 | distinct-2 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [number(r[k]) for k in ("pref_odds", "util_odds", "nll_positive", "nll_negative",
                                         "preference_accuracy", "sample_perplexity", "distinct_1", "distinct_2")]
        lines.append(f"| {r['strength']:g} | " + " | ".join(cells) + " |")
    lines += ["", "PrefOdds = L_neg - L_pos and UtilOdds = log((p_pos + p_neg) / (1 - p_pos - p_neg)), L the "
              "whole-sequence NLL (nats) of each answer with its EOS; means over the pairs. Perplexity and "
              f"distinct-n over the {result['samples_per_strength']} greedy samples per strength.", "",
              "Fitted curves (PrefOdds = b + a m D(m), UtilOdds = b + c D(m), D(m) = (1 + m²/(2 p scale²))^-p; "
              "each side fitted on its points and m = 0):", ""]
    for kind in ("pref", "util"):
        for side in ("positive", "negative"):
            fit = result["fits"][kind][side]
            what = (f"R² {fit['r2']:.3f}, " + ", ".join(f"{k} {v:.4g}" for k, v in fit["params"].items())
                    if fit.get("fitted") else f"not fitted: {fit['reason']}")
            lines.append(f"- {'PrefOdds' if kind == 'pref' else 'UtilOdds'}, m {'>=' if side == 'positive' else '<='}"
                         f" 0 ({fit['points']} points): {what}")
    lines += ["", "![PrefOdds and UtilOdds against m](preference.png)"]
    return lines
