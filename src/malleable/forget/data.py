"""Examples for the unlearning loop: classifier (tensor, class index) pairs, and walking a set in batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from malleable.errors import InputError


def tensor_examples(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Pairs (x[i], int(y[i])): the example list `unlearn` and `fit` take for classifiers."""
    return list(zip(x, y.tolist()))


def collate_classification(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """A classifier part: ``x`` stacked, ``labels`` a 1-D long tensor (the model is called as model(x))."""
    return {"x": torch.stack([x for x, _ in items]), "labels": torch.tensor([y for _, y in items])}


def set_batches(sets: dict[str, Sequence | None], collate: Callable, batch_size: int,
                user: str) -> Callable[[str], Iterator[dict]]:
    """``batches(which)``: walks the named set once in collated parts (what masks and Fisher estimates read);
    asking for a set that was not given is an InputError naming `user`."""

    def batches(which: str) -> Iterator[dict]:
        data = sets[which]
        if not data:
            raise InputError(f"{which} set: {user} needs {which} data and none was given")
        for i in range(0, len(data), batch_size):
            yield collate(list(data[i:i + batch_size]))

    return batches


def prompt_completion_records(rows: list[dict], spec) -> list[dict]:
    """A data file's rows with the recipe's prompt and completion fields as "prompt" and "completion" (every
    other field kept): what an objective's `examples` hook reads beside the tokenised examples."""
    return [{**r, "prompt": r.get(spec.prompt_field), "completion": r.get(spec.completion_field)} for r in rows]
