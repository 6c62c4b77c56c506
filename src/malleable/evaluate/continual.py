"""Continual-learning metrics over the accuracy matrix; pure functions, no model.

``R[i][j]`` is the score on task j (0-based) after stream step i, with row 0 the STARTING model (before any
step): R has T + 1 rows and T columns, and task j is learned at step j + 1, so ``R[j + 1][j]`` is task j just
after it was learned. Scores are whatever the caller measured (accuracy in percent here).

* average accuracy (Chaudhry et al. 2018): the mean of the last row over all T tasks;
  `average_accuracy(R, i)` is the mean over the i tasks learned by step i;
* average incremental accuracy (Rebuffi et al., iCaRL): the mean of average_accuracy(R, i) over i = 1..T;
* forgetting (Chaudhry et al. 2018): for each task but the last, the best score it had at any step from its
  own until T - 1, minus its final score; averaged over those T - 1 tasks;
* backward transfer (Lopez-Paz & Ranzato, GEM): mean over the first T - 1 tasks of R[T][j] - R[j + 1][j];
* forward transfer (GEM): mean over tasks 2..T of R[j][j] - R[0][j] (0-based j = 1..T-1): the score on task j
  just BEFORE it is learned, against the STARTING model's score on it (GEM compares with a random-init model;
  here it is the model the stream started from, as the issue asks);
* plasticity: the mean of R[j + 1][j], how well each task is learned when it arrives.

With one task (T = 1) forgetting, backward and forward transfer are undefined and returned as None.

A cell may be None: a stream with forget steps leaves a task's column None once all its classes are forgotten
on purpose (continual/engine.py). Every mean then runs over the terms whose cells are defined (a task's
forgetting needs its final score; its best earlier score is over its defined cells), and is None with no term.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _mean(terms) -> float | None:
    terms = [t for t in terms if t is not None]
    return sum(terms) / len(terms) if terms else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _tasks(R: Matrix) -> int:
    T = len(R[0]) if R else 0
    if T == 0 or len(R) != T + 1 or any(len(row) != T for row in R):
        raise ValueError(f"accuracy matrix: expected T + 1 rows of T scores (row 0 the starting model), got "
                         f"{len(R)} rows of {[len(r) for r in R]}")
    return T


def average_accuracy(R: Matrix, step: int | None = None) -> float | None:
    """Mean score over the tasks learned by `step` (default the last step: all tasks)."""
    T = _tasks(R)
    i = T if step is None else step
    if not 1 <= i <= T:
        raise ValueError(f"step {i}: expected 1..{T}")
    return _mean(R[i][:i])


def average_incremental_accuracy(R: Matrix) -> float | None:
    T = _tasks(R)
    return _mean(average_accuracy(R, i) for i in range(1, T + 1))


def forgetting(R: Matrix) -> float | None:
    T = _tasks(R)
    if T < 2:
        return None
    return _mean(_diff(_mean([max((R[i][j] for i in range(j + 1, T) if R[i][j] is not None), default=None)]),
                       R[T][j]) for j in range(T - 1))


def backward_transfer(R: Matrix) -> float | None:
    T = _tasks(R)
    if T < 2:
        return None
    return _mean(_diff(R[T][j], R[j + 1][j]) for j in range(T - 1))


def forward_transfer(R: Matrix) -> float | None:
    T = _tasks(R)
    if T < 2:
        return None
    return _mean(_diff(R[j][j], R[0][j]) for j in range(1, T))


def plasticity(R: Matrix) -> float | None:
    T = _tasks(R)
    return _mean(R[j + 1][j] for j in range(T))


def summary(R: Matrix) -> dict[str, float | None]:
    """Every metric above, by name."""
    return {"average_accuracy": average_accuracy(R), "average_incremental_accuracy": average_incremental_accuracy(R),
            "forgetting": forgetting(R), "backward_transfer": backward_transfer(R),
            "forward_transfer": forward_transfer(R), "plasticity": plasticity(R)}
