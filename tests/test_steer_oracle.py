"""Our steering directions against the authors' code, on the same activations.

Transcription tests (always run): repeng's and steering-vectors' formulas written out here on fixed arrays, as
their files have them (vgel/repeng repeng/extract.py `read_representations` and `project_onto_direction`;
steering-vectors steering_vectors/aggregators.py `mean_aggregator`, `logistic_aggregator`,
`_get_normalized_regression_coef`). Peer tests (when bench/setup_steering.sh has made /work/steering-venv or
$STEERING_VENV): repeng 0.4.0 and steering-vectors 0.12.2 themselves, end to end on the tiny checkpoint and on
the activations our engine read. Target: cosine >= 0.999.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_tokenizer
from malleable.steer import get_method

VENV = Path(os.environ.get("STEERING_VENV", "/work/steering-venv"))


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def acts():
    """Activations with a planted concept direction, pair structure and noise (pairs, hidden 64)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 64)) * 2
    concept = rng.normal(size=64)
    pos = base + concept + rng.normal(size=(40, 64)) * 0.5
    neg = base - concept * 0.5 + rng.normal(size=(40, 64)) * 0.5
    return pos, neg


def repeng_reading(pos, neg, method):
    """repeng/extract.py read_representations: rows interleaved [pos, neg, ...], PCA(n_components=1) on the
    differences (pca_diff) or on midpoint-centred rows (pca_center), float32 component, then the sign vote of
    project_onto_direction over pairs."""
    from sklearn.decomposition import PCA

    h = np.stack([pos, neg], axis=1).reshape(-1, pos.shape[1])
    if method == "pca_diff":
        train = h[::2] - h[1::2]
    else:
        center = (h[::2] + h[1::2]) / 2
        train = h.copy()
        train[::2] -= center
        train[1::2] -= center
    direction = PCA(n_components=1, whiten=False).fit(train).components_.astype(np.float32).squeeze(axis=0)
    projected = (h @ direction) / np.linalg.norm(direction)
    smaller = np.mean([projected[i] < projected[i + 1] for i in range(0, len(h), 2)])
    larger = np.mean([projected[i] > projected[i + 1] for i in range(0, len(h), 2)])
    return -direction if smaller > larger else direction


def sv_logistic(pos, neg):
    """steering_vectors/aggregators.py _get_normalized_regression_coef with LogisticRegression(fit_intercept=False):
    midpoint-centred float32 rows, labels +1 / -1, F.normalize of the coefficients."""
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression

    p, n = torch.from_numpy(pos).float(), torch.from_numpy(neg).float()
    mean = torch.stack([p, n]).mean(dim=0)
    x = torch.cat([p - mean, n - mean]).numpy()
    y = torch.cat([torch.ones(len(p)), -torch.ones(len(n))]).numpy()
    coef = torch.tensor(np.array([LogisticRegression(fit_intercept=False).fit(x, y).coef_]))
    return F.normalize(coef, dim=-1).view(-1).numpy()


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_repeng_transcription(acts, method):
    pos, neg = acts
    ours = get_method(method, {}).direction(pos, neg)
    theirs = repeng_reading(pos, neg, method)
    assert cosine(ours, theirs) >= 0.999  # the same sign too: cosine near -1 would fail
    assert abs(np.linalg.norm(ours) - 1) < 1e-9


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_repeng_sign_vote_flips(acts, method):
    """Swapping positives and negatives flips the direction (the sign vote is not a no-op)."""
    pos, neg = acts
    m = get_method(method, {})
    assert cosine(m.direction(pos, neg), m.direction(neg, pos)) < -0.999


def test_steering_vectors_mean_transcription(acts):
    pos, neg = acts
    theirs = (torch.from_numpy(pos) - torch.from_numpy(neg)).mean(dim=0).numpy()  # mean_aggregator
    np.testing.assert_allclose(get_method("caa", {}).direction(pos, neg), theirs, rtol=1e-12)


def test_steering_vectors_logistic_transcription(acts):
    pos, neg = acts
    ours = get_method("logistic", {}).direction(pos, neg)
    assert cosine(ours, sv_logistic(pos, neg)) >= 0.999


@pytest.fixture(scope="module")
def peer(tiny_lm, tmp_path_factory):
    """Our engine's activations and directions on the tiny checkpoint, and the peers' on the same inputs."""
    if not (VENV / "bin" / "python").is_file():
        pytest.skip(f"no steering peers' venv at {VENV} (bench/setup_steering.sh makes it)")
    from safetensors.numpy import load_file, save_file

    from malleable.steer.engine import collect
    from malleable.steer.registry import get_method as method
    from test_steer import pairs

    root = tmp_path_factory.mktemp("peer")
    rows = pairs(16, 3)
    (root / "pairs.json").write_text(json.dumps(rows))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    a = collect(model, tiny_tokenizer(), rows, "last")
    save_file({f"{k[:3]}.{i}": a[k][i].astype(np.float32) for k in ("positive", "negative") for i in (0, 1)},
              str(root / "acts.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                        "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([str(VENV / "bin" / "python"), str(Path(__file__).parent / "steer_peer.py"), str(tiny_lm),
                          str(root / "pairs.json"), str(root / "acts.safetensors"), str(root / "out.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = load_file(str(root / "out.safetensors"))
    pos32 = {i: a["positive"][i].astype(np.float32).astype(np.float64) for i in (0, 1)}
    neg32 = {i: a["negative"][i].astype(np.float32).astype(np.float64) for i in (0, 1)}
    ours = {(m, i): method(m, {}).direction(pos32[i], neg32[i]) for m in ("caa", "pca_diff", "pca_center",
                                                                        "logistic") for i in (0, 1)}
    return ours, theirs


@pytest.mark.parametrize("ours_name, key, layers", [
    ("pca_diff", "repeng_given.pca_diff", (0, 1)), ("pca_center", "repeng_given.pca_center", (0, 1)),
    ("pca_diff", "repeng_e2e.pca_diff", (0,)), ("pca_center", "repeng_e2e.pca_center", (0,)),
    ("caa", "sv_given.mean", (0, 1)), ("caa", "sv_e2e.mean", (0, 1)),
    ("logistic", "sv_given.logistic", (0, 1)), ("logistic", "sv_e2e.logistic", (0, 1)),
])
def test_against_the_peer(peer, ours_name, key, layers):
    ours, theirs = peer
    for i in layers:
        c = cosine(ours[ours_name, i], theirs[f"{key}.{i}"])
        print(f"{key} layer {i}: cosine {c:.7f}")
        assert c >= 0.999, f"{key} layer {i}: cosine {c:.6f}"
