"""Trainable Weight Averaging (TWA): the averaging coefficients of a set of checkpoints, learned from data.

Li et al., "Trainable Weight Averaging: Efficient Training by Optimizing Historical Solutions" (ICLR 2023) and
"... Accelerating Training and Improving Generalization" (journal version, 2025); the authors' code is
github.com/nblt/TWA, branch `main` (ICLR: train_twa.py) and branch `journal` (train_twa.py, twa_soup.sh).
Three forms:

* ``twa`` (ICLR, head or tail stage): an orthonormal basis P (n x D) of the n checkpoints' weights (the authors'
  Gram-Schmidt), training from their mean (``train_start: -1``) or checkpoint ``train_start`` with every
  gradient projected onto the span (P^T P g), SGD with momentum 0.9 and weight decay 1e-5, lr 2, a step
  schedule (x0.1 at 50% and 75% of the epochs). Here the weights are w = P^T c and c is what trains: its
  gradient is P g and P is orthonormal, so the update of w is the authors' projected step, momentum and weight
  decay included (w stays in the span, so wd * w = P^T (wd * c)).
* ``twa_v`` / ``twa_t`` (journal): per block b of parameters, w_b = center_b + sum_i X[i, b] P[i, b], with
  P[i, b] = (w_i - mean)_b / ||(w_i - mean)_b|| quantised to ``bits`` per block (min/max affine grid, the
  authors' `quantize_to_int8`), X from 0 trained with AdamW (lr 1e-3, wd 0, batch 32, 5 epochs, cosine with
  20% warm-up: twa_soup.sh) on the validation split (``twa_v``) or the training data (``twa_t``): the caller
  hands the split it means. Blocks follow the authors' `layer_size` rule (0: one block per parameter tensor).
  ``model_batch`` > 0 processes the checkpoints in chunks: each chunk trains fresh coefficients from the
  previous chunk's result, and the output is the mean of the chunks' results (the authors' final "SWA" model).

The coefficients are the only trainable parameters of a learn `Method` (`Coefficients`), and every step is
learn's `optimizer_step` (micro-batches, DDP, the non-finite check), so several processes work unchanged.
The dequantised projection is never materialised for the whole model: each block's product and its gradient
(P_b g_b, the authors' P_Step) run block by block from the uint8 codes. With ``pack: true`` (the default) the
k-bit codes are held bit-packed (`pack_codes`: 8 / 4 / 2 codes a byte at 1 / 2 / 4 bits, a bit stream at 3, 5,
6, 7 bits), so the projection takes k / 8 of a byte per entry; each block is unpacked exactly for its product and
again for its gradient, so the result is bit for bit the unpacked one.

Where ours differs from the authors' code, and why:
* Gram-Schmidt is a QR factorisation in float64 (the same span; float32 classical Gram-Schmidt loses
  orthogonality over many checkpoints); a checkpoint already in the span of the others adds no direction
  (the authors divide by its zero norm: NaN). Likewise a block where a checkpoint equals the mean keeps a zero
  row in P (the authors' normalisation divides by zero).
* Buffers (BatchNorm statistics) are the checkpoints' mean (integer buffers from the first); the authors keep
  the last loaded checkpoint's. ``bn_update: true`` recomputes BatchNorm statistics on the training data
  after training (the ICLR code always does; the journal code does not): report both, it can hurt.
* A quantisation grid with max == min (a constant block) gets step 1 instead of the authors' division by 0.
* ``bits: 32`` keeps the projection in float32 (the journal code always quantises; its default is 4).
* The codes are bit-packed (``pack: false``: one code per uint8 byte, as the authors' `.to(torch.uint8)`).
* The step schedule's milestones are counted in optimiser steps at 50% / 75% of the run, not whole epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from malleable.errors import InputError, RecipeError, reason
from malleable.learn.registry import Method
from malleable.merge.registry import merge_rule
from malleable.params import Param, check_params

FORMS = ("twa", "twa_v", "twa_t")

PARAMS = {
    "lr": Param(None, "learning rate (default: 2 for twa, 1e-3 for twa_v / twa_t, the authors' scripts)", gt=0),
    "epochs": Param(None, "passes over the data (default: 10 for twa, 5 for twa_v / twa_t)", gt=0),
    "batch_size": Param(None, "examples per step (default: 128 for twa, 32 for twa_v / twa_t)", ge=1),
    "wd": Param(None, "weight decay (default: 1e-5 for twa, 0 for twa_v / twa_t)", ge=0),
    "momentum": Param(0.9, "SGD momentum", ge=0, le=1),
    "optimizer": Param(None, "sgd or adamw (default: sgd for twa, adamw for twa_v / twa_t)",
                       choices=(None, "sgd", "adamw")),
    "schedule": Param(None, "step (x0.1 at 50%, 75%), cosine (20% warm-up), linear or constant "
                            "(default: step for twa, cosine for twa_v / twa_t)",
                      choices=(None, "step", "cosine", "linear", "constant")),
    "layer_size": Param(0, "twa_v / twa_t: a block grows until it holds more than this many weights "
                           "(0: one block per parameter tensor)", ge=0),
    "bits": Param(None, "twa_v / twa_t: bits per entry of the quantised projection, 1..8, or 32 for float32 "
                        "(default 4)", ge=1),
    "model_batch": Param(0, "twa_v / twa_t: checkpoints per chunk (0: all at once)", ge=0),
    "train_start": Param(-1, "twa: start from the mean (-1) or from this checkpoint's index", ge=-1),
    "bn_update": Param(False, "recompute BatchNorm statistics on the training data afterwards"),
    "pack": Param(True, "twa_v / twa_t: hold the k-bit codes bit-packed (k / 8 of a byte each; false: one code "
                        "per byte, as the authors)"),
}
DEFAULTS = {
    "twa": {"lr": 2.0, "epochs": 10, "batch_size": 128, "wd": 1e-5, "optimizer": "sgd", "schedule": "step",
            "bits": 32},
    "twa_v": {"lr": 1e-3, "epochs": 5, "batch_size": 32, "wd": 0.0, "optimizer": "adamw", "schedule": "cosine",
              "bits": 4},
}
DEFAULTS["twa_t"] = DEFAULTS["twa_v"]


def twa_params(form: str, given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's parameters for `form`, checked, with the form's defaults filled in."""
    if form not in FORMS:
        raise RecipeError(f"method: '{form}' is not a TWA form ({', '.join(FORMS)})")
    p = check_params(PARAMS, given)
    p.update({k: v for k, v in DEFAULTS[form].items() if p[k] is None})
    for key in ("batch_size", "bits", "layer_size", "model_batch", "train_start"):
        if p[key] != int(p[key]):
            raise RecipeError(f"parameters.{key}: {p[key]} is not a whole number")
        p[key] = int(p[key])
    if not (1 <= p["bits"] <= 8 or p["bits"] == 32):
        raise RecipeError(f"parameters.bits: {p['bits']} is not 1..8 (or 32 for float32)")
    if form == "twa" and (p["bits"] != 32 or p["model_batch"] or p["layer_size"]):
        raise RecipeError("parameters.bits: twa (the ICLR form) keeps one float32 basis; bits, layer_size and "
                          "model_batch belong to twa_v / twa_t")
    return p


# ---------------------------------------------------------------- the projection, block by block


def quantize(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, float]:
    """The authors' per-block affine grid: (codes uint8, step, zero) with block ~ codes * step + zero, and the
    error of every entry at most step / 2."""
    lo, hi = float(block.min()), float(block.max())
    step = (hi - lo) / (2 ** bits - 1) or 1.0
    codes = torch.round((block - lo) / step).clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return codes, step, lo


def _code_groups(bits: int):
    """For a stream of codes in groups of 8 (8 codes = `bits` bytes): per code j of a group, its byte, its shift in
    that byte, and whether it runs into the next byte (the lowest bits first)."""
    for j in range(8):
        byte, shift = divmod(bits * j, 8)
        yield j, byte, shift, shift + bits > 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2**bits as a flat bit stream of ceil(numel * bits / 8) bytes: the codes in order, each
    `bits` wide, lowest bits first (1 / 2 / 4 bits: 8 / 4 / 2 codes a byte; 3 / 5 / 6 / 7 bits: a code may span
    two bytes; 8 bits: the codes themselves). `unpack_codes` inverts it exactly."""
    if not 1 <= bits <= 8:
        raise RecipeError(f"parameters.bits: {bits} is not 1..8")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    groups = torch.cat([flat, flat.new_zeros((-n) % 8)]).view(-1, 8)
    out = torch.zeros(groups.shape[0], bits, dtype=torch.uint8)
    for j, byte, shift, spans in _code_groups(bits):
        out[:, byte] |= groups[:, j] << shift  # uint8: the bits shifted past the byte fall off ...
        if spans:
            out[:, byte + 1] |= groups[:, j] >> (8 - shift)  # ... and go to the next byte
    return out.view(-1)[:(n * bits + 7) // 8].clone()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The `n` codes (uint8, flat) that `pack_codes(codes, bits)` packed into `packed`."""
    if bits == 8:
        return packed[:n].clone()
    groups = -(-n // 8)
    stream = torch.cat([packed, packed.new_zeros(groups * bits - packed.numel())]).view(groups, bits)
    out = torch.empty(groups, 8, dtype=torch.uint8)
    mask = 2 ** bits - 1
    for j, byte, shift, spans in _code_groups(bits):
        code = stream[:, byte] >> shift
        if spans:
            code |= stream[:, byte + 1] << (8 - shift)
        out[:, j] = code & mask
    return out.view(-1)[:n]


class _Project(torch.autograd.Function):
    """center + x @ (codes * step + zero) for one block, keeping only the block's stored (uint8, packed or float)
    codes for backward: the gradient of x is (codes * step + zero) @ g, computed as step * (codes @ g) + zero *
    sum(g)."""

    @staticmethod
    def forward(ctx, x, block):
        ctx.block = block
        out = (x * block.step) @ block.matrix().to(x.dtype) + block.zero * x.sum()
        return out if block.center is None else out + block.center

    @staticmethod
    def backward(ctx, g):
        b = ctx.block
        return b.step * (b.matrix().to(g.dtype) @ g) + b.zero * g.sum(), None


@dataclass
class Block:
    start: int
    size: int
    codes: torch.Tensor  # (n, size): uint8 codes, or the float32 rows themselves (step 1, zero 0); packed: flat
    step: float = 1.0
    zero: float = 0.0
    center: torch.Tensor | None = None  # (size,) float32, or None (twa: w = P^T c)
    packed_bits: int = 0  # > 0: `codes` is pack_codes(codes, packed_bits) of an (n_rows, size) matrix
    n_rows: int = 0

    def matrix(self) -> torch.Tensor:
        """The (n, size) codes as stored before packing (uint8, or the float rows)."""
        if not self.packed_bits:
            return self.codes
        return unpack_codes(self.codes, self.packed_bits, self.n_rows * self.size).view(self.n_rows, self.size)

    def rows(self) -> torch.Tensor:
        """The dequantised rows of P in this block."""
        return self.matrix().float() * self.step + self.zero

    @property
    def nbytes(self) -> int:
        """The bytes the projection's codes of this block take."""
        return self.codes.numel() * self.codes.element_size()


def param_blocks(sizes: Sequence[int], layer_size: int) -> list[tuple[int, int]]:
    """(start, size) of each block over the flat parameter vector: the authors' rule, a block takes the next
    tensor while it holds at most `layer_size` weights (0: every tensor its own block)."""
    blocks: list[list[int]] = [[0, 0]]
    for n in sizes:
        if blocks[-1][1] > layer_size:
            blocks.append([blocks[-1][0] + blocks[-1][1], n])
        else:
            blocks[-1][1] += n
    return [(s, n) for s, n in blocks if n]


def journal_blocks(rows: torch.Tensor, mean: torch.Tensor, center: torch.Tensor, spans: list[tuple[int, int]],
                   bits: int, pack: bool = False) -> list[Block]:
    """twa_v / twa_t: per block, (w_i - mean) normalised per row, quantised to `bits` (32: kept float), the codes
    bit-packed when `pack` (8 bits: nothing to pack)."""
    out = []
    for start, size in spans:
        d = rows[:, start:start + size] - mean[start:start + size]
        norm = d.norm(dim=1, keepdim=True)
        d = torch.where(norm > 0, d / norm.clamp(min=1e-30), torch.zeros_like(d))
        c = center[start:start + size].clone()
        if bits == 32:
            out.append(Block(start, size, d.contiguous(), center=c))
        else:
            codes, step, zero = quantize(d, bits)
            if pack and bits < 8:
                out.append(Block(start, size, pack_codes(codes, bits), step, zero, c, bits, d.shape[0]))
            else:
                out.append(Block(start, size, codes, step, zero, c))
    return out


def orthonormal_basis(rows: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """(r, D) orthonormal rows spanning the checkpoints (r <= n: directions already spanned are dropped)."""
    q, r = torch.linalg.qr(rows.double().T)
    diag = r.diagonal().abs()
    keep = diag > tol * diag.max().clamp(min=1e-300)
    return q[:, keep].T.float().contiguous()


class Averaged(nn.Module):
    """`net` with its parameters replaced by the TWA combination; `X` (basis rows x blocks) is all that trains."""

    def __init__(self, net: nn.Module, names: Sequence[str], blocks: list[Block], x0: torch.Tensor):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.blocks = blocks
        self.X = nn.Parameter(x0.clone().float())
        self.names = list(names)
        own = dict(net.named_parameters())
        self.shapes = [own[n].shape for n in self.names]

    def flat(self) -> torch.Tensor:
        parts = [_Project.apply(self.X[:, j], b) for j, b in enumerate(self.blocks)]
        return torch.cat(parts)

    def weights(self) -> dict[str, torch.Tensor]:
        pieces = torch.split(self.flat(), [math.prod(s) for s in self.shapes])
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes)}

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.net, self.weights(), args, kwargs, strict=False)


class Coefficients(Method):
    """TWA's learn Method: only the averaging coefficients train (the network's own weights are frozen), with
    SGD (momentum) or AdamW, weight decay on the coefficients as the authors' code applies it."""

    def prepare(self, model: nn.Module, task: str) -> nn.Module:
        model.requires_grad_(False)
        model.X.requires_grad_(True)
        return model

    def optimizer(self, params, training) -> torch.optim.Optimizer:
        if self.p["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=self.p["lr"], momentum=self.p["momentum"], weight_decay=self.p["wd"])
        return torch.optim.AdamW(params, lr=self.p["lr"], weight_decay=self.p["wd"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "x" in batch:  # a plain classifier on images (the vision nets)
            return F.cross_entropy(model(batch["x"]).float(), batch["labels"], reduction="sum")
        from malleable.learn.loss import task_loss

        return task_loss(model, batch).sum()


# ---------------------------------------------------------------- the run


@dataclass
class TWAResult:
    state: dict[str, torch.Tensor]  # the averaged weights and buffers, loadable into the template
    coefficients: list[torch.Tensor]  # X of every chunk
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def state_dicts(models: Sequence[nn.Module | dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Every checkpoint as a state dict, checked to share one architecture (keys and shapes)."""
    if not models:
        raise InputError("inputs: no checkpoints to average")
    sds = [m.state_dict() if isinstance(m, nn.Module) else dict(m) for m in models]
    ref = sds[0]
    for i, sd in enumerate(sds[1:], 1):
        if sd.keys() != ref.keys():
            key = sorted(set(sd) ^ set(ref))[0]
            raise InputError(f"inputs[{i}]: tensor '{key}' is in only one of inputs[0] and inputs[{i}] "
                             "(checkpoints of different architectures)")
        for k, t in sd.items():
            if t.shape != ref[k].shape:
                raise InputError(f"inputs[{i}]: tensor '{k}' has shape {list(t.shape)}, inputs[0]'s "
                                 f"{list(ref[k].shape)}")
    return sds


def mean_state(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average (model soup) of floating tensors; other tensors (counters) from the first."""
    return {k: torch.stack([sd[k].float() for sd in sds]).mean(0).to(t.dtype) if t.is_floating_point()
            else t.clone() for k, t in sds[0].items()}


def _lr_factor(step: int, total: int, schedule: str) -> float:
    from malleable.learn.engine import lr_factor

    if schedule == "step":  # the authors' MultiStepLR at 50% and 75% (+0.9, as int(epochs*0.75+0.9)) of the run
        return 0.1 ** sum(step >= int(total * f) for f in (0.5, 0.75))
    return lr_factor(step, total, int(0.2 * total) if schedule == "cosine" else 0, schedule)


def train_coefficients(averaged: Averaged, data: Sequence, collate: Callable, p: dict, seed: int,
                       progress: bool = False, desc: str = "twa") -> list[dict]:
    """Train `averaged.X` on `data` through learn's optimiser step; returns the logged history."""
    from tqdm.auto import tqdm

    from malleable.learn.engine import batch_indices, check_finite_weights, make_accelerator, optimizer_step

    method = Coefficients(**p)
    accelerator = make_accelerator()
    model = method.prepare(averaged, "classification")
    params = [model.X]
    opt = method.optimizer(params, None)
    total = max(1, math.ceil(p["epochs"] * len(data) / p["batch_size"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, p["schedule"]))
    prepared, opt = accelerator.prepare(model, opt)
    world, rank = accelerator.num_processes, accelerator.process_index
    size = min(p["batch_size"], len(data))
    if size % world:
        raise RecipeError(f"parameters.batch_size: {size} does not split over {world} processes")
    share, history = size // world, []
    prepared.train()
    for step in tqdm(range(total), disable=not progress, desc=desc, unit="step", dynamic_ncols=True):
        idx = batch_indices(step, size, len(data), seed)
        units = sum(1 if isinstance(data[i][1], int) else sum(t != -100 for t in data[i][1]) for i in idx)
        mine = collate([data[i] for i in idx[rank * share:(rank + 1) * share]])
        batch = {k: v.to(accelerator.device) for k, v in mine.items()}
        loss, _ = optimizer_step(method, prepared, opt, params, [batch], units, accelerator, None)
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == total:
            history.append({"step": step + 1, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0]})
    check_finite_weights(params, accelerator)
    prepared.eval()
    return history


def twa(models: Sequence[nn.Module | dict[str, torch.Tensor]], template: nn.Module, data: Sequence, *,
        collate: Callable, form: str = "twa_v", parameters: dict | None = None, bn_data: Sequence | None = None,
        seed: int = 0, progress: bool = False) -> TWAResult:
    """Average `models` (checkpoints of `template`'s architecture) with coefficients trained on `data`.

    `data` is a list of examples `collate` turns into batches: (x, class) pairs for a vision net, learn's
    tokenised examples for a transformers model. `bn_data` (default `data`) recomputes BatchNorm statistics
    when `bn_update` is set. `template` is not changed; the result's `state` loads into it.
    """
    p = twa_params(form, parameters or {})
    sds = state_dicts(models)
    if not data:
        raise InputError("data: no examples to train the averaging coefficients on")
    # the template's trainable parameters are averaged (a PEFT model: its adapter's factors), the rest kept
    names = [n for n, t in template.named_parameters() if t.requires_grad] or [n for n, _ in
                                                                                 template.named_parameters()]
    missing = [n for n in names if n not in sds[0]]
    if missing:
        raise InputError(f"inputs[0]: no tensor '{missing[0]}' of the model to average")
    if p["train_start"] >= len(sds):
        raise RecipeError(f"parameters.train_start: {p['train_start']} is not a checkpoint index (0..{len(sds) - 1})")
    torch.manual_seed(seed)
    rows = torch.stack([torch.cat([sd[n].float().reshape(-1) for n in names]) for sd in sds])
    mean = rows.mean(0)
    net = _copy(template)
    chunks, results, history, info = [], [], [], {"form": form, "parameters": p, "checkpoints": len(sds)}
    if form == "twa":
        basis = orthonormal_basis(rows)
        start = mean if p["train_start"] < 0 else rows[p["train_start"]]
        x0 = (basis @ start).unsqueeze(1)
        averaged = Averaged(net, names, [Block(0, rows.shape[1], basis)], x0)
        info["basis_rank"] = basis.shape[0]
        history += train_coefficients(averaged, data, collate, p, seed, progress)
        chunks.append(averaged.X.detach().clone())
        results.append(averaged.flat().detach())
    else:
        spans = param_blocks([sds[0][n].numel() for n in names], p["layer_size"])
        info["blocks"] = len(spans)
        center, per = mean, p["model_batch"] or len(sds)
        for c in range(0, len(sds), per):
            blocks = journal_blocks(rows[c:c + per], mean, center, spans, p["bits"], p["pack"])
            averaged = Averaged(net, names, blocks, torch.zeros(min(per, len(sds) - c), len(spans)))
            info["projection_bytes"] = max(info.get("projection_bytes", 0), sum(b.nbytes for b in blocks))
            history += train_coefficients(averaged, data, collate, p, seed, progress, f"twa chunk {c // per}")
            chunks.append(averaged.X.detach().clone())
            center = averaged.flat().detach()
            results.append(center)
    flat = torch.stack(results).mean(0)
    state = mean_state(sds)
    for n, t in zip(names, torch.split(flat, [sds[0][n].numel() for n in names])):
        state[n] = t.view(sds[0][n].shape).to(sds[0][n].dtype)
    named = {id(t): n for n, t in template.named_parameters()}
    for k, t in template.state_dict(keep_vars=True).items():  # tied weights (lm_head = embeddings) follow
        if named.get(id(t), k) != k and named[id(t)] in state:
            state[k] = state[named[id(t)]]
    if p["bn_update"]:
        state = bn_update(template, state, bn_data if bn_data is not None else data, collate, p["batch_size"])
    return TWAResult(state, chunks, history, info)


def _copy(template: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(template)


@torch.no_grad()
def bn_update(template: nn.Module, state: dict[str, torch.Tensor], data: Sequence, collate: Callable,
              batch_size: int) -> dict[str, torch.Tensor]:
    """`state` with its BatchNorm statistics recomputed over `data` (torch.optim.swa_utils.update_bn: a
    cumulative average over one pass); unchanged for a network without BatchNorm."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules()):
        return state
    net = _copy(template)
    net.load_state_dict(state)
    loader = [collate(list(data[i:i + batch_size]))["x"] for i in range(0, len(data), batch_size)]
    torch.optim.swa_utils.update_bn(loader, net)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------- `malleable merge` with method twa / twa_v / twa_t


def run_plan(plan, out, force: bool = False, progress: bool = True) -> dict:
    """The merge engine's hook for a learned rule: load the inputs (checkpoints, or LoRA adapters on their
    base), read the recipe's data (twa_v: its validation file; twa / twa_t: its train file), train, and write
    the averaged model (or adapter) with its tokenizer and report, atomically. Under `accelerate launch` or
    torchrun every process trains its share of each batch and the main process alone writes."""
    import json
    import time

    from accelerate import PartialState

    from malleable.io.atomic import atomic_dir, check_output
    from malleable.io.hashing import sha256_file
    from malleable.learn.data import collate as collate_tokens
    from malleable.learn.data import load_examples
    from malleable.models.checkpoints import Trust, load_model, load_tokenizer
    from malleable.report import environment, peak_rss_mb, write_report

    start = time.perf_counter()
    r = plan.recipe
    form, spec = r.method, r.data
    p = twa_params(form, {k: v for k, v in r.model_dump(mode="json")["parameters"].items()})
    if any(i.model_dump(mode="json")["weight"] != 1.0 or i.parameters for i in r.inputs):
        raise RecipeError("inputs: TWA learns every input's coefficient; per-input weights and parameters do not apply")
    if r.base is not None or r.slices is not None or r.tokenizer is not None:
        raise RecipeError(f"method: {form} averages the inputs themselves (no base, slices or tokenizer merging)")
    path = spec.validation if form == "twa_v" else spec.train
    if path is None:
        raise RecipeError("data.validation: twa_v trains the coefficients on a validation file; none is given")
    paths = [i.path for i in r.inputs]
    out = check_output(out, force, inputs=paths + [spec.train] + ([spec.validation] if spec.validation else []))
    trust = Trust(False, r.allow_pickle)
    tokenizer = load_tokenizer(paths[0], trust)
    examples = load_examples(path, spec, tokenizer)
    task = "classification" if examples.format == "text_label" else "causal_lm"
    template = load_model(paths[0], task, tokenizer.pad_token_id, trust=trust)
    adapters = is_adapter(paths[0])
    models = (adapter_states(template, paths, trust) if adapters
              else [template] + [load_model(x, task, tokenizer.pad_token_id, trust=trust) for x in paths[1:]])
    if task == "classification" and template.config.num_labels != len(examples.labels):
        raise InputError(f"{paths[0]}: a classifier with {template.config.num_labels} classes, but {path} has "
                         f"{len(examples.labels)} labels")
    result = twa(models, template, examples.items, collate=lambda items: collate_tokens(items, tokenizer.pad_token_id),
                 form=form, parameters=p, seed=r.seed, progress=progress)
    template.load_state_dict(result.state, strict=not adapters)  # adapters: their factors, the base as it is
    report = {
        "schema": "malleable.merge/1", "method": form, "parameters": p,
        "inputs": [str(x) for x in paths], "output": {"path": str(out), "kind": plan.output_kind},
        "tensors": {k: list(v.shape) for k, v in result.state.items()},
        "data": {"path": str(path), "sha256": sha256_file(path), "examples": len(examples), "format": examples.format},
        "twa": {**{k: v for k, v in result.info.items() if k != "parameters"},
                "coefficients": [x.tolist() for x in result.coefficients] if result.coefficients[0].numel() <= 4096
                else "omitted (over 4096 values)",
                "history": result.history},
        "wall_time_s": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb(),
        "environment": environment(), "processes": PartialState().num_processes,
        "main_process": PartialState().is_main_process,
    }
    if not report["main_process"]:
        PartialState().wait_for_everyone()  # until the main process has written
        return report
    with atomic_dir(out, force) as tmp:
        template.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        last = result.history[-1] if result.history else {}
        write_report(tmp, report, "\n".join([
            f"# merge: {form}", "", f"- inputs: {', '.join(f'`{x}`' for x in paths)}",
            f"- data: `{path}` ({len(examples)} examples)", f"- parameters: {json.dumps(p)}",
            f"- final training loss: {last.get('loss')}", f"- wall time {report['wall_time_s']} s, "
            f"peak RSS {report['peak_rss_mb']} MB", f"- output: `{out}`", ""]))
    PartialState().wait_for_everyone()
    return report


# what makes two LoRA adapters the same function of their factors: averaging factors of adapters that differ here
# (a scale, a target, a DoRA magnitude) would mix unlike things
ADAPTER_KEYS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                "modules_to_save", "fan_in_fan_out", "bias", "layers_to_transform")


def _setting(value):
    """An adapter setting compared as a value: PEFT saves `target_modules` from a set, so two processes can list
    the same modules in different orders."""
    return sorted(map(str, value)) if isinstance(value, list) else value


def is_adapter(path) -> bool:
    from malleable.models.checkpoints import checkpoint_base

    return checkpoint_base(path)[1]


def read_adapter(template: nn.Module, path, name: str) -> dict[str, torch.Tensor]:
    """The adapter at `path` loaded into `template` (a PEFT model of its shape), and copies of its factors under
    the template's names; `name` is how an error names the input."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    try:
        loaded = set_peft_model_state_dict(template, load_peft_weights(str(path)))
    except RuntimeError as e:  # torch's size-mismatch report: its first line names the tensor
        raise InputError(f"{name}: {path} does not fit inputs[0]'s adapter ({reason(e)})") from None
    if loaded.unexpected_keys:
        raise InputError(f"{name}: tensor '{loaded.unexpected_keys[0]}' of {path} is not in inputs[0]'s adapter")
    return {n: t.detach().clone() for n, t in template.named_parameters() if t.requires_grad}


def adapter_states(template: nn.Module, paths: list, trust) -> list[dict[str, torch.Tensor]]:
    """Every adapter's factors under `template`'s names (a PEFT model holding paths[0]): each adapter is loaded
    into the one template in turn and its trainable tensors copied, so the base is held once, not once per input
    (eight adapters of SmolLM2 would otherwise hold eight copies of its 135M weights). The merge planner has
    checked that every input is an adapter on one base; here they must also share the settings in ADAPTER_KEYS."""
    from malleable.io.checkpoint import read_json
    from malleable.models.checkpoints import ADAPTER_CONFIG, check_model_folder

    config0 = read_json(paths[0] / ADAPTER_CONFIG)
    first = {n: t.detach().clone() for n, t in template.named_parameters() if t.requires_grad}
    states = [first]
    for i, path in enumerate(paths[1:], 1):
        check_model_folder(path, trust)
        config = read_json(path / ADAPTER_CONFIG)
        for key in ADAPTER_KEYS:
            if _setting(config.get(key)) != _setting(config0.get(key)):
                raise InputError(f"inputs[{i}]: {path / ADAPTER_CONFIG} has {key} {config.get(key)!r}, inputs[0]'s "
                                 f"{config0.get(key)!r} (adapters of one shape and scale are averaged)")
        states.append(read_adapter(template, path, f"inputs[{i}]"))
    with torch.no_grad():  # the template back to inputs[0]
        for n, t in template.named_parameters():
            if n in first:
                t.copy_(first[n])
    return states


@merge_rule("twa", space="learned", params=PARAMS, uses_base=False)
def twa_rule(plan, out, force: bool = False, progress: bool = True) -> dict:
    """Trainable Weight Averaging (ICLR 2023): SGD in the span of the checkpoints (orthonormal basis), from
    their mean, on the recipe's train data."""
    return run_plan(plan, out, force, progress)


@merge_rule("twa_v", space="learned", params=PARAMS, uses_base=False)
def twa_v_rule(plan, out, force: bool = False, progress: bool = True) -> dict:
    """TWA-v (journal): per-block coefficients of the normalised, k-bit checkpoint directions around their
    mean, trained with AdamW on the recipe's validation data."""
    return run_plan(plan, out, force, progress)


@merge_rule("twa_t", space="learned", params=PARAMS, uses_base=False)
def twa_t_rule(plan, out, force: bool = False, progress: bool = True) -> dict:
    """TWA-t (journal): TWA-v's block coefficients trained on the recipe's train data instead."""
    return run_plan(plan, out, force, progress)
