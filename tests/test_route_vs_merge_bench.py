"""bench/route_vs_merge.py's pieces: a merge rescaled through its LoRA scaling, and the paired normalised
accuracy (per task over the task's own adapter, mean over tasks, tasks the adapter never gets right left out)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from conftest import make_adapter, tiny_llama


def _bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import route_vs_merge  # the bench folder is not a package

    return route_vs_merge


def test_a_scaled_copy_multiplies_the_lora_scaling(tmp_path):
    from malleable.io.adapter import read_adapter

    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(base)
    src = make_adapter(base, tmp_path / "lora", seed=1)
    out = _bench().scaled(src, 0.35, tmp_path / "scaled")
    a, b = read_adapter(src), read_adapter(out)
    for m, d in a.deltas.items():
        assert torch.allclose(b.deltas[m].dense(), 0.35 * d.dense(), atol=1e-6)


def test_normalised_accuracy_is_paired_and_skips_tasks_without_a_ratio():
    task = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 2)
    own = np.array([1, 1, 0, 0, 1, 1, 1, 1, 0, 0], dtype=float)
    router = np.array([1, 0, 0, 0, 1, 1, 0, 0, 1, 1], dtype=float)
    res = _bench().normalised({"r": router, "own": own}, own, task, n=500, seed=0)
    assert res["tasks_used"] == ["a", "b"]  # task c's adapter gets none right: no ratio
    point, boot = res["methods"]["r"]
    assert point == np.mean([0.25 / 0.5, 0.5 / 1.0]) and boot.shape == (500,)
    # a resample holding none of a task's rows the adapter gets right has no ratio there: 0, as merge_quality
    assert res["methods"]["own"][0] == 1.0 and np.median(res["methods"]["own"][1]) == 1.0
