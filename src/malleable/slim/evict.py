"""KV-cache eviction at generation time: after the prompt's prefill, every attention layer keeps, per KV head,
the cached positions an eviction policy scores highest, and decoding goes on over the smaller cache.

    @eviction_policy("knorm")
    class KNorm(EvictionPolicy):
        def score(self, layer):                 # (batch, kv_heads, positions): higher is kept
            return -layer.keys.norm(dim=-1)

    with evicting(model, get_policy("snapkv", {}), ratio=0.5):
        out = model(context_ids, cache=DynamicCache(config=model.config))

The shape follows kvpress (NVIDIA's kvpress, `ScorerPress`): a forward hook on each decoder layer (not its
attention module, which a SkipGPT-routed layer may bypass) runs once the prefill has written the layer's keys
and values, scores the positions and gathers the `n_kept` best per KV head (so heads may keep different
positions, the same number each). The keys keep the rotary embedding of
their original positions, so what follows the context must be fed with its original position ids
(`continuation_logits`, `greedy_answer`: one token per forward, which needs no attention mask over a cache with
holes in it). With `decode_interval` the cache stays bounded while decoding too: every `decode_interval` new tokens
each layer compresses back to its prefill's budget, scored with the queries of the tokens since its last compression
(kvpress's `DecodingPress`). `n_kept` is kvpress's `compute_n_kept` for a ratio (the share removed) and the budget
itself for a token budget. Where kvpress takes the top-k in the order torch returns it, the kept positions are
sorted here: attention does not depend on the order, and sorted indices can be compared and reported.

Written by hand because transformers has no per-head eviction of a DynamicCache and kvpress pins an older
transformers (its attention hooks read `past_key_values`, which transformers 5.3 renamed `cache`); kvpress is
this code's oracle in bench/slim_kv.py, in its own virtualenv.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from malleable.errors import InputError, RecipeError
from malleable.params import Param, Registry


@dataclass
class LayerState:
    """What a policy may read of one attention layer right after the prefill: its module (for the projections and
    the config), its input hidden states (batch, positions, hidden), the cached keys and values (batch, kv_heads,
    positions, head_dim; keys with the rotary embedding applied), the rotary (cos, sin) of the positions, and
    how many positions each KV head keeps."""

    module: Any
    hidden_states: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    kept: int


class EvictionPolicy:
    """Base of every policy: `score(layer)` -> (batch, kv_heads, positions), the highest kept."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **p: Any) -> None:
        self.p = p

    def check(self, length: int, kept: int) -> None:
        """Refuse a prompt this policy cannot score (one line naming the parameter)."""

    def score(self, layer: LayerState) -> torch.Tensor:
        raise NotImplementedError


POLICIES = Registry("eviction policy", "malleable.slim", key="kv.policy")


def eviction_policy(name: str, *, params: dict[str, Param] | None = None
                    ) -> Callable[[type[EvictionPolicy]], type[EvictionPolicy]]:
    """Register an `EvictionPolicy` subclass as `name`; its docstring is the policy's documentation."""
    return POLICIES.register(name, params)


def get_policy(name: str, given: dict[str, Any] | None = None, key: str = "parameters") -> EvictionPolicy:
    """The registered policy `name` built with checked parameters (defaults filled in)."""
    return POLICIES.build(name, given, prefix=key)


def n_kept(length: int, ratio: float | None = None, budget: int | None = None) -> int:
    """How many of `length` cached positions each KV head keeps: the budget, or kvpress's rule for a ratio (the
    share removed; at least one position)."""
    if (ratio is None) == (budget is None):
        raise RecipeError("kv: give exactly one of ratio (the share of the cache removed) and budget (tokens kept)")
    if budget is not None:
        if budget < 1:
            raise RecipeError(f"kv.budget: {budget} must be at least 1")
        if budget > length:
            raise InputError(f"kv.budget: {budget} tokens is more than the prompt's {length}")
        return budget
    if not 0 <= ratio < 1:
        raise RecipeError(f"kv.ratio: {ratio} must be in [0, 1)")
    return max(1, int(length * (1 - ratio)))


def _layers(model) -> list:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer, "input_layernorm")
                                 for layer in layers):
        raise InputError(f"{type(model).__name__}: KV eviction needs a decoder whose layers have input_layernorm "
                         "and self_attn (Llama, Mistral, Qwen, Gemma)")
    return list(layers)


@dataclass
class _Tracked:
    """One layer's eviction state: the original positions its cache holds (batch, kv_heads, n), how many it
    keeps, and the decoding steps' hidden states and rotary embeddings since its last compression."""

    positions: torch.Tensor
    kept: int
    seen: int
    hidden: list = field(default_factory=list)
    cos: list = field(default_factory=list)
    sin: list = field(default_factory=list)


def _compress(policy: EvictionPolicy, layer, state: LayerState) -> torch.Tensor:
    """Keep the policy's `state.kept` best positions of each KV head of the cache `layer`; the indices kept
    (batch, kv_heads, n), increasing."""
    index = policy.score(state).topk(state.kept, dim=-1).indices.sort(dim=-1).values
    gather = index.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
    layer.keys = layer.keys.gather(2, gather).contiguous()
    layer.values = layer.values.gather(2, gather).contiguous()
    return index


@contextmanager
def evicting(model, policy: EvictionPolicy, *, ratio: float | None = None, budget: int | None = None,
             kept: dict[int, torch.Tensor] | None = None, decode_interval: int | None = None) -> Iterator[None]:
    """Inside the block, a prefill (the first forward over an empty cache) leaves each layer's cache with the
    positions `policy` keeps. With `decode_interval` the cache also stays bounded while decoding, as kvpress's
    `DecodingPress` (with `PrefillDecodingPress`) does: every `decode_interval` tokens decoded, each layer
    compresses back to the number of positions its prefill kept, the policy scoring with the hidden states of
    the steps since its last compression as the queries (so the cache never holds more than that number plus
    `decode_interval`); without it decoding only appends. `kept`, when given, receives each layer's kept
    original positions (batch, kv_heads, n) in increasing order after its latest compression (positions decoded
    since are in the cache too, appended)."""
    if decode_interval is not None and decode_interval < 1:
        raise RecipeError(f"kv.decode_interval: {decode_interval} must be at least 1 (decoding steps)")
    tracked: dict[int, _Tracked] = {}

    def hook(decoder_layer, args, kwargs, output):
        # on the decoder layer, not its attention: a SkipGPT-routed layer writes the keys and values of tokens
        # routed around attention without calling the attention module (models/routed.py)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or hidden is None:
            raise InputError("kv eviction: the decoder layer was called without a cache (use_cache=False?)")
        module = decoder_layer.self_attn
        norm = decoder_layer.input_layernorm  # the attention's input, as the policies score it, is norm(hidden)
        idx, layer = module.layer_idx, cache.layers[module.layer_idx]
        length, new = layer.keys.shape[-2], hidden.shape[1]
        if length == new:  # the prefill of an empty cache
            n = n_kept(length, ratio, budget)
            policy.check(length, n)
            index = _compress(policy, layer, LayerState(module, norm(hidden), layer.keys, layer.values,
                                                        kwargs["position_embeddings"], n))
            tracked[idx] = _Tracked(index, n, length)
        elif idx in tracked:  # decoding (or a continuation fed several tokens at a time)
            t = tracked[idx]
            added = torch.arange(t.seen, t.seen + new).expand(*t.positions.shape[:2], new)
            t.positions, t.seen = torch.cat([t.positions, added], dim=-1), t.seen + new
            if decode_interval is not None:
                cos, sin = kwargs["position_embeddings"]
                t.hidden.append(norm(hidden).detach())
                t.cos.append(cos)
                t.sin.append(sin)
                if sum(h.shape[1] for h in t.hidden) >= decode_interval and length > t.kept:
                    state = LayerState(module, torch.cat(t.hidden, dim=1), layer.keys, layer.values,
                                       (torch.cat(t.cos, dim=1), torch.cat(t.sin, dim=1)), t.kept)
                    t.positions = t.positions.gather(2, _compress(policy, layer, state))
                    t.hidden, t.cos, t.sin = [], [], []
                    if kept is not None:
                        kept[idx] = t.positions
        if kept is not None and length == new:
            kept[idx] = tracked[idx].positions
        return output

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in _layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _evicting_if(model, policy: EvictionPolicy | None, **size) -> Iterator[None]:
    if policy is None:
        yield
    else:
        with evicting(model, policy, **size):
            yield


def prefill(model, context_ids: torch.Tensor, policy: EvictionPolicy | None = None, **size):
    """(the cache after the context's prefill, evicted by `policy` unless None; the logits of the context's last
    position). `context_ids`: (1, positions); `size`: `evicting`'s ratio, budget, kept."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), _evicting_if(model, policy, **size):
        out = model(context_ids, cache=cache, use_cache=True)
    return cache, out.logits[:, -1]


def step(model, cache, token: torch.Tensor, position: int) -> torch.Tensor:
    """One decoding forward of `token` (1, 1) at its original `position`; the logits (1, vocab)."""
    with torch.no_grad():
        out = model(token, cache=cache, use_cache=True, position_ids=torch.tensor([[position]]))
    return out.logits[:, -1]


def continuation_logits(model, context_ids: torch.Tensor, continuation_ids: torch.Tensor,
                        policy: EvictionPolicy | None = None, **size) -> torch.Tensor:
    """(continuation positions, vocab): the logits predicting each continuation token after the context, whose
    cache `policy` evicted (None: the full cache), teacher forced one token at a time; `size`: `evicting`'s
    ratio, budget, kept and decode_interval (evicting during the continuation too)."""
    with _evicting_if(model, policy, **size):
        cache, logits = prefill(model, context_ids)
        rows, start = [logits], context_ids.shape[1]
        for i in range(continuation_ids.shape[1] - 1):
            rows.append(step(model, cache, continuation_ids[:, i:i + 1], start + i))
    return torch.cat(rows).float()


def greedy_answer(model, context_ids: torch.Tensor, question_ids: torch.Tensor, max_new_tokens: int,
                  eos: set[int], policy: EvictionPolicy | None = None, **size) -> list[int]:
    """Greedy token ids answering `question_ids` after the context, whose cache `policy` evicted at its prefill
    (kvpress's pipeline: the context is compressed, the question is not, unless `size` has a decode_interval)."""
    with _evicting_if(model, policy, **size):
        cache, logits = prefill(model, context_ids)
        position = context_ids.shape[1]
        for i in range(question_ids.shape[1]):
            logits = step(model, cache, question_ids[:, i:i + 1], position)
            position += 1
        answer: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax(dim=-1))
            answer.append(token)
            if token in eos:
                break
            logits = step(model, cache, torch.tensor([[token]]), position)
            position += 1
    return answer


def window_attention(layer: LayerState, window: int) -> torch.Tensor:
    """(batch, heads, window, positions): the attention weights of the last `window` positions' queries
    (recomputed from the layer's input, with its rotary embedding and q_norm where the model has one) over every
    position, softmax in float32, causal (0 on the keys after each query), as kvpress's
    `SnapKVPress.compute_window_attention` before its slice (scaled by 1/sqrt(head_dim) as there)."""
    import math

    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    module, hidden, keys = layer.module, layer.hidden_states, layer.keys
    window = min(window, hidden.shape[1])  # while decoding: only the steps since the last compression
    batch, kv_heads, length, head_dim = keys.shape
    heads = module.config.num_attention_heads
    q = module.q_proj(hidden[:, -window:]).view(batch, window, heads, head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    cos, sin = (t[:, -window:].unsqueeze(1) for t in layer.position_embeddings)
    q = q * cos + rotate_half(q) * sin
    weights = q @ repeat_kv(keys, heads // kv_heads).transpose(2, 3) / math.sqrt(head_dim)
    weights = weights + torch.triu(torch.full_like(weights, float("-inf")), diagonal=length - window + 1)
    return torch.softmax(weights, dim=-1, dtype=torch.float32)


def per_kv_head(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch, heads, positions) -> (batch, kv_heads, positions): the mean over the query heads sharing a KV head
    (grouped-query attention; SnapKV's issue #22 as kvpress does)."""
    batch, heads, length = scores.shape
    return scores.view(batch, kv_heads, heads // kv_heads, length).mean(dim=2)
