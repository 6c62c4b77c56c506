"""Streams: the named scenarios and a recipe's list of steps, resolved to per-step training and test examples.

`split_fashion_mnist` (the online class-incremental benchmark of ER-ACE and LAS, on Fashion-MNIST): 5 tasks of 2
classes in the fixed order (0, 1), (2, 3), ..., (8, 9); each task's 12,000 training images arrive once, in a
seeded order, in batches of `training.batch_size` (10 by default; the issue allows 10, or 32 with 32 replayed,
and the LAS authors' script runs 32 / 32: set batch_size and replay_batch_size to 32 for that); the test set of
a task is its classes' 2,000 test images. `split_digits` is the same shape on scikit-learn's 8x8 digits
(1,797 images): seconds to run, for tries and tests.

`blurry_fashion_mnist` (and `blurry_digits`): the blurry-M variant with M = 10 ("Blurry10" of Bang et al., CVPR
2021, "Rainbow Memory", after Aljundi et al., 2019; as Koh et al., ICLR 2022, describe blurry-M): the same five tasks
with the same two major classes each, but M% of each task's training images come from the other tasks' classes.
Made here by moving, for every class, a seeded random M% of its training images out of its own task, split evenly
over the other tasks; every image still arrives exactly once, and with Fashion-MNIST's balanced classes each task
keeps 12,000 images, 1,200 of them (150 per minor class) from the other eight classes. A task's test images are its
two major classes' (R[i][j] stays "task j's classes after step i"). Where others differ: the LAS authors'
blurry datasets follow Koh et al.'s i-Blurry-N-M (N% of the classes disjoint, the rest blurry with M images per
minority class); blurry-M as here has no disjoint classes, which is the issue's "overlapping classes" variant of
this stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malleable.errors import InputError, RecipeError

SPLIT = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
SCENARIOS = {"split_fashion_mnist": ("fashion_mnist", SPLIT), "split_digits": ("digits", SPLIT),
             "blurry_fashion_mnist": ("fashion_mnist", SPLIT), "blurry_digits": ("digits", SPLIT)}
BLURRY = {"blurry_fashion_mnist": 0.10, "blurry_digits": 0.10}  # the M of blurry-M, as a fraction


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
        tasks.append(Task(classes, tr, [(test.images[j], int(test.labels[j])) for j in te]))
    blur = BLURRY.get(recipe.stream) if isinstance(recipe.stream, str) else None
    if blur:
        for task, moved in zip(tasks, blurred([t.train for t in tasks], train.labels, blur, recipe.seed)):
            task.train = moved
    for task in tasks:
        task.train = [(train.images[j], int(train.labels[j])) for j in task.train]
    return tasks, num_classes, tuple(train.images.shape[1:])


def blurred(per_task: list[list[int]], labels: torch.Tensor, fraction: float, seed: int) -> list[list[int]]:
    """Blurry-M: of every class's training indices in `per_task`, a seeded random `fraction` leaves its own task,
    dealt evenly round the other tasks (each class starts the round at its own offset, so that remainders spread).
    Sorted indices per task."""
    out: list[list[int]] = [[] for _ in per_task]
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    for t, indices in enumerate(per_task):
        others = [u for u in range(len(per_task)) if u != t]
        for c in sorted({int(labels[i]) for i in indices}):
            mine = [i for i in indices if int(labels[i]) == c]
            mine = [mine[k] for k in torch.randperm(len(mine), generator=g).tolist()]
            n = round(fraction * len(mine)) if others else 0
            out[t] += mine[n:]
            for j, i in enumerate(mine[:n]):  # dealt round the other tasks, class c starting at its own offset
                out[others[(j + c) % len(others)]].append(i)
    return [sorted(task) for task in out]
