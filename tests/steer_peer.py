"""Run inside the steering peers' virtualenv (bench/setup_steering.sh): repeng 0.4.0 and steering-vectors 0.12.2
read directions from the tiny checkpoint, end to end and on given activations; tests/test_steer_oracle.py
compares them with ours.

    python steer_peer.py MODEL_DIR PAIRS_JSON ACTS_SAFETENSORS OUT_SAFETENSORS
"""

import json
import sys

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from repeng.extract import DatasetEntry, read_representations
from steering_vectors import train_steering_vector
from steering_vectors.aggregators import logistic_aggregator, mean_aggregator

model_dir, pairs_file, acts_file, out_file = sys.argv[1:5]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
# the tokenizer files transformers 5 writes name a class transformers 4 lacks: build it from tokenizer.json
tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json", pad_token="<pad>", unk_token="<unk>",
                              eos_token="<eos>")
pairs = json.loads(open(pairs_file).read())
texts = [(p["prompt"] + p["positive"], p["prompt"] + p["negative"]) for p in pairs]
entries = [DatasetEntry(positive=a, negative=b) for a, b in texts]
out = {}
for method in ("pca_diff", "pca_center"):
    # end to end: repeng's own reading (hidden_states[layer + 1] at the last token; layer 0 only, since the
    # last entry of hidden_states is after the final norm, not a decoder layer's output)
    out[f"repeng_e2e.{method}.0"] = read_representations(model, tok, entries, hidden_layers=[0], method=method)[0]
    # on the given activations: repeng's formulas over ours (its transform_hiddens hook swaps them in)
    acts = load_file(acts_file)
    given = {i: np.stack([acts[f"pos.{i}"], acts[f"neg.{i}"]], axis=1).reshape(-1, acts[f"pos.{i}"].shape[1])
             for i in (0, 1)}
    dirs = read_representations(model, tok, entries, hidden_layers=[0, 1], method=method,
                                transform_hiddens=lambda h, given=given: {i: given[i].copy() for i in h})
    for i in (0, 1):
        out[f"repeng_given.{method}.{i}"] = dirs[i]
for name, agg in (("mean", mean_aggregator()), ("logistic", logistic_aggregator())):
    sv = train_steering_vector(model, tok, texts, layers=[0, 1], read_token_index=-1, aggregator=agg,
                               show_progress=False)
    for i in (0, 1):
        out[f"sv_e2e.{name}.{i}"] = sv.layer_activations[i].float().numpy()
    acts = load_file(acts_file)
    for i in (0, 1):
        v = agg(torch.from_numpy(acts[f"pos.{i}"]), torch.from_numpy(acts[f"neg.{i}"]))
        out[f"sv_given.{name}.{i}"] = v.float().numpy()
save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}, out_file)
