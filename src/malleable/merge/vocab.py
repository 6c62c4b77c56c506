"""Vocabulary merging: an output tokenizer (a model's, the base's, or the union of the inputs'), and the embedding
and lm_head rows of every model laid out over it before the rule merges them, with mergekit 0.1.5's rules
(``tokenizer/build.py``, ``tokenizer/embed.py: PermutedVocabulary``), written anew:

* a token a model has keeps that model's row;
* a token a model lacks gets a default row, the same for every model: the `tokens:` entry's source if the recipe
  gives one (a model's row for the token, another token's row, or zeros); else the row of the one model that has
  it; zeros if none has it; the base's row if the base has it; else the mean of the rows of the models that have
  it. `force: true` gives every model the default row, also those that have the token;
* rows past the vocabulary (`pad_to_multiple_of`) are each model's mean row over the vocabulary.

"Every model" is every model merged into that tensor: all of them in a whole-model merge; with `slices:` the first
slice's sources for the embeddings and the last slice's for lm_head (the base only where it is one of them), as in
mergekit, where these rules run over the tensors a slice gathers (a model a slice takes twice counts once). The
output tokenizer itself is built from every model the recipe names, slices or not.

The rule then merges the aligned rows like any other tensor, one tensor at a time. Where we differ from mergekit:
the union lists new tokens in input order (mergekit walks a set of models and each tokenizer's hash-ordered
vocabulary, so its ids for tokens the base lacks can change between runs); without a base, the first input's
tokenizer starts the union (mergekit: the first of a set, i.e. any); a tokenizer entry at or past its model's
vocab_size counts as absent (mergekit stops with a KeyError). Refused with one line: a base (or source) tokenizer
with entries past its model's vocab_size (mergekit strips them, BPE only), and vocabularies whose ids have holes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class _Token:
    """A `tokens:` entry, resolved: `kind` "zero", "row" (row `row` of member `member`), or "none" (no source)."""

    name: str
    force: bool
    kind: str
    member: int | None = None
    row: int | None = None  # None: the member's own row of the token
    error: str | None = None  # a model_token source that names no row of its model: raised where it is used


@dataclass
class Layout:
    """Where each output row of one tensor comes from, for the models merged into it (`members`, in the order
    the engine hands their tensors over)."""

    rows: list[torch.Tensor]  # per member: its row for each output token, -1 where the default row goes
    default_ids: torch.Tensor  # output tokens that have a default row
    # per member: (positions in default_ids, that member's rows, weights) summed into the default rows
    default_from: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Vocab:
    """The output vocabulary, and every merged model's row for each output token (`members`: the base first when
    the recipe has one, then the inputs). A tensor merges some of them (with slices: the first or last slice's
    sources); its default rows follow mergekit's rules over those models alone (`layout`)."""

    tokenizer: Any
    n_tokens: int
    size: int  # rows written: n_tokens padded up to pad_to_multiple_of
    roots: list[Path]  # per member, resolved
    rows: list[torch.Tensor]  # per member: its row for each output token, -1 where it lacks the token
    base_root: Path | None  # the model whose row a shared token takes when it is merged into the tensor
    tokens: dict[int, _Token]  # the recipe's `tokens:` entries, by output id
    _layouts: dict[tuple[int, ...], Layout] = field(default_factory=dict)

    def layout(self, members: tuple[int, ...], where: str = "the merge") -> Layout:
        """The layout of a tensor merged from `members` (indices into the members; a model may appear twice and
        counts once), computed once per set. Raises RecipeError where a token's row has no source among them."""
        if members in self._layouts:
            return self._layouts[members]
        first: dict[Path, int] = {}  # distinct models: root -> its first position in `members`
        for k, m in enumerate(members):
            first.setdefault(self.roots[m], k)
        distinct = list(first.values())
        base = first.get(self.base_root) if self.base_root is not None else None
        own = {k: self.rows[members[k]].tolist() for k in distinct}  # lists: read entry by entry below
        defaults: dict[int, list[tuple[int, int, float]]] = {}  # token id -> [(position, row, weight)]
        for i in range(self.n_tokens):
            have = [k for k in distinct if own[k][i] >= 0]
            tok = self.tokens.get(i)
            if tok is not None and (tok.force or len(have) < len(distinct)):
                defaults[i] = self._explicit(tok, i, members, first, where)
            elif len(have) == len(distinct):
                continue
            elif len(have) == 1:
                defaults[i] = [(have[0], own[have[0]][i], 1.0)]
            elif not have:
                defaults[i] = []
            elif base is not None and base in have:
                defaults[i] = [(base, own[base][i], 1.0)]
            else:
                defaults[i] = [(k, own[k][i], 1 / len(have)) for k in have]
        ids = sorted(defaults)
        position = {i: p for p, i in enumerate(ids)}
        default_from = []
        for k in range(len(members)):
            picks = [(position[i], r, w) for i, srcs in defaults.items() for kk, r, w in srcs if kk == k]
            default_from.append((torch.tensor([p for p, _, _ in picks], dtype=torch.long),
                                 torch.tensor([r for _, r, _ in picks], dtype=torch.long),
                                 torch.tensor([w for _, _, w in picks], dtype=torch.float32)))
        forced = torch.tensor(sorted(i for i, t in self.tokens.items() if t.force), dtype=torch.long)
        rows = []
        for m in members:
            r = self.rows[m].clone()
            r[forced] = -1
            rows.append(r)
        out = self._layouts[members] = Layout(rows, torch.tensor(ids, dtype=torch.long), default_from)
        return out

    def _explicit(self, tok: _Token, i: int, members: tuple[int, ...], first: dict[Path, int],
                  where: str) -> list[tuple[int, int, float]]:
        """The default row of a token with a `tokens:` entry, from among `members`."""
        if tok.kind == "none":
            raise RecipeError(f"tokenizer.tokens.{tok.name}: the token is missing from a model (or forced), so it "
                              "needs a source")
        if tok.kind == "zero":
            return []
        if tok.error is not None:
            raise RecipeError(tok.error)
        root = self.roots[tok.member]
        if root not in first:
            raise RecipeError(f"tokenizer.tokens.{tok.name}.source: {root} is not one of the models merged into "
                              f"{where}")
        row = tok.row if tok.row is not None else int(self.rows[tok.member][i])
        if row < 0:
            raise RecipeError(f"tokenizer.tokens.{tok.name}.source: {root} has no token {tok.name!r}")
        return [(first[root], row, 1.0)]

    def align(self, tensors: list[torch.Tensor], members: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """The tensors of `members` (default: every member; rows = each one's own vocabulary) laid out over the
        output vocabulary, float32."""
        lay = self.layout(tuple(range(len(self.roots))) if members is None else tuple(members))
        hidden = tensors[0].shape[1:]
        defaults = torch.zeros((len(lay.default_ids), *hidden), dtype=torch.float32)
        for t, (pos, rows, w) in zip(tensors, lay.default_from):
            if len(pos):
                defaults.index_add_(0, pos, t.index_select(0, rows) * w.view(-1, *([1] * len(hidden))))
        out = []
        for t, rows in zip(tensors, lay.rows):
            new = torch.empty((self.size, *hidden), dtype=torch.float32)
            have = rows >= 0
            new[:self.n_tokens][have] = t.index_select(0, rows[have])
            own = torch.zeros(self.n_tokens, dtype=torch.bool)
            own[have] = True
            need = ~own[lay.default_ids]
            new[lay.default_ids[need]] = defaults[need]
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
    tokens = {}
    for t, cfg in spec.tokens.items():
        src, kind = cfg.source, getattr(cfg.source, "kind", None)
        if src is None:
            tokens[vocab[t]] = _Token(t, cfg.force, "none")
        elif kind == "zero":
            tokens[vocab[t]] = _Token(t, cfg.force, "zero")
        elif kind == "model_token":
            m = member(src.model, f"{t}.source.model")
            j = src.token_id if src.token_id is not None else vocabs[m].get(src.token, -1)
            error = None
            if not 0 <= j < sizes[m] or (members[m][2] is not None and j >= members[m][2]):
                what = src.token_id if src.token_id is not None else repr(src.token)
                error = f"tokenizer.tokens.{t}.source: token {what} is not in {src.model}'s vocabulary"
            tokens[vocab[t]] = _Token(t, cfg.force, "row", m, j, error)
        else:
            tokens[vocab[t]] = _Token(t, cfg.force, "row", member(src, f"{t}.source"))
    base_root = roots[base_index] if base_index is not None else None
    return Vocab(out, n, size, roots, [torch.tensor(r, dtype=torch.long) for r in rows], base_root, tokens)
