"""The adapter zoo's pure pieces (cache keys, tables, coefficient choice, seed statistics) on fake numbers;
the real zoo (SmolLM2, minutes) only under `-m slow`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from malleable.protocols.zoo import (
    MULTI, TASKS, ZooSettings, adapter_dir, adapter_key, normalised, over_seeds, select_coefficient, settings_key,
    zoo_dir, zoo_table,
)


def test_settings_key_is_stable_and_order_free():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})
    assert ZooSettings().key() == ZooSettings().key() != replace(ZooSettings(), lr=1e-3).key()


def test_adapter_keys_depend_only_on_what_trains_them(tmp_path):
    s = ZooSettings()
    evaluation_only = replace(s, max_eval=5, max_new_tokens=3)
    assert zoo_dir(s, tmp_path) != zoo_dir(evaluation_only, tmp_path)  # the table is recomputed ...
    for name in (*TASKS, MULTI):  # ... but no adapter is retrained
        assert adapter_dir(s, name, tmp_path) == adapter_dir(evaluation_only, name, tmp_path)
    more_multi = replace(s, multi_steps=s.multi_steps + 1)
    assert adapter_key(s, TASKS[0]) == adapter_key(more_multi, TASKS[0])
    assert adapter_key(s, MULTI) != adapter_key(more_multi, MULTI)
    assert adapter_key(s, TASKS[0]) != adapter_key(replace(s, steps=s.steps + 1), TASKS[0])
    assert adapter_key(s, TASKS[0]) != adapter_key(s, TASKS[1])
    assert adapter_dir(s, TASKS[0], tmp_path).parent == tmp_path / "adapters"


def test_cache_root_follows_malleable_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MALLEABLE_CACHE", str(tmp_path))
    assert zoo_dir(ZooSettings()) == tmp_path / "zoo" / ZooSettings().key()


def test_coefficient_is_chosen_on_validation_only():
    validation = {0.5: {"a": 0.5, "b": 0.5}, 1.0: {"a": 0.9, "b": 0.7}, 1.5: {"a": 0.2, "b": 0.2}}
    test = {0.5: {"a": 1.0, "b": 1.0}, 1.0: {"a": 0.0, "b": 0.0}, 1.5: {"a": 1.0, "b": 1.0}}
    assert select_coefficient(validation) == 1.0
    assert select_coefficient(test) == 0.5  # test scores would pick another one: nothing else goes in
    assert select_coefficient({1.5: {"a": 0.5}, 0.5: {"a": 0.5}}) == 0.5  # a tie: the smaller coefficient


def test_normalised_and_seed_statistics():
    norm = normalised({"a": 0.4, "b": 0.3}, {"a": 0.8, "b": 0.0})
    assert norm == {"a": 0.5, "b": None}
    one = over_seeds([{"a": 0.5, "b": None}])
    assert one == {"a": {"mean": 0.5, "std": 0.0}, "b": {"mean": None, "std": None}}
    three = over_seeds([{"a": 0.2}, {"a": 0.4}, {"a": 0.6}])
    assert three["a"]["mean"] == pytest.approx(0.4) and three["a"]["std"] == pytest.approx(0.1633, abs=1e-4)


def test_zoo_table_has_a_row_per_model_and_bold_diagonal():
    rows = {"base": {"x": 0.0, "y": 0.25}, "x": {"x": 0.75, "y": 0.0}, "y": {"x": 0.0, "y": 1.0}}
    md = zoo_table(rows, ["x", "y"], {"x": 4, "y": 8}).splitlines()
    assert md[0] == "| model | x | y | mean |"
    assert md[2] == "| base | 0% | 25% | 12.5% |"
    assert md[3] == "| x | **75%** | 0% | 37.5% |"
    assert md[4] == "| y | 0% | **100%** | 50.0% |"
    assert md[-1] == "| n (test pairs) | 4 | 8 | |"


@pytest.mark.slow
def test_real_zoo_through_the_cli(tmp_path):
    """Tiny settings, real model: `malleable bench zoo` trains, caches and scores; a second run reuses all."""
    from typer.testing import CliRunner

    from malleable.cli import app

    args = ["bench", "zoo", "--out", str(tmp_path / "res"), "--cache", str(tmp_path / "cache"), "--steps", "1",
            "--multi-steps", "1", "--max-eval", "2", "-q"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    result = json.loads((tmp_path / "res" / "zoo.json").read_text())
    assert set(result["test_exact_match"]) == {"base", *TASKS, MULTI}
    assert all(n == 2 for n in result["n"]["test"].values())
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads((tmp_path / "res" / "zoo.json").read_text()) == result
