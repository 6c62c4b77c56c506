"""Plain text for calibration and perplexity, from the offline corpora or a local file, cut into token windows.

Sources: `lee_background` (gensim's lee_background.cor, 300 Australian news stories, 2001), `lee` (gensim's
lee.cor, 50 other stories of the same corpus: held-out text), `fortunes` (Debian's fortunes package, every
quote file under /usr/share/games/fortunes), or the path of a UTF-8 `.txt` file.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from malleable.data.files import gensim_file
from malleable.errors import InputError
from malleable.io.paths import regular_file

GENSIM = {"lee_background": "lee_background.cor", "lee": "lee.cor"}
FORTUNES = Path("/usr/share/games/fortunes")
SOURCES = (*GENSIM, "fortunes")


def corpus_text(source: str) -> str:
    """The text of a named source or a .txt file; an InputError naming it when it is missing or empty."""
    if source in GENSIM:
        text = gensim_file(GENSIM[source]).read_text(encoding="utf-8", errors="replace")
    elif source == "fortunes":
        if not FORTUNES.is_dir():
            raise InputError(f"{FORTUNES}: no such folder (the fortunes come with Debian's package: apt-get install "
                             "fortunes)")
        files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
        quotes = [q.strip() for f in files for q in f.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        text = "\n\n".join(q for q in quotes if q and q != "%")
    elif source.endswith(".txt"):
        path = Path(source)
        if not path.exists():
            raise InputError(f"{path}: no such text file")
        try:
            text = regular_file(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
    else:
        raise InputError(f"{source}: not a text source (one of {', '.join(SOURCES)}, or a .txt file)")
    if not text.strip():
        raise InputError(f"{source}: holds no text")
    return text


def tokens(tokenizer, source: str, need: int) -> torch.Tensor:
    """The whole source through the tokenizer (no special tokens added), as one row of ids; at least `need`
    tokens, else an InputError naming the source."""
    ids = tokenizer(corpus_text(source), add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise InputError(f"{source}: {len(ids)} tokens, fewer than the {need} needed (seq_len and windows)")
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokenizer, source: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n` windows of `seq_len` tokens at random starts (the Wanda / SparseGPT wikitext2 loader: Python's random
    seeded with `seed`, start = randint(0, tokens - seq_len - 1)); (n, seq_len)."""
    ids = tokens(tokenizer, source, seq_len + 1)
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(n)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def consecutive_windows(tokenizer, source: str, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """The source's first non-overlapping windows of `seq_len` tokens (at most `limit`), a tail shorter than a
    window dropped (the Wanda code's eval_ppl); (windows, seq_len)."""
    ids = tokens(tokenizer, source, seq_len)
    count = len(ids) // seq_len if limit is None else min(limit, len(ids) // seq_len)
    return ids[:count * seq_len].reshape(count, seq_len)


def chat_windows(tokenizer, windows: torch.Tensor) -> torch.Tensor:
    """Each window's text as a user turn in the tokenizer's chat template (system prompt, role markers and the
    assistant header around it, as an instruct model sees its input), cut to keep the windows' length: the
    template's own tokens, then the first `seq_len - overhead` tokens of the window. The template is rendered
    once around a marker and tokenised in pieces, so every window has exactly the same frame."""
    from malleable.errors import RecipeError
    from malleable.models.chat import render_user_turn

    marker = "\x00WINDOW\x00"
    before, _, after = render_user_turn(tokenizer, marker).partition(marker)
    head = tokenizer(before, add_special_tokens=False)["input_ids"]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    room = windows.shape[1] - len(head) - len(tail)
    if room < 1:
        raise RecipeError(f"calibration.seq_len: {windows.shape[1]} tokens leave no room for text inside the chat "
                          f"template's {len(head) + len(tail)} (raise seq_len or set chat_template: off)")
    frame = [torch.tensor(head, dtype=torch.long).expand(len(windows), -1), windows[:, :room],
             torch.tensor(tail, dtype=torch.long).expand(len(windows), -1)]
    return torch.cat(frame, dim=1)
