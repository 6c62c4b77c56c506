"""bench/continual_lora.py's bookkeeping: methods with parameters, and the tuning split that never touches the
test items."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import continual_lora as cl  # noqa: E402 (the bench folder is not a package)


def test_a_method_carries_its_parameters_as_numbers():
    assert cl.parse_method("seq_lora") == ("seq_lora", {})
    assert cl.parse_method("ewc_lora:lam=4e4,fisher_batches=10") == ("ewc_lora", {"lam": 4e4, "fisher_batches": 10})


def test_tuning_scores_held_out_training_items_and_trains_on_the_rest(tmp_path):
    plain = cl.write_data(tmp_path / "plain", ["larger"], 30, 10)
    tune = cl.write_data(tmp_path / "tune", ["larger"], 30, 10, n_validation=8)
    read = lambda p: [json.loads(x) for x in Path(p).read_text().splitlines()]  # noqa: E731
    train, test = read(plain["larger"][0]), read(plain["larger"][1])
    assert read(tune["larger"][0]) == train[:22] and read(tune["larger"][1]) == train[22:]
    assert not {r["prompt"] for r in read(tune["larger"][1])} & {r["prompt"] for r in test}
    assert read(tune[cl.COMPOSED][1]) == read(plain[cl.COMPOSED][1])
