"""bench/continual_lora.py's bookkeeping: methods with parameters, and the tuning split that never touches the
test items."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import continual_lora as cl  # noqa: E402 (the bench folder is not a package)


def test_a_method_carries_its_parameters_as_numbers():
    assert cl.parse_method("seq_lora") == ("seq_lora", {}, {})
    assert cl.parse_method("ewc_lora:lam=4e4,fisher_batches=10") == ("ewc_lora", {"lam": 4e4, "fisher_batches": 10},
                                                                      {})
    assert cl.parse_method("joint_lora@epochs=3,schedule=cosine") == ("joint_lora", {}, {"epochs": 3,
                                                                                         "schedule": "cosine"})


def test_own_training_settings_replace_the_shared_ones(tmp_path):
    args = type("A", (), {"rank": 8, "tasks": ["larger"], "steps": 40, "batch_size": 8, "lr": 2e-3})()
    data = {"larger": ("tr", "te"), cl.COMPOSED: (None, "c")}
    assert cl.recipe(tmp_path, "joint_lora@epochs=3,schedule=cosine", 0, data, args)["training"] == {
        "batch_size": 8, "lr": 2e-3, "schedule": "cosine", "epochs": 3}
    plain = cl.recipe(tmp_path, "l2_lora:lam=100", 0, data, args)
    assert plain["training"]["steps"] == 40 and plain["parameters"] == {"lam": 100}


def test_tuning_scores_held_out_training_items_and_trains_on_the_rest(tmp_path):
    plain = cl.write_data(tmp_path / "plain", ["larger"], 30, 10)
    tune = cl.write_data(tmp_path / "tune", ["larger"], 30, 10, n_validation=8)
    read = lambda p: [json.loads(x) for x in Path(p).read_text().splitlines()]  # noqa: E731
    train, test = read(plain["larger"][0]), read(plain["larger"][1])
    assert read(tune["larger"][0]) == train[:22] and read(tune["larger"][1]) == train[22:]
    assert not {r["prompt"] for r in read(tune["larger"][1])} & {r["prompt"] for r in test}
    assert read(tune[cl.COMPOSED][1]) == read(plain[cl.COMPOSED][1])
