"""Streams: the named scenarios and a recipe's list of steps, resolved to per-step training and test examples.

`split_fashion_mnist` (the online class-incremental benchmark of ER-ACE and LAS, on Fashion-MNIST): 5 tasks of 2
classes in the fixed order (0, 1), (2, 3), ..., (8, 9); each task's 12,000 training images arrive once, in a
seeded order, in batches of `training.batch_size` (10 by default; the issue allows 10, or 32 with 32 replayed,
and the LAS authors' script runs 32 / 32: set batch_size and replay_batch_size to 32 for that); the test set of
a task is its classes' 2,000 test images. `split_digits` is the same shape on scikit-learn's 8x8 digits
(1,797 images): seconds to run, for tries and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malleable.errors import InputError, RecipeError

SPLIT = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
SCENARIOS = {"split_fashion_mnist": ("fashion_mnist", SPLIT), "split_digits": ("digits", SPLIT)}


@dataclass
class Task:
    classes: list[int]
    train: list[tuple[torch.Tensor, int]]
    test: list[tuple[torch.Tensor, int]]


def stream_classes(recipe) -> list[list[int]]:
    """The classes of each learn step, from the scenario name or the step list (no data is read)."""
    if isinstance(recipe.stream, str):
        if recipe.stream not in SCENARIOS:
            raise RecipeError(f"stream: unknown scenario '{recipe.stream}' (known: {', '.join(sorted(SCENARIOS))}; "
                              "or give a list of steps)")
        dataset, steps = SCENARIOS[recipe.stream]
        if recipe.dataset != dataset:
            raise RecipeError(f"dataset: scenario {recipe.stream} streams {dataset}, not {recipe.dataset}")
        return [list(s) for s in steps]
    if not recipe.stream:
        raise RecipeError("stream: an empty list of steps; give at least one step or a scenario name")
    out = []
    for i, step in enumerate(recipe.stream):
        if step.forget is not None:
            raise RecipeError(f"stream[{i}].forget: forget steps are not supported yet (learning-unlearning cycles "
                              "come with ug_clu); this version runs learn steps only")
        if step.learn is None:
            raise RecipeError(f"stream[{i}]: an empty step; give learn: {{classes: [...]}}")
        out.append(list(step.learn.classes))
    return out


def _per_class(labels: torch.Tensor, classes: list[int], limit: int | None) -> list[int]:
    """Indices of `classes` in file order, at most `limit` of each class."""
    keep, count = [], dict.fromkeys(classes, 0)
    for i, y in enumerate(labels.tolist()):
        if y in count and (limit is None or count[y] < limit):
            count[y] += 1
            keep.append(i)
    return keep


def load_tasks(recipe, steps: list[list[int]]) -> tuple[list[Task], int, tuple[int, int, int]]:
    """(tasks, number of classes, image shape (C, H, W)) of the recipe's dataset, one task per step."""
    from malleable.data.vision import load_image_dataset

    data = load_image_dataset(recipe.dataset, recipe.seed)
    train, test = data["train"], data["test"]
    num_classes = len(train.classes)
    t = recipe.training
    tasks = []
    for i, classes in enumerate(steps):
        bad = [c for c in classes if c >= num_classes]
        if bad:
            raise RecipeError(f"stream[{i}].learn.classes: class {bad[0]} is not one of {recipe.dataset}'s "
                              f"{num_classes} classes (0..{num_classes - 1})")
        tr = _per_class(train.labels, classes, t.max_per_class)
        te = _per_class(test.labels, classes, t.test_per_class)
        if not tr or not te:
            raise InputError(f"stream[{i}]: {recipe.dataset} has no {'training' if not tr else 'test'} images of "
                             f"classes {classes}")
        tasks.append(Task(classes, [(train.images[j], int(train.labels[j])) for j in tr],
                          [(test.images[j], int(test.labels[j])) for j in te]))
    return tasks, num_classes, tuple(train.images.shape[1:])
