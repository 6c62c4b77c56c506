"""Runs inside llm-compressor's virtualenv (bench/setup_llmcompressor.sh), called by the pruning benchmark: the
JSON job on stdin names a model folder, a method (wanda or sparsegpt), a sparsity, a mask structure ("0:0"
unstructured, "2:4", "4:8"), the calibration samples as token ids, and an output file. llm-compressor's own
`oneshot` prunes the decoder layers' Linear modules (its sequential pipeline, no shuffling of the samples), and
the worker writes every pruned weight (safetensors) and, on stdout, the pruning call's seconds and the process's
peak RSS."""

import json
import sys
import time

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    job = json.load(sys.stdin)
    torch.set_num_threads(job.get("threads", 2))
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    samples = job["samples"]
    data = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[job["method"]](
        sparsity=job["sparsity"], mask_structure=job["mask_structure"], **job.get("parameters", {}))
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(job.get("tokenizer", job["model"]))  # oneshot wants one with data
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=modifier, num_calibration_samples=len(samples),
            max_seq_length=max(len(s) for s in samples), shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - start
    pruned = {n: p.detach().contiguous() for n, p in model.named_parameters()
              if n.startswith("model.layers.") and p.dim() == 2}
    save_file(pruned, job["out"])
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report at least the calling bench's own size
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    json.dump({"seconds": seconds, "peak_rss_mib": hwm / 1024,
               "transformers": __import__("transformers").__version__}, sys.stdout)


if __name__ == "__main__":
    main()
