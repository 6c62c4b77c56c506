"""DPO and IdkDPO: unlearning as a preference, the forget answer the losing one and an alternative the winner.

DPO (Rafailov et al., "Direct Preference Optimization", 2023) as open-unlearning runs it for unlearning
(src/trainer/unlearn/dpo.py, `compute_dpo_loss` in src/trainer/utils.py):
-(2 / beta) * logsigmoid(beta * ((log p(w|x) - log p_ref(w|x)) - (log p(l|x) - log p_ref(l|x)))), log p summed over
the answer's tokens, l the forget answer, w its alternative; plus GradDiff's retain term. Defaults are its
configs/trainer/DPO.yaml: beta 0.1, gamma 1, alpha 1, NLL retain term.

* `dpo`: the alternative is data: each forget row's `alternate_field` (default "alternate"), as open-unlearning's
  QAwithAlternateDataset reads one. The forget benchmark's protocol gives each question its first perturbed
  answer (the paraphrase's sentence with a wrong value).
* `idkdpo`: the alternative is a refusal (TOFU's "IDK" preference optimisation; open-unlearning runs its DPO
  trainer on TOFU_QA_forget_idk for it). The refusals are our own list below, one drawn per forget example
  with a seeded RNG and kept for the whole run; open-unlearning reads its data/idk.jsonl and draws afresh each
  time an example is loaded, so each epoch may pair a question with another refusal. The refusal is tokenised
  as the completion of the example's own prompt (its prompt tokens, then the refusal and EOS), exactly as
  `learn.data.encode_pair` builds a prompt/completion row.

Both are for language models only (a preference between two answers needs answers); a classifier task is
refused before any work. The pairing is attached to the examples by `examples` (it needs the tokenizer) and
looked up per step by the example's tokens, so the engine's seeded batches need not know about it.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from malleable.errors import InputError
from malleable.forget.graddiff import RETAIN_PARAMS, GradDiff
from malleable.forget.losses import sequence_logprob
from malleable.forget.registry import objective
from malleable.params import Param

# Written for malleable; varied in length and wording so the model is not taught one fixed string.
REFUSALS = (
    "I don't know.",
    "I'm not sure about that.",
    "I can't answer that question.",
    "I have no information about that.",
    "That is not something I know.",
    "I'm afraid I can't say.",
    "I don't have that information.",
    "Sorry, I can't help with that one.",
    "I have no idea, I'm afraid.",
    "I don't know the answer to that.",
    "Nothing I know answers that.",
    "That's beyond what I can tell you.",
    "I couldn't tell you.",
    "I'm unable to answer this.",
    "No idea, sorry.",
    "I don't have an answer for you there.",
    "I would only be guessing, so I'd rather say I don't know.",
    "Unfortunately, that is something I don't know.",
    "I can't recall anything about that.",
    "That question is outside what I know.",
)


def refusals(n: int, seed: int) -> list[str]:
    """`n` refusals drawn from `REFUSALS` with a seeded RNG: the "I don't know" answers, generated offline."""
    rng = random.Random(seed)
    return [rng.choice(REFUSALS) for _ in range(n)]


class Paired(tuple):
    """An (input_ids, labels) example carrying its preferred alternative, `alternate` (the same shape)."""

    alternate: tuple

    def __new__(cls, item: tuple, alternate: tuple):
        self = super().__new__(cls, item)
        self.alternate = alternate
        return self


def key(ids, labels) -> tuple:
    return tuple(ids), tuple(labels)


def row_keys(part: dict[str, torch.Tensor]) -> list[tuple]:
    """The key of each row of a left-padded part: its real tokens and their labels."""
    rows = []
    for ids, labels, mask in zip(part["input_ids"].tolist(), part["labels"].tolist(),
                                 part["attention_mask"].bool().tolist()):
        rows.append(key([t for t, m in zip(ids, mask) if m], [y for y, m in zip(labels, mask) if m]))
    return rows


@objective("dpo", kinds=("causal_lm",), needs_reference=True, params={
    "beta": Param(0.1, "inverse temperature of the preference", gt=0),
    "alternate_field": Param("alternate", "the forget rows' field holding the preferred answer"),
    **RETAIN_PARAMS,
})
class DPO(GradDiff):
    """DPO: prefer each forget question's alternative answer to its forget answer (reference-relative), + retain."""

    def examples(self, forget, tokenizer, *, seed, records=None, chat_template="auto"):
        from malleable.learn.data import encode_pair, uses_chat_template

        field = self.p["alternate_field"]
        if records is None:
            raise InputError(f"forget set: {self.name} needs each forget row's '{field}' answer and no rows were given")
        chat = uses_chat_template(tokenizer, chat_template)
        alternates = {}
        for at, r in enumerate(records, 1):
            if not isinstance(r.get(field), str) or not r[field].strip():
                raise InputError(f"forget set: row {at} has no '{field}' text; {self.name} trains towards it in "
                                 f"place of the completion (or use idkdpo, whose alternative is a refusal)")
            if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str):
                alternates[key(*encode_pair(tokenizer, r["prompt"], r["completion"], chat))] = \
                    encode_pair(tokenizer, r["prompt"], r[field], chat)
        unmatched = sum(key(*item) not in alternates for item in forget)
        if unmatched:
            raise InputError(f"forget set: {unmatched} example(s) match no forget row given with them")
        return [Paired(item, alternates[key(*item)]) for item in forget]

    def setup(self, model, forget, retain, collate) -> None:
        super().setup(model, forget, retain, collate)
        missing = sum(not isinstance(item, Paired) for item in forget)
        if missing:
            raise InputError(f"forget set: {missing} example(s) without an alternative answer; {self.name} needs "
                             f"them attached by its `examples` (malleable.forget.dpo.Paired)")
        self.alternates = {key(*item): item.alternate for item in forget}
        self.collate = collate

    def forget_term(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        device = part["input_ids"].device
        win = {k: v.to(device) for k, v in self.collate([self.alternates[k] for k in row_keys(part)]).items()}
        ratio_w = sequence_logprob(model, win)[0] - self.reference(sequence_logprob, win)[0]
        ratio_l = sequence_logprob(model, part)[0] - self.reference(sequence_logprob, part)[0]
        beta = self.p["beta"]
        return -(2 / beta) * F.logsigmoid(beta * (ratio_w - ratio_l)).mean()


@objective("idkdpo", kinds=("causal_lm",), needs_reference=True, params={
    "beta": Param(0.1, "inverse temperature of the preference", gt=0),
    **RETAIN_PARAMS,
})
class IdkDPO(DPO):
    """IdkDPO: DPO whose preferred answer to each forget question is a refusal ("I don't know"), + retain."""

    def examples(self, forget, tokenizer, *, seed, records=None, chat_template="auto"):
        tokens = {r: tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r in REFUSALS}
        out = []
        for (ids, labels), refusal in zip(forget, refusals(len(forget), seed)):
            prompt = next((i for i, y in enumerate(labels) if y != -100), len(labels))
            out.append(Paired((ids, labels), (ids[:prompt] + tokens[refusal], [-100] * prompt + tokens[refusal])))
        return out
