"""Runs inside kvpress's virtualenv (bench/setup_kvpress.sh), called by bench/slim_kv.py: for every case of the
JSON job on stdin (a policy, a ratio, the context and continuation token ids), kvpress's own press compresses the
context's prefill, and the worker reports which positions each layer and KV head kept (found by matching the
compressed keys to the uncompressed ones) and the continuation's logits-derived NLL, decoded one token at a time
at the original positions as bench/slim_kv.py decodes ours. A case with a `decode_interval` also compresses while
decoding (kvpress's PrefillDecodingPress over a DecodingPress of the same scorer, back to the prefill's kept count
every `decode_interval` steps) and reports layer 0's positions at the end (layer 0's keys depend only on the token
and its position, so they match the full cache's). Writes JSON to stdout."""

import json
import sys

import torch
from kvpress import DecodingPress, KnormPress, PrefillDecodingPress, SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = {"streaming_llm": lambda r, p: StreamingLLMPress(compression_ratio=r, **p),
           "knorm": lambda r, p: KnormPress(compression_ratio=r),
           "snapkv": lambda r, p: SnapKVPress(compression_ratio=r, **p)}


def kept_positions(full: torch.Tensor, compressed: torch.Tensor) -> list[list[int]]:
    """Per KV head, the index in `full` (1, heads, n, d) of each row of `compressed` (1, heads, m, d), sorted."""
    out = []
    for h in range(full.shape[1]):
        d = torch.cdist(compressed[0, h].double(), full[0, h].double())
        out.append(sorted(int(i) for i in d.argmin(dim=1)))
    return out


def main() -> None:
    job = json.load(sys.stdin)
    torch.set_num_threads(job.get("threads", 2))
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    results = []
    for case in job["cases"]:
        context = torch.tensor([case["context"]])
        continuation = torch.tensor([case["continuation"]])
        with torch.no_grad():
            full = DynamicCache()
            model(context, past_key_values=full, use_cache=True)
            cache = DynamicCache()
            press = PRESSES[case["policy"]](case["ratio"], case.get("parameters", {}))
            if case.get("decode_interval"):
                press = PrefillDecodingPress(press, DecodingPress(
                    PRESSES[case["policy"]](0.0, case.get("parameters", {})),
                    compression_interval=case["decode_interval"], target_size=case["target"]))
            with press(model):
                out = model(context, past_key_values=cache, use_cache=True)
                kept = [kept_positions(full.layers[i].keys, cache.layers[i].keys) for i in range(len(cache.layers))]
                logits, position = [out.logits[:, -1]], context.shape[1]
                for i in range(continuation.shape[1] - 1):
                    step = model(continuation[:, i:i + 1], past_key_values=cache, use_cache=True,
                                 position_ids=torch.tensor([[position + i]]))
                    logits.append(step.logits[:, -1])
            nll = torch.nn.functional.cross_entropy(torch.cat(logits).float(), continuation[0])
            result = {"kept": kept, "nll": float(nll)}
            if case.get("decode_interval"):
                whole = DynamicCache()
                model(torch.cat([context, continuation[:, :-1]], dim=1), past_key_values=whole, use_cache=True)
                result["final_layer0"] = kept_positions(whole.layers[0].keys, cache.layers[0].keys)
        results.append(result)
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    main()
