"""KV-cache eviction on a SkipGPT-routed model beside the dense model it came from (issue 16: the slim methods
composed): `malleable slim` with a `kv:` section and no method, on SmolLM2-135M-Instruct and on the SkipGPT
checkpoint bench/slim_skipgpt.py trained (`skipgpt-25-lr0.01-cur15-lora`, routers applied by the loader, as
served). Each model is measured against its own full cache (slim/kv_eval.py: next-token NLL and KL after 1,024-token
prefills of gensim's lee, 64 teacher-forced tokens, 3 windows; 12 needles), half of the cache removed after the
prefill and again every 16 decoded tokens (`decode_interval`).

    python bench/slim_kv_routed.py     # needs bench/slim_skipgpt.py --lr 0.01 --curriculum 15 --lora-steps 30 first
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt, loadavg, machine, write_results  # noqa: E402

from malleable.api import slim  # noqa: E402
from malleable.models.checkpoints import default_cache_dir  # noqa: E402
from malleable.models.smollm2 import smollm2_checkpoint  # noqa: E402

ROUTED = "skipgpt-25-lr0.01-cur15-lora"
POLICIES = ("snapkv", "streaming_llm")
KV = {"ratio": 0.5, "decode_interval": 16}


def main() -> None:
    routed = default_cache_dir("slim-bench") / ROUTED
    if not (routed / "skipgpt_routers.safetensors").is_file():
        sys.exit(f"no SkipGPT checkpoint at {routed}: run bench/slim_skipgpt.py --lr 0.01 --curriculum 15 "
                 "--lora-steps 30 first")
    work = default_cache_dir("slim-bench") / "kv-routed"
    models = {"dense": smollm2_checkpoint(), "skipgpt": routed}
    start, load_start = time.perf_counter(), loadavg()
    rows = []
    for policy in POLICIES:
        for name, path in models.items():
            report = slim({"model": str(path), "kv": {"policy": policy, **KV}}, work / f"{name}-{policy}",
                          force=True, progress=False)
            s = report["kv"]["summary"]
            rows.append({"model": name, "policy": policy, "full": s["full"], "evicted": s["evicted"]})
            print(name, policy, s["evicted"]["kl"], flush=True)
    data = {"benchmark": "slim_kv_routed", "routed_checkpoint": ROUTED, "kv": KV, "rows": rows,
            "machine": machine(), "loadavg_start": load_start, "loadavg_end": loadavg(),
            "wall_s": round(time.perf_counter() - start, 1)}
    write_results("slim_kv_routed", data, markdown(data))


def markdown(d: dict) -> str:
    lines = ["# KV-cache eviction on a SkipGPT-routed model and on the dense model", "",
             f"SmolLM2-135M-Instruct (dense) and `{d['routed_checkpoint']}` (bench/slim_skipgpt.py, routers applied as "
             f"served); half of the cache removed after each 1,024-token prefill and every "
             f"{d['kv']['decode_interval']} decoded tokens; each model against its own full cache. Method: the "
             "docstring of bench/slim_kv_routed.py.", "",
             "| policy | model | NLL full cache | NLL evicted | KL from the full cache | needles full | needles evicted |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['policy']} | {r['model']} | {fmt(r['full']['nll'], 3)} | {fmt(r['evicted']['nll'], 3)} | "
                     f"{fmt(r['evicted']['kl'], 4)} | {fmt(r['full']['needle'], 2)} | {fmt(r['evicted']['needle'], 2)} |")
    m = d["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores; load average {d['loadavg_start']} at the start, "
                  f"{d['loadavg_end']} at the end; wall {d['wall_s']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
