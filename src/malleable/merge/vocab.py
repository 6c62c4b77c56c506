"""Vocabulary merging: an output tokenizer (a model's, the base's, or the union of the inputs'), and the embedding
and lm_head rows of every model laid out over it before the rule merges them, with mergekit 0.1.5's rules
(``tokenizer/build.py``, ``tokenizer/embed.py: PermutedVocabulary``), written anew:

* a token a model has keeps that model's row;
* a token a model lacks gets a default row, the same for every model: the `tokens:` entry's source if the recipe
  gives one (a model's row for the token, another token's row, or zeros); else the row of the one model that has
  it; zeros if none has it; the base's row if the base has it; else the mean of the rows of the models that have
  it. `force: true` gives every model the default row, also those that have the token;
* rows past the vocabulary (`pad_to_multiple_of`) are each model's mean row over the vocabulary.

The rule then merges the aligned rows like any other tensor, one tensor at a time. Where we differ from mergekit:
the union lists new tokens in input order (mergekit walks a set of models and each tokenizer's hash-ordered
vocabulary, so its ids for tokens the base lacks can change between runs); without a base, the first input's
tokenizer starts the union (mergekit: the first of a set, i.e. any); a tokenizer entry at or past its model's
vocab_size counts as absent (mergekit stops with a KeyError). Refused with one line: a base (or source) tokenizer
with entries past its model's vocab_size (mergekit strips them, BPE only), and vocabularies whose ids have holes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from malleable.errors import InputError, RecipeError

# tensors with one row per token (axis 0), as mergekit's architectures mark them (vocabulary_axis 0)
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|word_embeddings|embed_out|embed_in)\.weight$")


def is_vocab_tensor(name: str) -> bool:
    return VOCAB_TENSOR.search(name) is not None


def _load(root: Path) -> Any:
    from transformers import AutoTokenizer

    from malleable.io.quiet import quiet_transformers

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(root, local_files_only=True)


def _vocab_size(config: dict | None, rows: int | None, fallback: int) -> int:
    if config and isinstance(config.get("vocab_size"), int):
        return config["vocab_size"]
    return rows if rows is not None else fallback


@dataclass
class Vocab:
    """The output vocabulary and, per model (the merge's order: base first when it is read, then the inputs),
    where each output row comes from."""

    tokenizer: Any
    n_tokens: int
    size: int  # rows written: n_tokens padded up to pad_to_multiple_of
    rows: list[torch.Tensor]  # per model: its row for each output token, -1 where the default row goes
    default_ids: torch.Tensor  # output tokens that have a default row
    # per model: (positions in default_ids, that model's rows, weights) summed into the default rows
    default_from: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def align(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every model's tensor (rows = its own vocabulary) laid out over the output vocabulary, float32."""
        hidden = tensors[0].shape[1:]
        defaults = torch.zeros((len(self.default_ids), *hidden), dtype=torch.float32)
        for t, (pos, rows, w) in zip(tensors, self.default_from):
            if len(pos):
                defaults.index_add_(0, pos, t.index_select(0, rows) * w.view(-1, *([1] * len(hidden))))
        out = []
        for t, rows in zip(tensors, self.rows):
            new = torch.empty((self.size, *hidden), dtype=torch.float32)
            have = rows >= 0
            new[:self.n_tokens][have] = t.index_select(0, rows[have])
            own = torch.zeros(self.n_tokens, dtype=torch.bool)
            own[have] = True
            need = ~own[self.default_ids]
            new[self.default_ids[need]] = defaults[need]
            if self.size > self.n_tokens:
                new[self.n_tokens:] = new[:self.n_tokens].mean(dim=0)
            out.append(new)
        return out


def _union(start: Any, tokenizers: list[Any], sizes: list[int]) -> Any:
    """`start` (reloaded, so the caller's copy is untouched) plus every other tokenizer's tokens it lacks: the
    regular ones first, then the added (special) ones with their settings, as mergekit's union; inputs in order,
    each tokenizer's tokens by id."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        start.save_pretrained(tmp)
        out = _load(Path(tmp))
    have = set(out.get_vocab())
    regular: dict[str, None] = {}  # ordered set
    added: dict[str, Any] = {}
    for tok, size in zip(tokenizers, sizes):
        decoder = {i: a for i, a in tok.added_tokens_decoder.items() if i < size}
        contents = {a.content for a in tok.added_tokens_decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in contents and t not in have:
                regular.setdefault(t)
        for i in sorted(decoder):
            added.setdefault(decoder[i].content, decoder[i])
    plain = [t for t in regular if t not in added]
    if plain:
        out.add_tokens(plain)
    new_added = [a for c, a in added.items() if c not in have]
    if new_added:
        out.add_tokens(new_added)
    return out


def plan_vocab(spec: Any, members: list[tuple[Path, dict | None, int | None]], base_index: int | None,
               start_index: int) -> Vocab:
    """The output vocabulary for recipe section `spec` (`tokenizer:`). `members` are the merged models (folder,
    config.json, rows of its embedding), `base_index` the one whose row a shared token takes (None: no base),
    `start_index` the one whose tokenizer `base` names and the union starts from."""
    tokenizers, sizes, vocabs = [], [], []
    for root, cfg, rows in members:
        try:
            tok = _load(root)
        except Exception:  # noqa: BLE001  (mergekit: a model without a tokenizer is taken to share the start's)
            tok = None
        tokenizers.append(tok)
    start = tokenizers[start_index]
    if start is None:
        raise InputError(f"{members[start_index][0]}: tokenizer: cannot load its tokenizer, which the output "
                         "vocabulary starts from")
    for (root, cfg, rows), tok in zip(members, tokenizers):
        vocab = (tok or start).get_vocab()
        sizes.append(_vocab_size(cfg, rows, len(vocab)))
        vocabs.append(vocab)
    s_root = members[start_index][0]
    if max(vocabs[start_index].values()) >= sizes[start_index]:
        raise InputError(f"{s_root}: tokenizer: has entries past the model's vocab_size {sizes[start_index]}; "
                         "a tokenizer larger than its embedding is not supported for vocabulary merging")
    source = spec.source
    if source == "base":
        out = start
    elif source == "union":
        out = _union(start, [t or start for t in tokenizers], sizes)
    else:
        try:
            out = _load(Path(source))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{source}: tokenizer.source: cannot load its tokenizer ({e})") from None
    extra = [t for t in spec.tokens if t not in out.get_vocab()]
    if extra:
        out.add_tokens(extra)
    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise InputError(f"{source}: tokenizer.source: the output vocabulary's ids are not 0..{n - 1}; not supported")
    size = n
    if spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        size = n + spec.pad_to_multiple_of - n % spec.pad_to_multiple_of
    roots = [Path(r).resolve() for r, _, _ in members]

    def member(path: Path, where: str) -> int:
        p = Path(path).resolve()
        if p not in roots:
            raise RecipeError(f"tokenizer.tokens.{where}: {path} is not one of the merged models")
        return roots.index(p)

    for t, cfg in spec.tokens.items():  # named models must be merged ones, also where the entry ends up unused
        src = cfg.source
        if src is not None and getattr(src, "kind", None) != "zero":
            member(getattr(src, "model", src), f"{t}.source")
    rows = [[-1] * n for _ in members]
    for t, i in vocab.items():
        for m, (v, s) in enumerate(zip(vocabs, sizes)):
            j = v.get(t, -1)
            rows[m][i] = j if j < s else -1
    # default rows: token id -> [(model, row, weight)]
    defaults: dict[int, list[tuple[int, int, float]]] = {}
    forced = set()
    for t, i in vocab.items():
        have = [m for m in range(len(members)) if rows[m][i] >= 0]
        cfg = spec.tokens.get(t)
        if cfg is not None and cfg.force:
            forced.add(i)
        if cfg is not None and (cfg.force or len(have) < len(members)):
            src = cfg.source
            if src is None:
                raise RecipeError(f"tokenizer.tokens.{t}: the token is missing from a model (or forced), so it "
                                  "needs a source")
            if getattr(src, "kind", None) == "zero":
                defaults[i] = []
            elif getattr(src, "kind", None) == "model_token":
                m = member(src.model, f"{t}.source.model")
                j = src.token_id if src.token_id is not None else vocabs[m].get(src.token, -1)
                if not 0 <= j < sizes[m] or (members[m][2] is not None and j >= members[m][2]):
                    what = src.token_id if src.token_id is not None else repr(src.token)
                    raise RecipeError(f"tokenizer.tokens.{t}.source: token {what} is not in {src.model}'s "
                                      "vocabulary")
                defaults[i] = [(m, j, 1.0)]
            else:
                m = member(src, f"{t}.source")
                if rows[m][i] < 0:
                    raise RecipeError(f"tokenizer.tokens.{t}.source: {members[m][0]} has no token {t!r}")
                defaults[i] = [(m, rows[m][i], 1.0)]
        elif len(have) == len(members):
            continue
        elif len(have) == 1:
            defaults[i] = [(have[0], rows[have[0]][i], 1.0)]
        elif not have:
            defaults[i] = []
        elif base_index is not None and base_index in have:
            defaults[i] = [(base_index, rows[base_index][i], 1.0)]
        else:
            defaults[i] = [(m, rows[m][i], 1 / len(have)) for m in have]
    default_ids = torch.tensor(sorted(defaults), dtype=torch.long)
    position = {i: k for k, i in enumerate(sorted(defaults))}
    default_from = []
    for m in range(len(members)):
        picks = [(position[i], r, w) for i, srcs in defaults.items() for mm, r, w in srcs if mm == m]
        default_from.append((torch.tensor([p for p, _, _ in picks], dtype=torch.long),
                             torch.tensor([r for _, r, _ in picks], dtype=torch.long),
                             torch.tensor([w for _, _, w in picks], dtype=torch.float32)))
    row_tensors = []
    for m in range(len(members)):
        r = torch.tensor(rows[m], dtype=torch.long)
        if forced:
            r[torch.tensor(sorted(forced))] = -1
        row_tensors.append(r)
    return Vocab(out, n, size, row_tensors, default_ids, default_from)
