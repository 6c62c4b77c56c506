"""Forgetting in image classifiers: data loaders, the MIA, and the SalUn protocol on scikit-learn digits."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from malleable.data import vision
from malleable.errors import InputError, RecipeError
from malleable.evaluate.classification import accuracy, predict_proba
from malleable.evaluate.mia import mia_efficacy, mia_features, membership_auc
from malleable.forget import fit
from malleable.protocols.forget_classifier import (METRICS, RELEARN, RELEARN_METRICS, make_split, relearn_score,
                                                  membership, run_protocol, score, train_model, unlearn_and_score,
                                                  unseen_rows)
from malleable.forget.data import collate_classification
from malleable.models.vision import small_cnn

RECIPE = {"epochs": 8, "batch_size": 64, "lr": 0.05}


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def tiny_cnn() -> torch.nn.Module:
    return small_cnn(1, 10, 8, width=8)


@pytest.fixture(scope="module")
def digits():
    return {k: v.examples() for k, v in vision.load_image_dataset("digits", seed=0).items()}


def random_labels(examples: list, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(x, int(y)) for (x, _), y in zip(examples, torch.randint(0, 10, (len(examples),), generator=g))]


@pytest.fixture(scope="module")
def class_run(digits):
    """A tiny class-wise protocol run (class 3) without methods but with the relearning audit, and the trained
    original it reused."""
    split = make_split(digits["train"], digits["test"], "class", forget_class=3)
    original = train_model(tiny_cnn, split["train"], RECIPE, seed=0)
    run = run_protocol(tiny_cnn, digits["train"], digits["test"], "class", {}, RECIPE, seed=0, forget_class=3,
                       max_shadow=300, original=original, relearning=RELEARN)
    return {**run, "split": split, "model": original[0]}


def test_read_idx_round_trip_and_fashion_layout(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    for split, (img, lab) in vision.FASHION_MNIST_FILES.items():
        write_idx(tmp_path / img, images)
        write_idx(tmp_path / lab, labels)
    plain = tmp_path / "plain-idx1-ubyte"
    write_idx(plain, labels)
    assert np.array_equal(vision.read_idx(plain), labels)
    assert np.array_equal(vision.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)

    split = vision.load_fashion_mnist("test", root=tmp_path)
    assert split.images.shape == (5, 1, 28, 28) and split.images.dtype == torch.float32
    assert torch.allclose(split.images[:, 0] * 255, torch.from_numpy(images).float())
    assert split.labels.dtype == torch.int64 and split.labels.tolist() == labels.tolist()
    assert split.classes[9] == "Ankle boot"


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(InputError, match="bad magic"):
        vision.read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], dtype=">u4").tobytes() + b"\x00" * 3)
    with pytest.raises(InputError, match="10"):
        vision.read_idx(short)


def test_missing_fashion_mnist_falls_back_to_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vision, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(InputError, match="dataset-fashion-mnist") as err:
        vision.load_image_dataset("fashion_mnist")
    assert "nowhere" in str(err.value)
    with pytest.raises(InputError, match="cifar"):
        vision.load_image_dataset("cifar")
    data = vision.load_image_dataset("auto")
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert data["train"].images.shape[1:] == (1, 8, 8) and float(data["train"].images.max()) <= 1.0
    assert len(data["train"].labels) + len(data["test"].labels) == 1797


def test_membership_auc_separates_memorised_from_unseen(digits):
    rng = np.random.default_rng(0)
    assert abs(membership_auc(rng.normal(size=2000), rng.normal(size=2000)) - 0.5) < 0.05

    # A model that memorised random labels: the label's confidence is high only on its own training set.
    members, unseen = random_labels(digits["train"][:64], 0), random_labels(digits["test"][:64], 1)
    torch.manual_seed(0)
    model = small_cnn(1, 10, 8, width=32)
    fit(model, members, collate=collate_classification, epochs=40, batch_size=8, lr=0.05)
    assert accuracy(model, members) > 95
    conf = [mia_features(*predict_proba(model, exs), "confidence")[:, 0] for exs in (members, unseen)]
    assert membership_auc(*conf) > 0.95
    # SalUn's attack trained on the same two sets calls the members members and the unseen non-members.
    assert mia_efficacy(model, members, members, unseen) < 10
    assert mia_efficacy(model, unseen, members, unseen) > 90


def test_mia_features_match_their_definitions():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    y = torch.tensor([0, 1])
    assert np.allclose(mia_features(p, y, "confidence")[:, 0], [0.7, 0.1])
    assert np.allclose(mia_features(p, y, "correctness")[:, 0], [1, 0])
    entropy = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
               -(0.2 * math.log(0.1) + 0.8 * math.log(0.8))]
    assert np.allclose(mia_features(p, y, "entropy")[:, 0], entropy)
    m = -(0.3 * math.log(0.7)) - (0.2 * math.log(0.8) + 0.1 * math.log(0.9))
    assert math.isclose(mia_features(p, y, "m_entropy")[0, 0], m, rel_tol=1e-6)


def test_splits(digits):
    random = make_split(digits["train"], digits["test"], "random", seed=1)
    again = make_split(digits["train"], digits["test"], "random", seed=1)
    assert len(random["forget"]) == round(0.1 * len(digits["train"]))
    assert len(random["forget"]) + len(random["retain"]) == len(digits["train"])
    assert [int(y) for _, y in random["forget"]] == [int(y) for _, y in again["forget"]]
    assert len(random["test"]) == len(digits["test"])
    cls = make_split(digits["train"], digits["test"], "class", forget_class=3)
    assert {int(y) for _, y in cls["forget"]} == {3}
    assert 3 not in {int(y) for _, y in cls["retain"]} | {int(y) for _, y in cls["test"]}
    with pytest.raises(RecipeError, match="scenario"):
        make_split(digits["train"], digits["test"], "bogus")
    with pytest.raises(RecipeError, match="forget_ratio"):
        make_split(digits["train"], digits["test"], "random", forget_ratio=1.5)


def test_protocol_metrics_in_range_and_retrain_is_its_own_gold(class_run):
    for row in (class_run["retrain"], class_run["original"]):
        assert all(0 <= row[k] <= 100 for k in METRICS)
    assert class_run["retrain"]["gap"] == 0 and class_run["retrain"]["time_ratio"] == 1
    assert class_run["retrain"]["UA"] == 100  # a class never seen is never predicted
    assert class_run["original"]["UA"] < 20 and class_run["original"]["gap"] > 20
    assert class_run["sizes"]["forget"] + class_run["sizes"]["retain"] == class_run["sizes"]["train"]


@pytest.mark.parametrize("objective", ["ga", "rl", "wga", "undial"])
def test_class_wise_unlearning_raises_ua(class_run, objective):
    split = class_run["split"]
    before = score(class_run["model"], split, max_shadow=300)
    assert before == {k: class_run["original"][k] for k in METRICS}
    method = {"objective": objective, "steps": 30, "lr": 1e-2, "batch_size": 64, "optimizer": "sgd"}
    row = unlearn_and_score(class_run["model"], split, method, class_run["retrain"], 1.0, max_shadow=300)
    assert row["UA"] > before["UA"] + 50, (before, row)


def test_relearning_audit_on_every_model(class_run):
    """The attack (10% of class 3, the bench's settings) is scored for original and retrain; it leaves the model
    itself alone, and it does not make the original forget (training on class 3 only pushes towards class 3).
    (How much retrain regains is left to the benchmark: on digits' 15 rows this tiny CNN regains nothing.)"""
    orig, gold = class_run["original"], class_run["retrain"]
    for row in (orig, gold):
        assert set(RELEARN_METRICS) <= set(row)
        assert all(0 <= row[k] <= 100 for k in ("UA_held", "UA_relearn"))
        assert row["relearn_drop"] == pytest.approx(row["UA_held"] - row["UA_relearn"])
    assert gold["UA_held"] == 100
    assert abs(orig["UA_held"] - orig["UA"]) < 10  # the held-back 90% of the forget set looks like all of it
    assert orig["UA_relearn"] <= orig["UA_held"], orig
    assert gold["relearn_drop"] >= 0, gold
    again = relearn_score(class_run["model"], class_run["split"], RELEARN)
    assert again == {k: orig[k] for k in RELEARN_METRICS}  # seeded, and the model was not changed by the attack
    assert score(class_run["model"], class_run["split"], max_shadow=300) == {k: orig[k] for k in METRICS}
    method = {"objective": "ga", "steps": 30, "lr": 1e-2, "batch_size": 64, "optimizer": "sgd"}
    row = unlearn_and_score(class_run["model"], class_run["split"], method, gold, 1.0, max_shadow=300,
                            relearning=RELEARN)
    assert set(RELEARN_METRICS) <= set(row) and row["UA_held"] > orig["UA_held"]


SIDES = ("under-unlearned", "calibrated", "over-unlearned")


def test_unseen_rows_are_the_forgotten_class_for_class_wise(digits):
    assert {int(y) for _, y in unseen_rows(digits["test"], "class", 3)} == {3}
    assert unseen_rows(digits["test"], "random") == list(digits["test"])
    with pytest.raises(RecipeError, match="scenario"):
        unseen_rows(digits["test"], "bogus")


@pytest.fixture(scope="module")
def memorised(digits):
    """A constructed case with a membership signal to remove: 40 train rows with random labels (the forget set)
    that the original can only fit by memorising them, and unseen test rows with random labels (non-members)."""
    forget, retain = random_labels(digits["train"][:40], 1), list(digits["train"][40:600])
    split = {"train": forget + retain, "forget": forget, "retain": retain, "test": list(digits["test"])}
    original, _ = train_model(tiny_cnn, split["train"], {"epochs": 25, "batch_size": 64, "lr": 0.05}, seed=0)
    return split, original, random_labels(digits["test"], 2)


def test_calibrated_stopping_stops_early_and_never_trains_on_its_calibration_rows(memorised):
    """Gradient ascent with a budget far past the target: the fixed run ends over-unlearned (the attack now finds
    the forget rows worse than unseen ones), the calibrated one stops at a check before the budget. A hook records
    every input the model sees in training mode: the forget rows are among them, the calibration rows never."""
    split, model, unseen = memorised
    calibration, verdict = unseen[::2], unseen[1::2]
    assert membership(model, split["forget"], verdict, 0.05)["side"] == "under-unlearned"
    gold = score(model, split, max_shadow=300)
    seen: list[torch.Tensor] = []
    hook = model[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    method = {"objective": "ga", "steps": 120, "lr": 1e-2, "batch_size": 64, "optimizer": "sgd"}
    try:
        fixed = unlearn_and_score(model, split, method, gold, 1.0, max_shadow=300, unseen=verdict)
        trained = {x.numpy().tobytes() for batch in seen for x in batch}
        seen.clear()
        calibrated = unlearn_and_score(model, split, method, gold, 1.0, max_shadow=300, stop_at="indistinguishable",
                                       calibration=calibration, tolerance=0.05, check_every=5, unseen=verdict)
    finally:
        hook.remove()
    assert fixed["steps_run"] == 120 and "stopping" not in fixed
    assert fixed["side"] == "over-unlearned" and fixed["membership_auc"] < 0.45, fixed
    assert 5 <= calibrated["steps_run"] < 120 and calibrated["steps_run"] % 5 == 0, calibrated["stopping"]
    report = calibrated["stopping"]
    assert report["stopped_at"] == calibrated["steps_run"] and report["calibration_rows"] == len(calibration)
    assert report["verdict"] in SIDES and calibrated["side"] in SIDES
    assert calibrated["membership_auc"] > fixed["membership_auc"] + 0.03
    during = {x.numpy().tobytes() for batch in seen for x in batch}
    assert {ex[0].numpy().tobytes() for ex in split["forget"]} <= during | trained  # the hook sees training inputs
    assert not {ex[0].numpy().tobytes() for ex in calibration} & (during | trained)


def test_calibrated_stopping_rejects_bad_settings(class_run):
    method = {"objective": "ga", "steps": 5, "lr": 1e-2, "batch_size": 64, "optimizer": "sgd"}
    with pytest.raises(RecipeError, match="stop_at"):
        unlearn_and_score(class_run["model"], class_run["split"], method, class_run["retrain"], 1.0,
                          stop_at="reference")
    with pytest.raises(InputError, match="calibration"):
        unlearn_and_score(class_run["model"], class_run["split"], method, class_run["retrain"], 1.0,
                          stop_at="indistinguishable", calibration=class_run["split"]["test"][:1])
