"""KV-cache eviction (slim/evict.py and its policies) on a tiny random Llama with grouped-query attention: the
decode path over a cache equals the plain forward, the budget is kept exactly per KV head, each policy keeps
what its definition says, and bad settings are one line."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY
from transformers import LlamaConfig, LlamaForCausalLM

from malleable.errors import InputError, RecipeError
from malleable.slim.evict import continuation_logits, evicting, get_policy, greedy_answer, n_kept, prefill, step


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, "num_attention_heads": 4, "num_key_value_heads": 2})).eval()


@pytest.fixture(scope="module")
def ids(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (1, 40), generator=g)


def test_the_full_cache_path_equals_the_plain_forward(model, ids):
    with torch.no_grad():
        full = model(ids).logits[0, 29:39].float()
    ours = continuation_logits(model, ids[:, :30], ids[:, 30:40])
    assert torch.allclose(ours, full, atol=1e-5)


@pytest.mark.parametrize("name", ["streaming_llm", "knorm", "snapkv", "h2o"])
def test_ratio_zero_keeps_everything_and_changes_nothing(model, ids, name):
    policy = get_policy(name, {"window_size": 8} if name == "snapkv" else {})
    full = continuation_logits(model, ids[:, :30], ids[:, 30:40])
    kept = {}
    ours = continuation_logits(model, ids[:, :30], ids[:, 30:40], policy, ratio=0.0, kept=kept)
    assert all((k == torch.arange(30)).all() for k in kept.values())
    assert torch.allclose(ours, full, atol=1e-6)


@pytest.mark.parametrize("name", ["streaming_llm", "knorm", "snapkv", "h2o"])
def test_eviction_keeps_exactly_the_budget_per_kv_head(model, ids, name):
    policy = get_policy(name, {"window_size": 8} if name == "snapkv" else {})
    kept = {}
    cache, _ = prefill(model, ids[:, :30], policy, budget=12, kept=kept)
    assert sorted(kept) == list(range(model.config.num_hidden_layers))
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape == (1, 2, 12, model.config.hidden_size // 4) == layer.values.shape
        assert kept[i].shape == (1, 2, 12) and all(len(set(h.tolist())) == 12 for h in kept[i][0])
    assert n_kept(30, ratio=0.5) == 15 and n_kept(3, ratio=0.9) == 1  # kvpress's compute_n_kept


def test_streaming_llm_keeps_the_sinks_and_the_most_recent(model, ids):
    kept = {}
    prefill(model, ids[:, :30], get_policy("streaming_llm", {"n_sink": 4}), ratio=0.5, kept=kept)
    want = list(range(4)) + list(range(19, 30))  # 15 kept: 4 sinks + the last 11
    assert all(k[0, h].tolist() == want for k in kept.values() for h in range(2))


def test_knorm_keeps_the_smallest_key_norms(model, ids):
    cache, _ = prefill(model, ids[:, :30])
    norms = [layer.keys.norm(dim=-1) for layer in cache.layers]
    kept = {}
    prefill(model, ids[:, :30], get_policy("knorm"), budget=10, kept=kept)
    for i, n in enumerate(norms):
        assert (kept[i] == n.topk(10, largest=False).indices.sort().values).all()


def test_snapkv_always_keeps_its_window_and_scores_by_the_windows_attention(model, ids):
    """SnapKV written out for layer 0: the last 8 queries' causal softmax over the 22 earlier keys, averaged,
    pooled over 5 positions (zero padded), averaged over the 2 query heads of each KV head."""
    cache, _ = prefill(model, ids[:, :30])
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[:, :30]))
        cos, sin = model.model.rotary_emb(hidden, torch.arange(30)[None])
        q = attn.q_proj(hidden).view(1, 30, 4, 16).transpose(1, 2)
        half = q.shape[-1] // 2
        q = q * cos[:, None] + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin[:, None]
        k = cache.layers[0].keys.repeat_interleave(2, dim=1)
        w = (q @ k.transpose(2, 3)) / math.sqrt(16)
        w = w + torch.triu(torch.full((30, 30), float("-inf")), diagonal=1)
        votes = torch.softmax(w, dim=-1)[:, :, 22:, :22].mean(dim=2)
        votes = torch.nn.functional.avg_pool1d(votes, 5, 1, 2).view(1, 2, 2, 22).mean(dim=2)
    kept = {}
    prefill(model, ids[:, :30], get_policy("snapkv", {"window_size": 8}), budget=14, kept=kept)
    for h in range(2):
        assert kept[0][0, h].tolist() == sorted(votes[0, h].topk(6).indices.tolist() + list(range(22, 30)))


def test_h2o_splits_the_budget_between_recent_and_heavy_hitters(model, ids):
    kept = {}
    prefill(model, ids[:, :30], get_policy("h2o", {"recent": 0.5}), budget=10, kept=kept)
    assert all(set(range(25, 30)) <= set(k[0, h].tolist()) for k in kept.values() for h in range(2))


def test_greedy_answer_without_eviction_equals_generate(model, ids):
    with torch.no_grad():
        want = model.generate(ids[:, :30], max_new_tokens=6, do_sample=False)[0, 30:].tolist()
    assert greedy_answer(model, ids[:, :26], ids[:, 26:30], 6, eos=set()) == want


@pytest.mark.parametrize("size, policy, words", [
    ({"ratio": 1.0}, ("knorm", {}), "kv.ratio"),
    ({"ratio": -0.1}, ("knorm", {}), "kv.ratio"),
    ({"budget": 31}, ("knorm", {}), "more than the prompt's 30"),
    ({"budget": 0}, ("knorm", {}), "kv.budget"),
    ({"ratio": 0.5, "budget": 4}, ("knorm", {}), "exactly one"),
    ({"budget": 10}, ("snapkv", {"window_size": 30}), "parameters.window_size"),
    ({"budget": 4}, ("streaming_llm", {"n_sink": 4}), "parameters.n_sink"),
])
def test_bad_settings_are_one_line(model, ids, size, policy, words):
    with pytest.raises((InputError, RecipeError), match=words):
        prefill(model, ids[:, :30], get_policy(*policy), **size)


def decode(model, ids, policy, kept, **size):
    """Prefill 30 tokens, then feed tokens 30..39 one at a time inside one eviction context; the cache and
    each layer's cache length after every step."""
    lengths = []
    with evicting(model, policy, kept=kept, **size):
        cache, _ = prefill(model, ids[:, :30])
        for p in range(30, 40):
            step(model, cache, ids[:, p:p + 1], p)
            lengths.append({layer.keys.shape[2] for layer in cache.layers})
    return cache, lengths


def test_decoding_eviction_bounds_the_cache_and_streaming_keeps_sinks_and_the_newest(model, ids):
    kept = {}
    cache, lengths = decode(model, ids, get_policy("streaming_llm", {"n_sink": 4}), kept, budget=12,
                            decode_interval=4)
    # 30 -> 12 at the prefill; +1 per step, back to 12 after every 4th step (positions 33 and 37)
    assert lengths == [{13}, {14}, {15}, {12}, {13}, {14}, {15}, {12}, {13}, {14}]
    want = list(range(4)) + list(range(30, 38))  # at the last compression: the sinks and the newest 8
    assert all(k[0, h].tolist() == want for k in kept.values() for h in range(2))


def test_decoding_eviction_tracks_original_positions(model, ids):
    """Layer 0's keys depend only on the token and its position, so the evicted cache's layer-0 keys must equal
    the full cache's at the original positions reported in `kept` (knorm evicts anywhere, even the newest)."""
    full, _ = decode(model, ids, get_policy("knorm"), {}, ratio=0.0)
    kept = {}
    cache, lengths = decode(model, ids, get_policy("knorm"), kept, budget=9, decode_interval=3)
    assert max(max(n) for n in lengths) <= 9 + 3
    # compressions after positions 32, 35 and 38, then 39 appended
    positions = torch.cat([kept[0], torch.full((1, 2, 1), 39)], dim=-1)
    assert kept[0].shape[-1] == 9 and (kept[0][..., -1] <= 38).all()
    index = positions.unsqueeze(-1).expand(-1, -1, -1, full.layers[0].keys.shape[-1])
    assert torch.allclose(cache.layers[0].keys, full.layers[0].keys.gather(2, index), atol=1e-6)


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_decoding_eviction_with_attention_policies_keeps_the_budget(model, ids, name):
    """SnapKV's window (8) is longer than the 3 steps buffered between compressions: it votes with those."""
    policy = get_policy(name, {"window_size": 8} if name == "snapkv" else {})
    kept = {}
    _, lengths = decode(model, ids, policy, kept, budget=12, decode_interval=3)
    assert lengths[2] == {12} and lengths[5] == {12} and lengths[-1] == {13}
    assert all(k.shape[-1] == 12 and len(set(k[0, 0].tolist())) == 12 for k in kept.values())
    assert any(k.max() > 29 for k in kept.values())  # decoded positions compete for the budget


def test_an_interval_never_reached_equals_prefill_only_eviction(model, ids):
    policy = get_policy("snapkv", {"window_size": 8})
    once = continuation_logits(model, ids[:, :30], ids[:, 30:40], policy, budget=12)
    bounded = continuation_logits(model, ids[:, :30], ids[:, 30:40], policy, budget=12, decode_interval=50)
    assert torch.equal(once, bounded)
    with pytest.raises(RecipeError, match="kv.decode_interval"):
        continuation_logits(model, ids[:, :30], ids[:, 30:40], policy, budget=12, decode_interval=0)


def test_unknown_policy_or_parameter_is_refused():
    with pytest.raises(RecipeError, match="unknown eviction policy 'lru'"):
        get_policy("lru")
    with pytest.raises(RecipeError, match="window"):
        get_policy("knorm", {"window": 3})


@pytest.mark.parametrize("name", ["streaming_llm", "snapkv"])
def test_eviction_on_a_skipgpt_routed_model_bounds_every_layer(model, ids, name):
    """A routed layer whose tokens partly skip attention writes its keys and values without calling the attention
    module's forward: eviction must still compress that layer's cache and track its positions while decoding."""
    import copy

    from malleable.models.routed import install, routing_of
    from test_slim_skipgpt import routers_for

    routed = copy.deepcopy(model)
    install(routed, routers_for(routed, seed=5))
    policy = get_policy(name, {"window_size": 8} if name == "snapkv" else {})
    kept = {}
    cache, lengths = decode(routed, ids, policy, kept, budget=12, decode_interval=4)
    rates = routing_of(routed).skip_rates()
    assert 0 < rates["attention"] < 1  # some tokens really went around attention
    assert lengths == [{13}, {14}, {15}, {12}, {13}, {14}, {15}, {12}, {13}, {14}]
    assert sorted(kept) == list(range(model.config.num_hidden_layers))
    assert all(k.shape[-1] == 12 and len(set(k[0, 0].tolist())) == 12 for k in kept.values())
    # layer 0's keys depend only on token and position: the evicted cache holds the full cache's at `kept`
    full, _ = decode(routed, ids, policy, {}, ratio=0.0)
    positions = torch.cat([kept[0], torch.arange(38, 40).expand(1, 2, 2)], dim=-1)
    index = positions.unsqueeze(-1).expand(-1, -1, -1, full.layers[0].keys.shape[-1])
    assert torch.allclose(cache.layers[0].keys, full.layers[0].keys.gather(2, index), atol=1e-6)
