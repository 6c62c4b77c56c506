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

from dataclasses import dataclass, field

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
    ids: list[int] = field(default_factory=list)  # train[k] is the dataset's training image ids[k]


@dataclass
class StreamStep:
    """One step of the stream as checked from the recipe: a learn step (index of its task) or a forget request."""

    kind: str  # "learn" | "forget"
    task: int | None = None  # learn: index into the tasks (one task per learn step)
    request: dict | None = None  # forget: {"step": n} | {"classes": [...]} | {"sample": share or count}


def stream_steps(recipe) -> list[StreamStep]:
    """The stream's steps, checked without data: every step learn or forget, every forget request well formed
    and naming something learned by an EARLIER step (a class of an earlier learn step, an earlier learn step)."""
    if isinstance(recipe.stream, str):
        if recipe.stream not in SCENARIOS:
            raise RecipeError(f"stream: unknown scenario '{recipe.stream}' (known: {', '.join(sorted(SCENARIOS))}; "
                              "or give a list of steps)")
        dataset, steps = SCENARIOS[recipe.stream]
        if recipe.dataset != dataset:
            raise RecipeError(f"dataset: scenario {recipe.stream} streams {dataset}, not {recipe.dataset}")
        return [StreamStep("learn", task=i) for i in range(len(steps))]
    if not recipe.stream:
        raise RecipeError("stream: an empty list of steps; give at least one step or a scenario name")
    out: list[StreamStep] = []
    learned: set[int] = set()
    for i, step in enumerate(recipe.stream):
        if step.learn is not None and step.forget is not None:
            raise RecipeError(f"stream[{i}]: give learn or forget in one step, not both")
        if step.learn is not None:
            out.append(StreamStep("learn", task=sum(s.kind == "learn" for s in out)))
            learned |= set(step.learn.classes)
            continue
        if step.forget is None:
            raise RecipeError(f"stream[{i}]: an empty step; give learn: {{classes: [...]}} or forget: {{...}}")
        out.append(StreamStep("forget", request=_forget_request(i, step.forget, out, learned)))
    if not any(s.kind == "learn" for s in out):
        raise RecipeError("stream: no learn step; a stream learns before it forgets")
    return out


def _forget_request(i: int, spec, earlier: list[StreamStep], learned: set[int]) -> dict:
    where = f"stream[{i}].forget"
    given = {k: v for k, v in spec.model_dump().items() if v is not None}
    if not given:
        raise RecipeError(f"{where}: an empty forget step; give one of step, classes or sample")
    if len(given) > 1:
        raise RecipeError(f"{where}: give one of step, classes or sample, not {' and '.join(sorted(given))}")
    key, value = next(iter(given.items()))
    if key == "step":
        if value > i or earlier[value - 1].kind != "learn":
            what = "this step or a later one" if value > i else f"stream[{value - 1}], a forget step"
            raise RecipeError(f"{where}.step: {value} is not an earlier learn step (steps count from 1; step "
                              f"{value} is {what})")
    elif key == "classes":
        if not value:
            raise RecipeError(f"{where}.classes: empty; name at least one class to forget")
        never = [c for c in value if c not in learned]
        if never:
            raise RecipeError(f"{where}.classes: class {never[0]} was never learned before this step (learned: "
                              f"{sorted(learned)})")
    elif not learned:
        raise RecipeError(f"{where}.sample: nothing is learned before this step; a forget step follows a learn step")
    elif isinstance(value, float) and value >= 1 and not value.is_integer():
        raise RecipeError(f"{where}.sample: {value}: give a share below 1 (e.g. 0.1) or a whole count (e.g. 50)")
    elif isinstance(value, float) and value >= 1:
        value = int(value)
    return {key: value}


def stream_classes(recipe) -> list[list[int]]:
    """The classes of each learn step, from the scenario name or the step list (no data is read)."""
    stream_steps(recipe)
    if isinstance(recipe.stream, str):
        return [list(s) for s in SCENARIOS[recipe.stream][1]]
    return [list(step.learn.classes) for step in recipe.stream if step.learn is not None]


@dataclass
class Resolved:
    """A stream step with its examples: `ids` are the training images (indices into the dataset's training set)
    a learn step walks or a forget step forgets; `learned` the images learned and not forgotten after the step,
    `forgotten` all images forgotten so far, `forgotten_classes` the learned classes with no image left."""

    step: StreamStep
    ids: list[int]
    learned: frozenset[int]
    forgotten: frozenset[int]
    forgotten_classes: frozenset[int]


def resolve(steps: list[StreamStep], tasks: list[Task], seed: int) -> list[Resolved]:
    """Every step's images, and the checks that need them: the rules of forgetting in a stream.

    * A forget step removes images from what is learned: `classes` every learned image of those classes,
      `step` every image that learn step walked, `sample` a seeded random share or count of the learned images
      not yet forgotten (the draw depends on the seed and the step only).
    * Forgotten images are never learned again: a later learn step walks its images minus those forgotten by a
      `step` or `sample` request (deletion requests of those very images). One exception: a later learn step that
      names a class forgotten by a `classes` request learns that class again, its images included (a new request
      to know the class supersedes the old one to forget it); a `step` forget covering them keeps them out.
    * Errors (one line naming stream[i]): a forget step with nothing left to forget, a sample larger than what
      is learned, a learn step whose images were all forgotten.
    """
    label = {i: y for task in tasks for i, (_, y) in zip(task.ids, task.train)}
    learned: set[int] = set()
    permanent: set[int] = set()  # forgotten by step / sample requests: never back
    by_class: set[int] = set()  # forgotten by class requests: back when a later learn step names the class
    walked: dict[int, list[int]] = {}  # stream index -> images the learn step walked
    ever: set[int] = set()
    out = []
    for i, step in enumerate(steps):
        where = f"stream[{i}]"
        if step.kind == "learn":
            task = tasks[step.task]
            ids = [j for j in task.ids if j not in permanent]
            if not ids:
                raise RecipeError(f"{where}.learn.classes: every training image of classes {task.classes} was "
                                  "forgotten earlier; forgotten images are never learned again")
            by_class -= set(ids)
            learned |= set(ids)
            walked[i] = ids
            ever |= {label[j] for j in ids}
        else:
            (key, value), = step.request.items()
            if key == "classes":
                ids = sorted(j for j in learned if label[j] in value)
                left = {label[j] for j in ids}
                empty = [c for c in value if c not in left]
                if empty:
                    raise RecipeError(f"{where}.forget.classes: class {empty[0]} has nothing left to forget (its "
                                      "learned images were forgotten earlier)")
                by_class |= set(ids)
            elif key == "step":
                ids = sorted(j for j in walked[value - 1] if j in learned)
                if not ids:
                    raise RecipeError(f"{where}.forget.step: step {value}'s images were all forgotten earlier; "
                                      "nothing left to forget")
                permanent |= set(walked[value - 1])
                by_class -= set(walked[value - 1])
            else:
                pool = sorted(learned)
                n = value if isinstance(value, int) else round(value * len(pool))
                if n > len(pool):
                    raise RecipeError(f"{where}.forget.sample: {value} is more than the {len(pool)} learned images "
                                      "not yet forgotten")
                if n == 0:
                    raise RecipeError(f"{where}.forget.sample: {value} of {len(pool)} learned images rounds to none")
                g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 + i)
                ids = sorted(pool[k] for k in torch.randperm(len(pool), generator=g)[:n].tolist())
                permanent |= set(ids)
            learned -= set(ids)
        forgotten = frozenset(permanent | by_class)
        out.append(Resolved(step, ids, frozenset(learned), forgotten,
                            frozenset(ever - {label[j] for j in learned})))
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
    at = list(range(len(steps))) if isinstance(recipe.stream, str) else \
        [i for i, step in enumerate(recipe.stream) if step.learn is not None]  # each task's place in the stream
    for i, classes in zip(at, steps):
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
        task.ids = list(task.train)
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
