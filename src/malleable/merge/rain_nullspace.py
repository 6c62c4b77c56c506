"""RAIN-Merging, stage 1: the calibration files, the features at the thinking boundaries, the constraint rows and
the ridge null-space projection (see `malleable.merge.rain` for the method and where ours differs).

Every constraint row is rank one on one weight block W (out x in): a(dW) = s * u^T dW v. For m rows,
A A^T = (s s^T) * (U U^T) * (V V^T) (elementwise), A dW = s * rowsum((U dW) * V) and A^T y = U^T diag(s y) V, so
the projection tau' = tau - A^T (A A^T + lambda I)^-1 A tau needs only m x m algebra (a Cholesky solve).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from malleable.errors import InputError

PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def kv_head(h: int, heads: int, kv_heads: int) -> int:
    """The KV head query head `h` reads under HF's `repeat_kv` (each KV head repeated heads/kv_heads times in a
    row): h // (heads / kv_heads). The authors' code uses h % kv_heads, which is the same only without GQA."""
    return h // (heads // kv_heads)


# ---------------------------------------------------------------- calibration files


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line of a JSONL file; one line naming the file and line otherwise."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise InputError(f"{path}: RAIN calibration files are JSONL (one object per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({e.__class__.__name__})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path} line {n}: not a JSON object") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {n}: not a JSON object")
        rows.append((n, row))
    if not rows:
        raise InputError(f"{path}: the calibration set is empty")
    return rows


def _text(path: Path, n: int, row: dict, field_name: str) -> str:
    text = row.get(field_name)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{path} line {n}: no '{field_name}' string")
    return text


def tokenize(tokenizer, text: str, path: Path, n: int, max_length: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text` as the model sees it (no special tokens added: the text is the
    whole input, chat template included)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if len(ids) > max_length:
        raise InputError(f"{path} line {n}: {len(ids)} tokens, over data.max_length ({max_length})")
    return ids, [tuple(o) for o in enc["offset_mapping"]]


def char_to_token(offsets: list[tuple[int, int]], c: int) -> int | None:
    """The token whose characters cover position `c` (the authors' char2tok)."""
    for i, (s, e) in enumerate(offsets):
        if s <= c < e:
            return i
    return None


@dataclass
class ReasoningSample:
    ids: list[int]
    pairs: list[tuple[int, int]]  # (query position, key position), shuffled: Q takes the first q_rows, K k_rows
    positions: list[int]  # the boundary neighbourhoods, shuffled: V, O and the MLP take the first *_rows


def reasoning_samples(path: Path, tokenizer, spec, p: dict, rng: random.Random) -> list[ReasoningSample]:
    """Each row's text must hold exactly one `think_open` and, after it, one `think_close`. The neighbourhoods
    are the boundary token and the `radius` tokens after the opening one / before the closing one."""
    out = []
    for n, row in read_jsonl(path):
        text = _text(path, n, row, spec.text_field)
        opens, closes = text.count(p["think_open"]), text.count(p["think_close"])
        if opens != 1 or closes != 1 or text.index(p["think_open"]) > text.index(p["think_close"]):
            raise InputError(f"{path} line {n}: needs one thinking boundary, {p['think_open']} ... "
                             f"{p['think_close']} (found {opens} and {closes})")
        ids, offsets = tokenize(tokenizer, text, path, n, spec.max_length)
        start = char_to_token(offsets, text.index(p["think_open"]))
        end = char_to_token(offsets, text.index(p["think_close"]))
        if start is None or end is None or start >= end:
            raise InputError(f"{path} line {n}: the thinking boundary does not map onto distinct tokens")
        r = p["radius"]
        after_open = list(range(start, min(len(ids), start + r + 1)))
        before_close = list(range(max(0, end - r), end + 1))
        # causal order (the query is the later token); the authors pair (boundary, later token), a masked logit
        pairs = [(i, start) for i in after_open] + [(end, j) for j in before_close]
        rng.shuffle(pairs)
        positions = sorted(set(after_open) | set(before_close))
        rng.shuffle(positions)
        out.append(ReasoningSample(ids, pairs, positions))
    return out


@dataclass
class InstructionSample:
    ids: list[int]
    instructions: list[dict]  # per instruction: I (instruction tokens), R, U (token lists), nR, nU (span counts)
    unrelated: list[int] = field(default_factory=list)  # the row's global unrelated tokens
    n_unrelated: int = 0


def _spans(text: str, offsets, items, path: Path, n: int, key: str) -> tuple[list[int], int]:
    """Token indices covered by every occurrence of each substring in `items`, and the number of occurrences (the
    authors' _find_token_spans and _union_indices)."""
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InputError(f"{path} line {n}: '{key}' must be a list of strings")
    tokens, count = set(), 0
    for s in (s for s in items if s.strip()):
        at = text.find(s)
        if at < 0:
            raise InputError(f"{path} line {n}: the {key} entry {s[:40]!r} is not in the text")
        while at >= 0:
            a, b = char_to_token(offsets, at), char_to_token(offsets, at + len(s) - 1)
            if a is not None and b is not None:
                tokens.update(range(a, b + 1))
                count += 1
            at = text.find(s, at + 1)
    return sorted(tokens), count


def instruction_samples(path: Path, tokenizer, spec) -> list[InstructionSample]:
    """Rows: {"text": ..., "related_prompt_list": [{"prompt_spans": [...], "response_spans": [...],
    "unrelated_response_spans": [...]}, ...], "unrelated_response_spans": [...]} (the authors' field names;
    every span a substring of the text)."""
    out = []
    for n, row in read_jsonl(path):
        text = _text(path, n, row, spec.text_field)
        ids, offsets = tokenize(tokenizer, text, path, n, spec.max_length)
        items = row.get("related_prompt_list")
        if not isinstance(items, list) or not items or not all(isinstance(x, dict) for x in items):
            raise InputError(f"{path} line {n}: 'related_prompt_list' must be a non-empty list of objects")
        instructions = []
        for item in items:
            prompt = item.get("prompt_spans", [])
            i_tok, _ = _spans(text, offsets, prompt, path, n, "prompt_spans")
            if not i_tok:
                raise InputError(f"{path} line {n}: an instruction without prompt_spans")
            r_tok, n_r = _spans(text, offsets, prompt + list(item.get("response_spans", [])), path, n,
                                "response_spans")
            u_tok, n_u = _spans(text, offsets, item.get("unrelated_response_spans", []), path, n,
                                "unrelated_response_spans")
            instructions.append({"I": i_tok, "R": r_tok, "U": u_tok, "nR": n_r, "nU": n_u})
        g_tok, n_g = _spans(text, offsets, row.get("unrelated_response_spans", []), path, n,
                            "unrelated_response_spans")
        out.append(InstructionSample(ids, instructions, g_tok, n_g))
    return out


# ---------------------------------------------------------------- features (forward hooks) and constraint rows


def layer_of(model, li: int):
    return model.model.layers[li]


@torch.no_grad()
def capture(model, ids: list[int], layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """One forward of the reasoning model; per layer: the attention input (after input_layernorm), q/k after
    RoPE and v per head, the attention probabilities (eager attention), the MLP input (after
    post_attention_layernorm) and the down projection's input."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    feats: dict[int, dict[str, torch.Tensor]] = {li: {} for li in layers}
    hooks = []

    def put(li, key, fn):
        def hook(module, args, kwargs_or_out, out=None):
            feats[li][key] = fn(module, args, kwargs_or_out, out)
        return hook

    for li in layers:
        layer = layer_of(model, li)
        att = layer.self_attn
        hooks += [
            layer.input_layernorm.register_forward_hook(put(li, "x", lambda m, a, o, _: o[0])),
            att.q_proj.register_forward_hook(put(li, "q", lambda m, a, o, _: o[0])),
            att.k_proj.register_forward_hook(put(li, "k", lambda m, a, o, _: o[0])),
            att.v_proj.register_forward_hook(put(li, "v", lambda m, a, o, _: o[0])),
            att.register_forward_pre_hook(put(li, "rope", lambda m, a, kw, _: kw["position_embeddings"]),
                                          with_kwargs=True),
            att.register_forward_hook(put(li, "attn", lambda m, a, o, _: o[1][0])),
            layer.post_attention_layernorm.register_forward_hook(put(li, "xf", lambda m, a, o, _: o[0])),
            layer.mlp.down_proj.register_forward_hook(put(li, "h", lambda m, a, o, _: a[0][0])),
        ]
    try:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for li in layers:
        f = feats[li]
        T = len(ids)
        hd = f["q"].shape[-1] // heads
        q = f["q"].view(T, heads, hd).transpose(0, 1).unsqueeze(0)
        k = f["k"].view(T, kv, hd).transpose(0, 1).unsqueeze(0)
        cos, sin = f.pop("rope")
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        f["q"], f["k"] = q[0], k[0]  # (heads, T, hd), (kv, T, hd), rotated
        f["v"] = f["v"].view(T, kv, hd).transpose(0, 1)  # (kv, T, hd)
        f["cos"], f["sin"] = cos[0], sin[0]  # (T, hd)
    return feats


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R^T x for HF's rotary embedding R x = x cos + rotate_half(x) sin (R is orthogonal)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos - rot * sin


@dataclass
class Rows:
    """Rank-one constraint rows on one weight block: a_r(dW) = s_r * u_r^T dW v_r."""

    u: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    s: list[float] = field(default_factory=list)

    def add(self, u: torch.Tensor, v: torch.Tensor, s: float) -> None:  # copies: a view would keep its features
        self.u.append(u.detach().to(torch.float32, copy=True))
        self.v.append(v.detach().to(torch.float32, copy=True))
        self.s.append(s)

    def __len__(self) -> int:
        return len(self.s)


def layer_rows(model, samples: list[ReasoningSample], layers: list[int], p: dict, types: str, seed: int,
               progress=None) -> dict[int, dict[str, Rows]]:
    """Per chosen layer, its constraint rows keyed 'q.<head>', 'k.<kv head>', 'v.<kv head>', 'o.<head>', 'gate',
    'up', 'down' (one forward per sample for all layers). Q/K: the attention logit of each (query, key) pair near a
    boundary, through HF's RoPE; V/O: the head's output at a boundary position read along `readout_dirs` random
    directions; gate/up/down: the MLP's projections at those positions read along random directions."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d, d_ff, dirs = cfg.hidden_size, cfg.intermediate_size, p["readout_dirs"]
    rows: dict[int, dict[str, Rows]] = {li: {} for li in layers}
    readout = {}
    for li in layers:
        g = torch.Generator().manual_seed(seed * 100003 + li)
        readout[li] = [torch.nn.functional.normalize(torch.randn(dirs, n, generator=g, dtype=torch.float64), dim=1)
                       for n in (d, d_ff, d)]  # V/O (model space), gate/up (MLP space), down (model space)
    for sample in samples:
        feats = capture(model, sample.ids, layers)
        for li in layers:
            _sample_rows(model, li, feats[li], sample, p, types, readout[li], rows[li], heads, kv)
        if progress is not None:
            progress.update(1)
    return rows


def _sample_rows(model, li, f, sample, p, types, readout, rows, heads, kv) -> None:
    att = layer_of(model, li).self_attn
    hd, scale = att.head_dim, float(att.scaling)
    d_ff = model.config.intermediate_size
    c_out, c_ff, c_down = readout
    x, q, k, v, A, cos, sin = (f[key] for key in ("x", "q", "k", "v", "attn", "cos", "sin"))
    pos_v, pos_o, pos_f = (sample.positions[:p[key]] for key in ("v_rows", "o_rows", "ffn_rows"))
    w_o = att.o_proj.weight.detach().double()

    def get(key):
        return rows.setdefault(key, Rows())

    for h in range(heads):
        g = kv_head(h, heads, kv)
        if "q" in types:
            for i, j in sample.pairs[:p["q_rows"]]:  # d logit = scale * (R_i dQ x_i) . (R_j k_j)
                get(f"q.{h}").add(unrotate(k[g, j], cos[i], sin[i]), x[i], scale)
        if "k" in types:
            for i, j in sample.pairs[:p["k_rows"]]:  # d logit = scale * (R_i q_i) . (R_j dK x_j)
                get(f"k.{g}").add(unrotate(q[h, i], cos[j], sin[j]), x[j], scale)
        o_h = w_o[:, h * hd:(h + 1) * hd]
        for t in pos_v if "v" in types else ():
            mixed = A[h, t] @ x  # sum_s A[t, s] x_s
            for c in c_out:  # c^T O_h dV_g mixed
                get(f"v.{g}").add(o_h.T @ c, mixed, 1 / hd ** 0.5)
        for t in pos_o if "o" in types else ():
            z = A[h, t] @ v[g]  # the head's output before o_proj
            for c in c_out:
                get(f"o.{h}").add(c, z, 1 / hd ** 0.5)
    for t in pos_f if "f" in types else ():
        for c in c_ff:
            get("gate").add(c, f["xf"][t], 1 / d_ff ** 0.5)
            get("up").add(c, f["xf"][t], 1 / d_ff ** 0.5)
        for c in c_down:
            get("down").add(c, f["h"][t], 1 / d_ff ** 0.5)


def block(name: str, h: int, hd: int) -> tuple[slice, slice]:
    """The (rows, columns) of weight `name` ('q', 'k', 'v', 'o', 'gate', 'up', 'down') that head (or KV head)
    `h` owns; the MLP projections are one block."""
    full = slice(None)
    if name in ("q", "k", "v"):
        return slice(h * hd, (h + 1) * hd), full
    if name == "o":
        return full, slice(h * hd, (h + 1) * hd)
    return full, full


def project(tau: torch.Tensor, rows: Rows | None, lam: float) -> tuple[torch.Tensor, float, float]:
    """(tau - A^T (A A^T + lam I)^-1 A tau, ||A tau||, ||A tau'||), in float64 with a Cholesky solve; tau
    itself (and zeros) without rows."""
    if rows is None or not len(rows):
        return tau, 0.0, 0.0
    t = tau.double()
    U = torch.stack(rows.u).double() * torch.tensor(rows.s, dtype=torch.float64).unsqueeze(1)
    V = torch.stack(rows.v).double()
    a = ((U @ t) * V).sum(1)
    gram = (U @ U.T) * (V @ V.T)
    gram.diagonal().add_(lam)
    z = torch.cholesky_solve(a.unsqueeze(1), torch.linalg.cholesky(gram)).squeeze(1)
    out = t - U.T @ (z.unsqueeze(1) * V)
    after = ((U @ out) * V).sum(1)
    return out.to(tau.dtype), float(a.norm()), float(after.norm())


def row_counts(samples: list[ReasoningSample], p: dict, types: str, heads: int, kv: int) -> dict[str, int]:
    """Constraint rows per module block of every chosen layer (what `layer_rows` builds), from tokenisation only:
    for `--dry-run`."""
    group = heads // kv
    q = sum(len(s.pairs[:p["q_rows"]]) for s in samples)
    k = sum(len(s.pairs[:p["k_rows"]]) for s in samples)
    vo = {key: sum(len(s.positions[:p[key + "_rows"]]) for s in samples) * p["readout_dirs"]
          for key in ("v", "o", "ffn")}
    counts = {}
    if "q" in types:
        counts["q_proj (per head)"] = q
    if "k" in types:
        counts["k_proj (per KV head)"] = k * group
    if "v" in types:
        counts["v_proj (per KV head)"] = vo["v"] * group
    if "o" in types:
        counts["o_proj (per head)"] = vo["o"]
    if "f" in types:
        counts.update({"gate_proj": vo["ffn"], "up_proj": vo["ffn"], "down_proj": vo["ffn"]})
    return counts
