"""Token-routed module skipping (SkipGPT's inference side): two small routers per decoder layer decide, token by
token, whether the layer's attention and its MLP run; a module a token is routed around is really not computed
for it (gather the kept tokens, run the module on them only, scatter the result back; the residual passes
unchanged for the others), so the time saved is real.

This file is the mechanism only: the routers, the routed forward of a Llama-style decoder layer (Llama, Mistral,
Qwen2: input_layernorm, self_attn with q/k/v/o projections, post_attention_layernorm, mlp), and the routers' file
beside a checkpoint, applied by `models.checkpoints.load_model` when config.json carries `malleable_skipgpt`.
Training the routers (Gumbel-softmax gates, the sparsity loss) is slim/skipgpt.py's.

Modes of an installed model (`Routing.mode`):
  "open"   every gate open: the layer's own forward, bit for bit the base model;
  "train"  the authors' training forward: both modules run for every token and their outputs are multiplied by
           the hard Gumbel-softmax gate (straight-through), temperature `Routing.tau`;
  "hard"   inference: the argmax decision (logit of "execute" >= logit of "skip"), modules skipped for real.

Keys and values of a token that skips attention: the reference code runs attention for every token and multiplies
its output by the gate, so a token routed around attention still leaves its key and value for the later tokens
to attend to. The hard path keeps exactly that: it always computes the (small, GQA) key and value projections
of every token and writes them to the KV cache, and skips the query projection, the attention itself and the
output projection for the tokens routed around it. Decoding therefore stays consistent with training, and the
cache has no holes (no mask or position bookkeeping is needed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from malleable.errors import InputError

ROUTERS_FILE = "skipgpt_routers.safetensors"
CONFIG_KEY = "malleable_skipgpt"
FORMAT = "malleable.skipgpt/1"
MODULES = ("attention", "mlp")


class TokenRouter(nn.Module):
    """Linear(d, d/4), ReLU, Linear(d/4, 2): logits of (execute, skip) per token; the reference's TokenRouter and
    its initialisation (Kaiming-uniform weights, zero biases), computed in float32."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(hidden, hidden // 4)
        self.out = nn.Linear(hidden // 4, 2)
        nn.init.kaiming_uniform_(self.hidden.weight, nonlinearity="relu")
        nn.init.kaiming_uniform_(self.out.weight, nonlinearity="linear")
        nn.init.zeros_(self.hidden.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.to(self.hidden.weight.dtype))))


class LayerRouters(nn.Module):
    """One decoder layer's routers; both read the layer's input hidden states (as the reference's Llama code,
    whose MLP router reads the attention's residual, i.e. the layer input). `modules` names the routed ones (the
    authors route both); a module without a router always executes."""

    def __init__(self, hidden: int, modules: tuple[str, ...] = MODULES):
        super().__init__()
        self.routed = tuple(m for m in MODULES if m in modules)
        for m in self.routed:
            setattr(self, m, TokenRouter(hidden))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 2 per routed module): (execute, skip) logits. Frozen routers run fused (one product for every
        routed module's hidden layer, one block-diagonal product for their outputs), which at one token per
        forward saves calls; trainable ones run one by one."""
        routers = [getattr(self, m) for m in self.routed]
        params = self.__dict__.setdefault("_params", tuple(self.parameters()))  # a generator per call costs µs
        if any(p.requires_grad for p in params):
            return torch.cat([r(x) for r in routers], -1)
        fused = self.__dict__.get("_fused")
        if fused is None:
            fused = self.__dict__["_fused"] = (
                torch.cat([r.hidden.weight for r in routers]), torch.cat([r.hidden.bias for r in routers]),
                torch.block_diag(*(r.out.weight for r in routers)), torch.cat([r.out.bias for r in routers]))
        w1, b1, w2, b2 = fused
        return nn.functional.linear(torch.relu(nn.functional.linear(x.to(w1.dtype), w1, b1)), w2, b2)

    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 2) booleans, [attention, MLP] per token: True = execute (the argmax, a tie executing; a module
        without a router always)."""
        logits = self.logits(x)
        keep = logits[..., 0::2] >= logits[..., 1::2]
        if len(self.routed) == len(MODULES):
            return keep
        out = torch.ones(*keep.shape[:-1], len(MODULES), dtype=torch.bool, device=keep.device)
        out[..., [MODULES.index(m) for m in self.routed]] = keep
        return out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
        """(decide(x), or None for a single token; tokens executed per module). A decoding step routes one token
        and only needs the counts, which come from the logits as Python numbers: the same `>=` on the same
        float32 values, without the half-dozen tensor operations that cost as much as the routers' products."""
        if x.shape[:-1].numel() != 1:
            keep = self.decide(x)
            return keep, keep.sum(tuple(range(keep.dim() - 1))).tolist()
        v = self.logits(x).view(-1).tolist()
        execute = {m: int(v[2 * i] >= v[2 * i + 1]) for i, m in enumerate(self.routed)}
        return None, [execute.get(m, 1) for m in MODULES]

    def gates(self, x: torch.Tensor, tau: float) -> list[torch.Tensor]:
        """Training: per module, the hard Gumbel-softmax sample of "execute" (straight-through), ones for a
        module without a router."""
        return [nn.functional.gumbel_softmax(getattr(self, m)(x).float(), tau=tau, hard=True, dim=-1)[..., 0]
                if m in self.routed else x.new_ones(x.shape[:-1], dtype=torch.float32) for m in MODULES]


@dataclass
class Routing:
    """The routers of a model and how its layers use them; counters of the hard path's decisions."""

    routers: nn.ModuleList
    mode: str = "hard"
    tau: float = 1.0
    gates: list = field(default_factory=list)  # train mode: per layer (attention gate, mlp gate), this forward
    tokens: int = 0
    skipped: dict = field(default_factory=lambda: {m: 0 for m in MODULES})

    def reset(self) -> None:
        self.tokens, self.skipped = 0, {m: 0 for m in MODULES}

    def skip_rates(self) -> dict:
        """Share of (token, layer) pairs routed around each module since the last reset, in hard mode."""
        n = max(1, self.tokens)
        return {m: self.skipped[m] / n for m in MODULES}


def decoder_layers(model) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList):
        raise InputError(f"{type(model).__name__}: no decoder layers found (model.get_decoder().layers)")
    return layers


def check_layer(layer, where: str) -> None:
    """The routed forward rewrites a Llama-style layer with a plain causal cache; anything else is refused."""
    attn = getattr(layer, "self_attn", None)
    plain = attn is not None and all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm",
                                                                  "mlp")) \
        and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
    if not plain or hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None) is not None:
        raise InputError(f"{where}: {type(layer).__name__} is not a Llama-style decoder layer (input_layernorm, "
                         "self_attn q/k/v/o without query/key norms or a sliding window, post_attention_layernorm, "
                         "mlp); SkipGPT routing supports those")


def install(model, routers: nn.ModuleList, mode: str = "hard") -> Routing:
    """Route `model`'s decoder layers through `routers` (one LayerRouters per layer); returns the Routing whose
    mode and temperature the caller sets. The routers stay outside the model's modules: save_pretrained writes the
    base weights only."""
    layers = decoder_layers(model)
    if len(routers) != len(layers):
        raise InputError(f"routers: {len(routers)} layers of routers for a model of {len(layers)} decoder layers")
    for i, layer in enumerate(layers):
        check_layer(layer, f"decoder layer {i}")
    routing = Routing(routers, mode)
    for layer, r in zip(layers, routers):
        layer.forward = _RoutedLayer(layer, r, routing).forward
    model._malleable_routing = routing
    return routing


def uninstall(model) -> None:
    for layer in decoder_layers(model):
        layer.__dict__.pop("forward", None)
    model.__dict__.pop("_malleable_routing", None)


def routing_of(model) -> Routing | None:
    return getattr(model, "_malleable_routing", None)


class _RoutedLayer:
    """A decoder layer's routed forward, installed as the layer's `forward` (a bound method, so that deepcopy of
    the model copies it with the layer, its routers and the shared Routing)."""

    def __init__(self, layer, routers: LayerRouters, routing: Routing):
        self.layer, self.routers, self.routing = layer, routers, routing

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        layer, routers, routing = self.layer, self.routers, self.routing
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        attn_kw = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                       position_embeddings=position_embeddings, **kwargs)
        if routing.mode == "open":
            return type(layer).forward(layer, hidden_states, **attn_kw)
        x = hidden_states
        if routing.mode == "train":
            ga, gm = routers.gates(x, routing.tau)
            routing.gates.append((ga, gm))
            h = layer.self_attn(hidden_states=layer.input_layernorm(x), **attn_kw)[0]
            x = x + h * ga.unsqueeze(-1).to(h.dtype)
            m = layer.mlp(layer.post_attention_layernorm(x))
            return x + m * gm.unsqueeze(-1).to(m.dtype)
        keep, kept = routers.route(x)  # kept: [attention, MLP] tokens executed; keep None: one token, all or none
        n = x.shape[:-1].numel()
        routing.tokens += n
        routing.skipped["attention"] += n - kept[0]
        routing.skipped["mlp"] += n - kept[1]
        if kept[0] or cache is not None:  # no query runs and nothing is cached: nothing to do
            x = attention_part(layer, x, None if keep is None else keep[..., 0], attn_kw, kept[0], n)
        return mlp_part(layer, x, None if keep is None else keep[..., 1], kept[1] == n) if kept[1] else x


def mlp_part(layer, x: torch.Tensor, keep: torch.Tensor | None, every: bool) -> torch.Tensor:
    """x + mlp(norm(x)) for the kept tokens (`every`: all of them), x for the others; only the kept tokens go
    through the MLP."""
    if every:
        return x + layer.mlp(layer.post_attention_layernorm(x))
    flat = x.reshape(-1, x.shape[-1])
    idx = keep.reshape(-1).nonzero().squeeze(1)
    out = layer.mlp(layer.post_attention_layernorm(flat.index_select(0, idx)))
    return flat.index_add(0, idx, out.to(flat.dtype)).view_as(x)


def attention_part(layer, x: torch.Tensor, keep: torch.Tensor | None, kw: dict, kept: int, n: int) -> torch.Tensor:
    """x + attention(norm(x)) for the `kept` of the `n` tokens `keep` marks, x for the others. Every token's key
    and value are computed and cached (see the module docstring); queries, attention and the output projection
    only for the kept ones."""
    attn = layer.self_attn
    if kept == n:
        return x + attn(hidden_states=layer.input_layernorm(x), **kw)[0]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    b, s, _ = x.shape
    hd = attn.head_dim
    h = layer.input_layernorm(x)
    k = attn.k_proj(h).view(b, s, -1, hd).transpose(1, 2)
    v = attn.v_proj(h).view(b, s, -1, hd).transpose(1, 2)
    cos, sin = kw["position_embeddings"]
    _, k = rope(k, k, cos, sin)
    cache = kw.get("cache")
    if cache is not None:
        extra = {k_: v_ for k_, v_ in kw.items() if k_ not in ("attention_mask", "position_ids", "cache",
                                                               "use_cache", "position_embeddings")}
        k, v = cache.update(k, v, attn.layer_idx, kwargs=extra)
    if not kept:
        return x
    mask = kw.get("attention_mask")
    total = k.shape[2]
    out = x.clone()
    for r in range(b):
        idx = keep[r].nonzero().squeeze(1)
        if not len(idx):
            continue
        q = attn.q_proj(h[r, idx]).view(1, len(idx), -1, hd).transpose(1, 2)
        c, sn = cos[min(r, cos.shape[0] - 1)][idx][None], sin[min(r, sin.shape[0] - 1)][idx][None]
        q, _ = rope(q, q, c, sn)
        if mask is None:  # causal: the kept queries sit at positions total - s + idx of the cache
            allowed = torch.arange(total, device=x.device)[None] <= (total - s + idx)[:, None]
        else:
            rows = mask[min(r, mask.shape[0] - 1), :, idx, :total]
            allowed = rows if rows.dtype == torch.bool else rows == 0
            allowed = allowed[0] if allowed.dim() == 3 else allowed
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # a query that may see nothing (padding): no NaN
        o = nn.functional.scaled_dot_product_attention(
            q, k[r:r + 1], v[r:r + 1], attn_mask=allowed[None, None], scale=attn.scaling,
            enable_gqa=q.shape[1] != k.shape[1])
        o = attn.o_proj(o.transpose(1, 2).reshape(1, len(idx), -1))[0]
        out[r, idx] = x[r, idx] + o.to(x.dtype)
    return out


# -- the routers' file -----------------------------------------------------------------------------------------
def save_routers(routers: nn.ModuleList, folder: str | Path, meta: dict) -> Path:
    """Write the routers (float32) as `ROUTERS_FILE` in `folder`: keys layers.{i}.{attention,mlp}.{hidden,out}
    .{weight,bias} for the routed modules, named in the header's `modules` (absent in files from before the
    choice: both); `meta` (strings) in the header beside the format."""
    from safetensors.torch import save_file

    tensors = {f"layers.{k}": v.detach().float().contiguous() for k, v in routers.state_dict().items()}
    path = Path(folder) / ROUTERS_FILE
    save_file(tensors, str(path), metadata={"format": FORMAT, "modules": ",".join(routers[0].routed),
                                            **{k: str(v) for k, v in meta.items()}})
    return path


def load_routers(folder: str | Path, hidden: int, n_layers: int) -> nn.ModuleList:
    """The routers written by `save_routers`, checked against the model they are for (one line when not)."""
    from safetensors import safe_open

    path = Path(folder) / ROUTERS_FILE
    if not path.is_file():
        raise InputError(f"{folder}: config.json marks a SkipGPT checkpoint ({CONFIG_KEY}) but {ROUTERS_FILE} is "
                         "missing; copy it beside the model or remove the key to load the dense model")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged or foreign file
        from malleable.errors import reason

        raise InputError(f"{path}: cannot read the routers ({reason(e, typed=True)})") from None
    if header.get("format") != FORMAT:
        raise InputError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    modules = tuple(header.get("modules", ",".join(MODULES)).split(","))
    if not set(modules) <= set(MODULES):
        raise InputError(f"{path}: header modules {','.join(modules)!r}, expected some of {', '.join(MODULES)}")
    routers = nn.ModuleList(LayerRouters(hidden, modules) for _ in range(n_layers))
    want = {f"layers.{k}": v.shape for k, v in routers.state_dict().items()}
    got = {k: v.shape for k, v in tensors.items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise InputError(f"{path}: routers do not fit the model ({hidden} wide, {n_layers} layers): e.g. '{bad[0]}'")
    routers.load_state_dict({k.removeprefix("layers."): v for k, v in tensors.items()})
    return routers.eval().requires_grad_(False)


def attach(model, folder: str | Path) -> Routing:
    """Apply the routers saved beside a checkpoint (`load_model` calls this when config.json says so)."""
    layers = decoder_layers(model)
    routers = load_routers(folder, model.config.hidden_size, len(layers))
    return install(model, routers, "hard")
