"""bench/continual_vs_avalanche.py's bookkeeping: the interleaved plan, the stream both tools walk, pairing by seed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import continual_vs_avalanche as cva  # noqa: E402 (the bench folder is not a package)


def run(tool: str, method: str, buffer: int | None, seed: int, acc: float, train: float) -> dict:
    return {"tool": tool, "method": method, "buffer": buffer, "seed": seed, "train_seconds": train, "wall_s": train + 5,
            "peak_rss_mb": 700.0 if tool == "malleable" else 800.0, "accuracy_matrix": [[10.0, 10.0], [acc, 0.0]],
            "metrics": {"average_accuracy": acc, "forgetting": 100 - acc}, "loadavg_before": [1.0],
            "loadavg_after": [2.0]}


def test_plan_alternates_the_tool_that_goes_first_and_runs_ours_once_per_buffer():
    even, odd = cva.plan(0, [200], joint=True), cva.plan(1, [200], joint=False)
    assert even[:4] == [("malleable", "er", 200), ("avalanche", "er", 200), ("malleable", "er_ace", 200),
                        ("avalanche", "er_ace", 200)]
    assert odd[0] == ("avalanche", "er", 200) and odd[1] == ("malleable", "er", 200)
    assert even[4:] == [("malleable", "las", 200), ("malleable", "mir_las", 200), ("malleable", "joint", None)]
    assert ("malleable", "joint", None) not in odd


def test_aggregate_pairs_the_tools_by_seed():
    runs = []
    for s, (m, a) in enumerate([(60.0, 58.0), (62.0, 61.0), (64.0, 60.0)]):
        runs += [run("malleable", "er", 200, s, m, 10.0), run("avalanche", "er", 200, s, a, 20.0)]
    out = cva.aggregate(runs, [200])
    v = out["versus"]["er (M=200)"]
    assert v["accuracy_difference"]["mean"] == pytest.approx((2 + 1 + 4) / 3)
    assert v["train_time_ratio_of_medians"] == pytest.approx(0.5) and v["peak_rss_ratio_of_medians"] == 0.875
    assert v["same_starting_accuracy"] and v["seeds"] == [0, 1, 2]
    assert out["table"]["avalanche er (M=200)"]["average_accuracy"]["n"] == 3


@pytest.mark.slow  # reads Fashion-MNIST's 60,000 training labels (seconds; more on a loaded machine)
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_the_stream_sent_to_avalanche_is_the_one_the_engine_walks():
    from malleable.continual.stream import SPLIT
    from malleable.data.vision import load_image_dataset

    tasks = cva.stream_job(3, 20, 5)
    labels = load_image_dataset("fashion_mnist")["train"].labels
    assert [len(t["train"]) for t in tasks] == [40] * 5 and [len(t["test"]) for t in tasks] == [10] * 5
    assert all({int(labels[i]) for i in t["train"]} == set(c) for t, c in zip(tasks, SPLIT))
    assert tasks[0]["train"] != sorted(tasks[0]["train"])  # the engine's seeded order, not file order
    assert cva.stream_job(3, 20, 5) == tasks and cva.stream_job(4, 20, 5) != tasks
