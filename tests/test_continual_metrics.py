"""evaluate/continual on hand-made accuracy matrices, every value worked out by hand in the comments."""

import pytest

from malleable.evaluate.continual import (average_accuracy, average_incremental_accuracy, backward_transfer,
                                          forgetting, forward_transfer, plasticity, summary)

# rows: start, after step 1, 2, 3; columns: tasks 1, 2, 3
R = [[10, 20, 30],
     [80, 25, 35],
     [60, 90, 40],
     [50, 70, 95]]


def test_average_accuracy():
    assert average_accuracy(R) == pytest.approx((50 + 70 + 95) / 3)  # 71.666...
    assert average_accuracy(R, 1) == 80
    assert average_accuracy(R, 2) == 75  # (60 + 90) / 2


def test_average_incremental_accuracy():
    assert average_incremental_accuracy(R) == pytest.approx((80 + 75 + 215 / 3) / 3)


def test_forgetting_takes_the_best_earlier_score():
    # task 1: best of steps 1..2 is 80, final 50 -> 30; task 2: best of step 2 is 90, final 70 -> 20
    assert forgetting(R) == pytest.approx((30 + 20) / 2)


def test_backward_transfer():
    # task 1: 50 - 80 = -30; task 2: 70 - 90 = -20
    assert backward_transfer(R) == pytest.approx(-25)


def test_forward_transfer_is_against_the_starting_model():
    # task 2 before it is learned (row 1) 25 vs start 20 -> 5; task 3 (row 2) 40 vs 30 -> 10
    assert forward_transfer(R) == pytest.approx(7.5)


def test_plasticity():
    assert plasticity(R) == pytest.approx((80 + 90 + 95) / 3)


def test_forgetting_differs_from_minus_bwt_when_a_task_improves_first():
    # task 1 learned to 40, rises to 70 at step 2, ends at 60: forgetting 10, backward transfer +20
    M = [[0, 0, 0], [40, 0, 0], [70, 80, 0], [60, 80, 90]]
    assert forgetting(M) == pytest.approx((10 + 0) / 2)
    assert backward_transfer(M) == pytest.approx((20 + 0) / 2)


def test_one_task_and_bad_shapes():
    s = summary([[5], [90]])
    assert s["average_accuracy"] == 90 and s["plasticity"] == 90
    assert s["forgetting"] is None and s["backward_transfer"] is None and s["forward_transfer"] is None
    with pytest.raises(ValueError, match="T \\+ 1 rows"):
        average_accuracy([[1, 2], [3, 4]])
    with pytest.raises(ValueError):
        average_accuracy(R, 4)
