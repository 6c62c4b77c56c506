"""slim against transcriptions of the authors' code (locuslab/wanda lib/prune.py and lib/layerwrapper.py;
IST-DASLab/sparsegpt sparsegpt.py as the Wanda code copies it), written compactly here and run on the same
tensors. The one deliberate difference, in the unstructured threshold of SparseGPT, is marked where it is."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_tokenizer
from malleable.data.corpus import chat_windows, random_windows
from malleable.recipes.slim import parse_slim_recipe
from malleable.slim.engine import input_stats, slim
from malleable.slim.registry import get_method
from test_slim import recipe, setup  # noqa: F401  (the 4-layer tiny Llama and its text)


# -- the reference, transcribed ------------------------------------------------------------------------------
class RefWrappedGPT:
    """lib/layerwrapper.py WrappedGPT: a running mean of the per-feature sum of squares, per sample."""

    def __init__(self, layer):
        self.scaler_row, self.nsamples = torch.zeros(layer.weight.shape[1]), 0

    def add_batch(self, inp, out):
        inp = inp.unsqueeze(0) if inp.dim() == 2 else inp
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp.float(), p=2, dim=1) ** 2 / self.nsamples


class RefSparseGPT:
    """sparsegpt.py SparseGPT: add_batch and fasterprune (the quantiser and the timing left out)."""

    def __init__(self, weight):
        self.W, self.columns = weight, weight.shape[1]
        self.H, self.nsamples = torch.zeros(self.columns, self.columns), 0

    def add_batch(self, inp, out):
        inp = inp.unsqueeze(0) if inp.dim() == 2 else inp
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=.01):
        W, H = self.W.clone().float(), self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                # reference: thresh = sort(tmp.flatten())[0][int(numel * sparsity)]; mask1 = tmp <= thresh
                # (one weight more than requested); ours zeroes exactly int(numel * sparsity), the smallest:
                k = int(tmp.numel() * sparsity)
                mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
                mask1[torch.sort(tmp.flatten(), stable=True)[1][:k]] = True
                mask1 = mask1.reshape(tmp.shape)
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w, d = W1[:, i], Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0:
                    tmp = W1[:, i:(i + prune_m)] ** 2 / (torch.diag(Hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        return W


def ref_wanda_mask(W_metric, sparsity, prune_n, prune_m):
    """prune_wanda's mask of one module (use_variant off)."""
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        W_mask.scatter_(1, sort_res[1][:, :int(W_metric.shape[1] * sparsity)], True)
    return W_mask


@torch.no_grad()
def ref_prune(model, windows, method, sparsity, prune_n=0, prune_m=0, blocksize=128):
    """prune_wanda / prune_sparsegpt: the first layer's inputs caught per sample (the Catcher), then layer by
    layer: hooks feed the wrappers during one pass, every module is pruned, and a second pass through the pruned
    layer gives the next layer's inputs. Samples go one at a time, as in the reference; the caught keyword
    arguments (transformers 5 passes rotary embeddings to each layer) stand for its attention_mask and
    position_ids."""
    layers = model.model.layers
    inps, cache = [], {}

    class Catcher(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps.append(inp)
            cache.update(kwargs)
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(len(windows)):
        try:
            model(windows[j:j + 1], use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module
    for i in range(len(layers)):
        layer = layers[i]
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        wrapped = {n: RefWrappedGPT(m) if method == "wanda" else RefSparseGPT(m.weight.data) for n, m in subset.items()}
        handles = [subset[n].register_forward_hook(lambda _, inp, out, n=n: wrapped[n].add_batch(inp[0].data, out))
                   for n in subset]
        for j in range(len(inps)):
            layer(inps[j], **cache)
        for h in handles:
            h.remove()
        for n in subset:
            if method == "wanda":
                metric = torch.abs(subset[n].weight.data) * torch.sqrt(wrapped[n].scaler_row.reshape((1, -1)))
                subset[n].weight.data[ref_wanda_mask(metric, sparsity, prune_n, prune_m)] = 0
            else:
                subset[n].weight.data = wrapped[n].fasterprune(sparsity, prune_n, prune_m, blocksize=blocksize)
        outs = [layer(inps[j], **cache) for j in range(len(inps))]
        inps = [o[0] if isinstance(o, tuple) else o for o in outs]
    return model


# -- the tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_equals_the_reference_sequential_pruning(setup, pattern):  # noqa: F811
    ours = slim(parse_slim_recipe(recipe(setup, method="wanda", parameters={"pattern": pattern}, evaluate=None)),
                setup / f"oracle-wanda-{pattern[0]}", force=True, progress=False)
    got = load_file(setup / f"oracle-wanda-{pattern[0]}" / "model.safetensors")
    windows = chat_windows(tiny_tokenizer(), random_windows(tiny_tokenizer(), str(setup / "cal.txt"), 6, 24, 0))
    model = AutoModelForCausalLM.from_pretrained(setup / "model").eval()
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    want = ref_prune(model, windows, "wanda", 0.5, n, m).state_dict()
    for k, w in got.items():
        assert torch.equal(w == 0, want[k] == 0), k  # the same mask
        assert torch.equal(w, want[k]), k
    assert ours["pruned"]["achieved_sparsity"] == 0.5


@pytest.mark.parametrize("pattern", ["unstructured", "4:8"])
def test_sparsegpt_equals_the_reference_sequential_pruning(setup, pattern):  # noqa: F811
    params = {"pattern": pattern, "blocksize": 32}
    slim(parse_slim_recipe(recipe(setup, method="sparsegpt", parameters=params, evaluate=None)),
         setup / f"oracle-sgpt-{pattern[0]}", force=True, progress=False)
    got = load_file(setup / f"oracle-sgpt-{pattern[0]}" / "model.safetensors")
    windows = chat_windows(tiny_tokenizer(), random_windows(tiny_tokenizer(), str(setup / "cal.txt"), 6, 24, 0))
    model = AutoModelForCausalLM.from_pretrained(setup / "model").eval()
    n, m = (4, 8) if pattern == "4:8" else (0, 0)
    want = ref_prune(model, windows, "sparsegpt", 0.5, n, m, blocksize=32).state_dict()
    # The Hessians are summed in another order than the reference's running mean, and the OBS updates carry
    # the rounding from layer to layer: by the last layer a near-tie may fall the other way (measured: 4 of 4096
    # mask entries of one module, unstructured; 3% relative change of its weights, as each flip moves its row
    # block's updates). Earlier layers agree to rounding; the update itself is exact on fixed tensors (below).
    for k, w in got.items():
        if ".layers.3." not in k:
            assert torch.equal(w == 0, want[k] == 0), k
            torch.testing.assert_close(w, want[k], rtol=1e-4, atol=1e-5)
        else:
            assert ((w == 0) != (want[k] == 0)).float().mean() <= 0.002, k
            assert torch.linalg.norm(w - want[k]) <= 0.05 * torch.linalg.norm(want[k]), k  # measured 0.031


@pytest.mark.parametrize("pattern,blocksize", [("unstructured", 128), ("unstructured", 40), ("2:4", 128),
                                               ("4:8", 64)])
def test_sparsegpt_update_equals_fasterprune_on_fixed_tensors(pattern, blocksize):
    """One module: W (24 x 200) and inputs X (3 samples x 50 tokens x 200), a dead input column, the reference's
    per-sample Hessian against ours, then the update from the same H."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 200, generator=g)
    X = torch.randn(3, 50, 200, generator=g) * torch.linspace(0.1, 3, 200)
    X[..., 7] = 0
    ref = RefSparseGPT(W)
    for j in range(3):
        ref.add_batch(X[j], None)
    lin = torch.nn.Linear(200, 24, bias=False)
    inputs = [(X[j:j + 1], (), {}) for j in range(3)]
    ours_h = input_stats(lin, {"lin": lin}, "hessian", inputs, 3)["lin"]
    torch.testing.assert_close(ours_h, ref.H, rtol=1e-5, atol=1e-4)
    n, m = map(int, pattern.split(":")) if ":" in pattern else (0, 0)
    want = ref.fasterprune(0.5, n, m, blocksize=blocksize)
    method = get_method("sparsegpt", {"pattern": pattern, "blocksize": blocksize})
    got = method.prune(W, ref.H, method.pattern)
    assert torch.equal(got == 0, want == 0) and (got[:, 7] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[got != 0], W[got != 0])  # the kept weights were updated


def test_wanda_norms_equal_the_reference_running_mean():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 30, 64, generator=g)
    ref = RefWrappedGPT(torch.nn.Linear(64, 8))
    for j in range(5):
        ref.add_batch(X[j], None)
    lin = torch.nn.Linear(64, 8)
    ours = input_stats(lin, {"lin": lin}, "norms", [(X[j:j + 1], (), {}) for j in range(5)], 5)["lin"]
    torch.testing.assert_close(ours, ref.scaler_row, rtol=1e-5, atol=1e-5)
