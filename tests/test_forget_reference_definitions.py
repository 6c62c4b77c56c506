"""malleable's unlearning metrics and objectives against transcriptions of the reference code, on fixed tensors.

Each `ref_*` function below is transcribed from the file and function its docstring names (open-unlearning:
github.com/locuslab/open-unlearning at d3d7cf9; MUSE: github.com/swj0419/muse_bench). The model is a fixed
bigram table (the logits at a position depend only on the token there), so left padding cannot change a number
and the reference, which scores one unpadded sequence, sees the same logits as malleable's batched path.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score, roc_curve

from malleable.evaluate import llm_forget as M
from malleable.learn.data import encode_pair

IGNORE_INDEX = -100


# ---- transcriptions of the references ---------------------------------------------------------------------------

def ref_tokenwise_logprobs(logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """open-unlearning src/evals/metrics/utils.py, `tokenwise_logprobs` (the model call replaced by `logits`)."""
    bsz = logits.shape[0]
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    next_tokens = batch["input_ids"][:, 1:].unsqueeze(-1)
    target_log_probs = torch.gather(log_probs, dim=2, index=next_tokens).squeeze(-1)
    out = []
    for i in range(bsz):
        labels = batch["labels"][i]
        actual_indices = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]  # -1 to ignore eos prediction
        if actual_indices.numel() == 0:
            out.append(torch.tensor([]))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        out.append(target_log_probs[i, start_idx - 1:end_idx])
    return out


def ref_tokenwise_vocab_logprobs(logits: torch.Tensor, batch: dict) -> tuple[list, list]:
    """open-unlearning src/evals/metrics/utils.py, `tokenwise_vocab_logprobs` (return_labels=True)."""
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    lp_batch, labels_batch = [], []
    for i in range(logits.shape[0]):
        labels = batch["labels"][i]
        actual_indices = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]
        if len(actual_indices) == 0:
            labels_batch.append(torch.tensor([]))
            lp_batch.append(torch.zeros(0, logits.shape[-1]))
            continue
        start_idx, end_idx = actual_indices[0].item(), actual_indices[-1].item()
        lp_batch.append(log_probs[i, start_idx - 1:end_idx])
        labels_batch.append(labels[actual_indices])
    return lp_batch, labels_batch


def ref_min_k_score(lp: np.ndarray, k: float) -> float:
    """open-unlearning src/evals/metrics/mia/min_k.py, `MinKProbAttack.compute_score` (lower = member)."""
    if lp.size == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ref_extraction_strength(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """open-unlearning src/evals/metrics/memorization.py, `extraction_strength._extraction_strength` body."""
    valid_len = len(labels)
    preds = torch.argmax(log_probs, dim=-1)
    for k in range(valid_len):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 0 if valid_len == 0 else 1 - (k / valid_len)


def ref_mia_auc(forget_scores: list[float], holdout_scores: list[float]) -> float:
    """open-unlearning src/evals/metrics/mia/utils.py, `mia_auc`: forget labelled 0, holdout 1, attack scores
    signed so that higher = less likely a member ("auc is 1 when the forget data is much more likely")."""
    scores = np.array(forget_scores + holdout_scores)
    labels = np.array([0] * len(forget_scores) + [1] * len(holdout_scores))
    return roc_auc_score(labels, scores)


def ref_ou_privleak(score: float, ref: float) -> float:
    """open-unlearning src/evals/metrics/privacy.py, `privleak` (score: the unlearned model's mia_min_k AUC,
    ref: the retain model's)."""
    score = 1 - score
    ref = 1 - ref
    return (score - ref) / (ref + 1e-10) * 100


def ref_muse_auc(ppl_nonmember: list[float], ppl_member: list[float]) -> float:
    """MUSE metrics/privleak.py, `eval` and `sweep` for one key, e.g. forget_holdout_Min-40%: split0 = forget
    is labelled 0 ("nonmember"), split1 = holdout 1; the curve is of -ppl (Min-k% there is -mean(lowest))."""
    ppl = np.array(ppl_nonmember + ppl_member)
    y = np.array([0] * len(ppl_nonmember) + [1] * len(ppl_member))
    fpr, tpr, _ = roc_curve(y, -ppl)
    return sk_auc(fpr, tpr)


def ref_muse_privleak(auc: float, auc_retrain: float) -> float:
    """MUSE eval.py, `eval_model`: out['privleak'] = (auc[key] - AUC_RETRAIN[key]) / AUC_RETRAIN[key] * 100."""
    return (auc - auc_retrain) / auc_retrain * 100


# ---- a bigram model and a word tokenizer ----------------------------------------------------------------------

class WordTokenizer:
    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, words: list[str]):
        self.ids = {w: i + 3 for i, w in enumerate(words)}

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [self.ids[w] for w in text.split()]
        return SimpleNamespace(input_ids=[self.bos_token_id] * add_special_tokens + ids)


class Bigram(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=None):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


WORDS = "q1 q2 q3 alice bob carol dave erin frank".split()
PAIRS = [("q1", "alice bob carol"), ("q2 q3", "dave erin frank alice bob"), ("q3", "carol"),
         ("q1 q2", "frank erin dave carol bob alice")]


def ref_batch(tok, prompt: str, answer: str) -> dict:
    """One unpadded sequence, as open-unlearning's collator gives it (prompt labels -100, answer + EOS)."""
    ids, labels = encode_pair(tok, prompt, answer, chat=False)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}


# ---- tests ---------------------------------------------------------------------------------------------------

def test_min_k_matches_open_unlearning_k04_without_eos():
    """open-unlearning mia/min_k.py MinKProbAttack.compute_score over utils.py tokenwise_logprobs, k = 0.4."""
    tok = WordTokenizer(WORDS)
    model = Bigram(torch.randn(len(WORDS) + 3, len(WORDS) + 3, generator=torch.Generator().manual_seed(0)) * 3)
    ours = [M.min_k_score(M.without_eos(s)["logprobs"]) for s in M.score_pairs(model, tok, PAIRS, chat=False)]
    theirs = []
    for q, a in PAIRS:
        batch = ref_batch(tok, q, a)
        lp = ref_tokenwise_logprobs(model.table[batch["input_ids"]].detach(), batch)[0]
        assert len(lp) == len(a.split())  # the answer's tokens, not its EOS
        theirs.append(-ref_min_k_score(lp.numpy(), 0.4))
    assert M.MIN_K == 0.4
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    # counting the EOS (the old definition) gives other numbers on this case
    old = [M.min_k_score(s["logprobs"], 0.2) for s in M.score_pairs(model, tok, PAIRS, chat=False)]
    assert not np.allclose(old, theirs)


def test_evaluate_set_min_k_leaves_out_the_eos(monkeypatch):
    """`evaluate_set`'s min-k scores are `without_eos` ones unless score_eos=True."""
    tok = WordTokenizer(WORDS)
    model = Bigram(torch.randn(len(WORDS) + 3, len(WORDS) + 3, generator=torch.Generator().manual_seed(1)))
    from malleable.evaluate import scoring

    monkeypatch.setattr(scoring, "encode_pair", lambda t, q, a, chat: encode_pair(t, q, a, False))
    records = [{"prompt": q, "completion": a} for q, a in PAIRS]
    scored = M.score_pairs(model, tok, PAIRS, chat=False)
    got = M.evaluate_set(model, tok, records, role="holdout")["min_k"]
    assert got == pytest.approx([M.min_k_score(s["logprobs"][:-1], 0.4) for s in scored])
    got = M.evaluate_set(model, tok, records, role="holdout", min_k=0.2, score_eos=True)["min_k"]
    assert got == pytest.approx([M.min_k_score(s["logprobs"], 0.2) for s in scored])


def test_extraction_strength_matches_open_unlearning_without_the_eos_prediction():
    """open-unlearning memorization.py extraction_strength over utils.py tokenwise_vocab_logprobs."""
    tok = WordTokenizer(WORDS)
    n = len(WORDS) + 3
    table = torch.zeros(n, n)
    # every answer token predicted right, but after the last one the model predicts "alice", not the EOS
    q, a = PAIRS[0]
    ids, _ = encode_pair(tok, q, a, chat=False)
    for prev, nxt in zip(ids[:-2], ids[1:-1]):
        table[prev, nxt] = 5.0
    table[ids[-2], tok.ids["alice"]] = 5.0
    model = Bigram(table)
    scored = M.score_pairs(model, tok, [(q, a)], chat=False)[0]
    assert M.extraction_strength(scored["correct"]) == 0.0  # the old definition: zeroed by the EOS alone
    lp, labels = ref_tokenwise_vocab_logprobs(table[ref_batch(tok, q, a)["input_ids"]], ref_batch(tok, q, a))
    assert M.extraction_strength(M.without_eos(scored)["correct"]) == ref_extraction_strength(lp[0], labels[0]) == 1

    # random tables: the same score wherever open-unlearning's loop finds a matching suffix
    for seed in range(20):
        model = Bigram(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * 4)
        for (q, a), s in zip(PAIRS, M.score_pairs(model, tok, PAIRS, chat=False)):
            batch = ref_batch(tok, q, a)
            lp, labels = ref_tokenwise_vocab_logprobs(model.table[batch["input_ids"]].detach(), batch)
            ours, theirs = M.extraction_strength(M.without_eos(s)["correct"]), ref_extraction_strength(lp[0], labels[0])
            if bool(lp[0].argmax(-1)[-1] == labels[0][-1]):
                assert ours == pytest.approx(theirs)
            else:  # no correct suffix: ours 0 (the paper's k = |a|), open-unlearning's loop stops at 1/|a|
                assert ours == 0.0 and theirs == pytest.approx(1 / len(labels[0]))


# Min-k scores (malleable's sign: higher = member) of forget and holdout rows under two models
RETAIN = {"forget": [-3.0, -2.5, -2.0, -1.4], "holdout": [-2.9, -2.4, -1.9, -1.5]}  # cannot tell: AUC near 0.5
UNDER = {"forget": [-1.0, -0.8, -0.5, -2.2], "holdout": RETAIN["holdout"]}  # forget still looks trained on
OVER = {"forget": [-6.0, -5.0, -4.0, -1.6], "holdout": RETAIN["holdout"]}  # forget looks LESS likely than unseen


def test_privleak_matches_muse_and_open_unlearning():
    """MUSE metrics/privleak.py eval+sweep and eval.py eval_model; open-unlearning mia/utils.py mia_auc and
    privacy.py privleak; on the same min-k scores."""
    for model in (UNDER, OVER, RETAIN):
        ours = M.privacy_leakage(M.membership_auc(model["forget"], model["holdout"]),
                                 M.membership_auc(RETAIN["forget"], RETAIN["holdout"]))
        neg = {k: [-v for v in vals] for k, vals in model.items()}  # their attack scores: lower = member
        neg_r = {k: [-v for v in vals] for k, vals in RETAIN.items()}
        ou = ref_ou_privleak(ref_mia_auc(neg["forget"], neg["holdout"]), ref_mia_auc(neg_r["forget"], neg_r["holdout"]))
        muse = ref_muse_privleak(ref_muse_auc(neg["forget"], neg["holdout"]),
                                 ref_muse_auc(neg_r["forget"], neg_r["holdout"]))
        assert ours == pytest.approx(muse) and ours == pytest.approx(ou, rel=1e-8)
        # our AUC is open-unlearning's, and 1 - MUSE's
        assert M.membership_auc(model["forget"], model["holdout"]) == pytest.approx(
            ref_mia_auc(neg["forget"], neg["holdout"]))
        assert M.membership_auc(model["forget"], model["holdout"]) == pytest.approx(
            1 - ref_muse_auc(neg["forget"], neg["holdout"]))


def test_privleak_sign_on_hand_made_aucs():
    """Our AUC convention (1 = the forget set looks trained on): retain model at 0.5."""
    assert M.privacy_leakage(0.5, 0.5) == 0.0
    assert M.privacy_leakage(0.9, 0.5) == pytest.approx(-80.0)  # under-unlearned: members still stand out
    assert M.privacy_leakage(0.2, 0.5) == pytest.approx(60.0)  # over-unlearned: forget less likely than unseen
    assert M.privacy_leakage(0.9, 0.5) == pytest.approx(ref_muse_privleak(0.1, 0.5))
    assert M.privacy_leakage(0.2, 0.5) == pytest.approx(ref_ou_privleak(0.2, 0.5))
    assert np.isnan(M.privacy_leakage(0.5, 1.0))


# ---- RMU -------------------------------------------------------------------------------------------------------

def ref_forward_with_cache(model, inputs: dict, module) -> torch.Tensor:
    """open-unlearning src/trainer/unlearn/rmu.py, `RMU.forward_with_cache` (WMDP rmu/utils.py's is the same)."""
    cache = []

    def hook(module, input, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    model(**inputs)
    handle.remove()
    return cache[0]


def ref_compute_activation_loss(activation1, activation2, mask) -> torch.Tensor:
    """open-unlearning src/trainer/unlearn/rmu.py, `RMU.compute_activation_loss`."""
    squared_diff = torch.nn.functional.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


def ref_rmu_loss(model, ref_model, forget: dict, retain: dict, layer: int, control_vec, gamma, alpha):
    """open-unlearning src/trainer/unlearn/rmu.py, `RMU.compute_loss` with retain_loss_type EMBED_DIFF."""
    module, ref_module = model.model.layers[layer], ref_model.model.layers[layer]
    inputs = {k: forget[k] for k in ("input_ids", "attention_mask")}
    acts = ref_forward_with_cache(model, inputs, module)
    forget_loss = ref_compute_activation_loss(acts, control_vec.expand_as(acts), forget["labels"] != -100)
    inputs = {k: retain[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref_acts = ref_forward_with_cache(ref_model, inputs, ref_module)
    retain_loss = ref_compute_activation_loss(ref_forward_with_cache(model, inputs, module), ref_acts,
                                              retain["labels"] != -100)
    return gamma * forget_loss + alpha * retain_loss


def _rmu_batches():
    """Two forget and two retain sequences, no padding, the same number of answer tokens in each row (where
    open-unlearning's per-sequence mean and malleable's per-token mean agree)."""
    g = torch.Generator().manual_seed(0)

    def part(width: int, answer: int) -> dict:
        ids = torch.randint(3, 100, (2, width), generator=g)
        labels = ids.clone()
        labels[:, :width - answer] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return part(9, 4), part(7, 3)


def test_rmu_loss_matches_open_unlearning_at_the_answer_tokens_own_positions():
    """open-unlearning src/trainer/unlearn/rmu.py RMU.compute_loss (EMBED_DIFF), forward_with_cache and
    compute_activation_loss; WMDP rmu/unlearn.py's control vector (U[0,1) normalised, times the coefficient)."""
    import copy

    from conftest import tiny_llama

    from malleable.forget.registry import get_objective

    model, forget, retain = tiny_llama(0), *_rmu_batches()
    with torch.no_grad():  # move the trainee off the original so the retain term is not 0
        model.model.layers[1].mlp.down_proj.weight.add_(0.05)
    original = tiny_llama(0).requires_grad_(False)
    obj = get_objective("rmu", {"layer": 1, "steering_coeff": 20.0, "alpha": 3.0, "gamma": 0.5})
    obj.setup(model, None, None, None)
    obj.reference = lambda fn, *args: fn(original, *args)
    control_vec = obj.target.view(1, 1, -1)
    ours = obj.loss(model, {"forget": forget, "retain": retain})
    theirs = ref_rmu_loss(model, original, forget, retain, 1, control_vec, gamma=0.5, alpha=3.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # one position earlier (malleable before 2026-11-29) reads other hidden states
    shifted = {k: v.clone() for k, v in forget.items()}
    shifted["labels"] = torch.roll(forget["labels"], -1, dims=1)
    assert not torch.allclose(obj.loss(model, {"forget": shifted, "retain": retain}), theirs)
    # the forget weight scales the forget term only
    obj0 = copy.copy(obj)
    obj0.p = {**obj.p, "gamma": 0.0}
    torch.testing.assert_close(obj0.loss(model, {"forget": forget, "retain": retain}),
                               ref_rmu_loss(model, original, forget, retain, 1, control_vec, 0.0, 3.0))


def test_rmu_trainable_set():
    """WMDP rmu/unlearn.py get_params(layer_ids 5,6,7; param_ids 6 = mlp.down_proj) against open-unlearning's
    TOFU default trainable_params_regex '.*'."""
    from conftest import tiny_llama

    from malleable.forget.registry import get_objective

    obj = get_objective("rmu", {"layer": 1})
    assert obj.p["trainable"] == "down_proj" and obj.p["gamma"] == 1.0 and obj.p["alpha"] == 1.0
    trained = {n for n, p in obj.prepare(tiny_llama(0), "causal_lm").named_parameters() if p.requires_grad}
    assert trained == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    model = get_objective("rmu", {"layer": 1, "trainable": "all"}).prepare(tiny_llama(0), "causal_lm")
    assert all(p.requires_grad for p in model.parameters())


# ---- the KL retain term ------------------------------------------------------------------------------------------

def ref_compute_kl_divergence(model, target_model, inputs: dict) -> torch.Tensor:
    """open-unlearning src/trainer/utils.py, `compute_kl_divergence` (the outputs it also returns left out)."""
    with torch.no_grad():
        ref_outputs = target_model(**inputs)
    ref_probs = torch.nn.functional.log_softmax(ref_outputs.logits, dim=-1)
    ref_probs = ref_probs.view(-1, ref_outputs.logits.shape[-1])
    outputs = model(**inputs)
    current_probs = torch.nn.functional.log_softmax(outputs.logits, dim=-1)
    current_probs = current_probs.view(-1, outputs.logits.shape[-1])
    return torch.nn.functional.kl_div(current_probs, ref_probs, reduction="batchmean", log_target=True)


def test_kl_full_retain_term_matches_open_unlearning():
    """open-unlearning src/trainer/unlearn/grad_diff.py GradDiff.compute_retain_loss with retain_loss_type KL,
    i.e. utils.py compute_kl_divergence; padding is left out of our mean (theirs counts it)."""
    from conftest import tiny_llama

    from malleable.forget.registry import get_objective
    from malleable.learn.data import collate

    model, original = tiny_llama(0), tiny_llama(0).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    _, retain = _rmu_batches()  # unpadded: the two agree exactly
    inputs = {k: retain[k] for k in ("input_ids", "attention_mask")}
    obj = get_objective("graddiff", {"retain_loss": "kl_full"})
    obj.setup(model, None, None, None)
    assert obj.needs_reference
    obj.reference = lambda fn, *args: fn(original, *args)
    torch.testing.assert_close(obj.retain_term(model, retain), ref_compute_kl_divergence(model, original, inputs),
                               rtol=1e-5, atol=1e-7)
    # left-padded rows of two lengths: the mean over real positions of their per-sequence sums
    rows = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([11, 12, 13], [-100, 12, 13])]
    batch = collate(rows, 0)
    sums = [ref_compute_kl_divergence(model, original, {"input_ids": torch.tensor([ids]),
                                                        "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})
            * len(ids) for ids, _ in rows]
    torch.testing.assert_close(obj.retain_term(model, batch), sum(sums) / 8, rtol=1e-5, atol=1e-7)
    # the answer-only KL ("kl", unchanged) is another number
    answer_only = get_objective("graddiff", {"retain_loss": "kl"})
    answer_only.reference = obj.reference
    assert not torch.allclose(answer_only.retain_term(model, retain), obj.retain_term(model, retain))
    assert get_objective("graddiff", {}).p["retain_loss"] == "nll"  # open-unlearning's GradDiff.yaml default


def test_audit_evidence_min_k_matches_open_unlearning():
    """`evaluate.unlearning.example_scores` (forget/audit's membership_auc_min_k) against open-unlearning's
    utils.py tokenwise_logprobs and mia/min_k.py MinKProbAttack.compute_score, k = 0.4, left-padded batch."""
    from malleable.evaluate.unlearning import example_scores
    from malleable.learn.data import collate

    tok = WordTokenizer(WORDS)
    model = Bigram(torch.randn(len(WORDS) + 3, len(WORDS) + 3, generator=torch.Generator().manual_seed(2)) * 3)
    items = [encode_pair(tok, q, a, chat=False) for q, a in PAIRS]
    ours = example_scores(model, items, lambda rows: collate(rows, tok.pad_token_id))["min_k"]
    theirs = []
    for q, a in PAIRS:
        batch = ref_batch(tok, q, a)
        theirs.append(-ref_min_k_score(ref_tokenwise_logprobs(model.table[batch["input_ids"]].detach(), batch)[0]
                                       .numpy(), 0.4))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5)


# ---- issue 13's objectives: WGA, UNDIAL, DPO / IdkDPO (open-unlearning at d3d7cf9) -------------------------------

def ref_compute_wga_loss(model, inputs: dict, beta: float) -> torch.Tensor:
    """open-unlearning src/trainer/utils.py, `compute_wga_loss` (commit d3d7cf9; the outputs it returns left out).
    The authors' G-effect dataloader.py (tmlr-group/G-effect at ef368ee), loss_type 'wga', is the same formula."""
    outputs = model(**inputs)
    labels = inputs["labels"]
    shift_logits = outputs.logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    lm_loss = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    weight_ce = ((-lm_loss).exp().detach()) ** beta
    return -(weight_ce * lm_loss)[shift_labels.view(-1) != -100].mean()


def ref_compute_undial_loss(model, ref_model, inputs: dict, beta: float) -> torch.Tensor:
    """open-unlearning src/trainer/utils.py, `compute_undial_loss` (commit d3d7cf9), itself the authors'
    dong-river/LLM_unlearning utils/ft_utils.py `DITrainer.compute_loss` (at 89856dc) without its focus option."""
    import torch.nn.functional as F

    logits = model(**inputs).logits
    labels = inputs["labels"]
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    with torch.no_grad():
        teacher_logits = ref_model(**inputs).logits
    shift_teacher_logits = teacher_logits[..., :-1, :].contiguous()
    mask = torch.zeros_like(shift_teacher_logits)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    soft_label = F.softmax(shift_teacher_logits - mask * beta, dim=-1)
    loss = torch.nn.CrossEntropyLoss(reduction="none")(shift_logits.view(-1, shift_logits.size(-1)),
                                                       soft_label.view(-1, soft_label.size(-1)))
    return loss.mean()


def ref_compute_batch_nll(model, inputs: dict) -> torch.Tensor:
    """open-unlearning src/trainer/utils.py, `compute_batch_nll` (commit d3d7cf9)."""
    logits = model(**inputs).logits
    shifted_labels = inputs["labels"][..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    return torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(logits.transpose(-1, -2),
                                                                         shifted_labels).sum(dim=-1)


def ref_compute_dpo_loss(model, ref_model, win_inputs: dict, lose_inputs: dict, beta: float) -> torch.Tensor:
    """open-unlearning src/trainer/utils.py, `compute_dpo_loss` (commit d3d7cf9), both inputs given."""
    import torch.nn.functional as F

    win_loss = ref_compute_batch_nll(model, win_inputs)
    with torch.no_grad():
        win_ref_loss = ref_compute_batch_nll(ref_model, win_inputs)
    win_log_ratio = -(win_loss - win_ref_loss)
    lose_loss = ref_compute_batch_nll(model, lose_inputs)
    with torch.no_grad():
        lose_ref_loss = ref_compute_batch_nll(ref_model, lose_inputs)
    lose_log_ratio = -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def _moved_pair():
    """A tiny Llama moved off its frozen original (so log-ratios and distillation targets are not trivial)."""
    from conftest import tiny_llama

    model, original = tiny_llama(0), tiny_llama(0).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, original


def _right_padded(rows: list[tuple[list[int], list[int]]]) -> dict:
    """open-unlearning's batches: right padding, attention 0 and labels -100 there."""
    width = max(len(i) for i, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


QA_ROWS = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([11, 12, 13], [-100, 12, 13]),
           ([20, 21, 22, 23, 24, 25], [-100, -100, -100, 23, 24, 25])]


@pytest.mark.parametrize("beta", [1.0, 5.0, 0.0])
def test_wga_matches_open_unlearning_on_left_and_right_padded_batches(beta):
    """open-unlearning src/trainer/unlearn/wga.py WGA.compute_loss (gamma * compute_wga_loss + alpha * NLL retain),
    commit d3d7cf9; our left-padded batch against its right-padded one; beta 0 is plain gradient ascent."""
    from malleable.forget.registry import get_objective
    from malleable.learn.data import collate

    model, _ = _moved_pair()
    obj = get_objective("wga", {"beta": beta, "gamma": 0.7, "alpha": 2.0})
    forget, retain = QA_ROWS, QA_ROWS[::-1][:2]
    ours = obj.loss(model, {"forget": collate(forget, 0), "retain": collate(retain, 0)})
    theirs = (0.7 * ref_compute_wga_loss(model, _right_padded(forget), beta)
              + 2.0 * model(**_right_padded(retain)).loss)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert get_objective("wga", {}).p == {"beta": 1.0, "gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}
    assert not get_objective("wga", {"alpha": 0.0}).needs_retain  # the authors' 'wga': forget term only


def test_undial_matches_open_unlearning_where_every_position_is_scored():
    """open-unlearning src/trainer/utils.py compute_undial_loss (commit d3d7cf9) on plain-text rows (labels =
    input_ids, as the authors' DITrainer), unpadded; on question/answer rows ours keeps only the answer positions."""
    from malleable.forget.registry import get_objective

    model, original = _moved_pair()
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, 0] = -100  # `text` rows: the first token has nothing before it (shifted away by both)
    part = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    obj = get_objective("undial", {"beta": 3.0})
    obj.reference = lambda fn, *args: fn(original, *args)
    assert not obj.needs_retain and obj.p["alpha"] == 0.0 and get_objective("undial", {}).p["beta"] == 10.0
    ours = obj.loss(model, {"forget": part, "retain": None})
    torch.testing.assert_close(ours, ref_compute_undial_loss(model, original, {**part, "labels": ids}, 3.0),
                               rtol=1e-5, atol=1e-6)
    # question/answer rows: ours averages the answer positions only. The reference's loss at position t is the
    # difference of its summed losses over the prefixes ending at t + 1 and at t (a causal model scores a prefix
    # as it scores the whole), so its mean over exactly those positions can be read off it
    qa = {**part, "labels": torch.where(torch.arange(7) < 4, -100, ids)}

    def summed(b: int, end: int) -> torch.Tensor:  # the reference's loss summed over the end - 1 positions
        sub = {k: v[b:b + 1, :end] for k, v in part.items()} | {"labels": ids[b:b + 1, :end]}
        return ref_compute_undial_loss(model, original, sub, 3.0) * (end - 1)

    at_answers = [summed(b, t + 1) - summed(b, t) for b in range(3) for t in range(4, 7)]
    torch.testing.assert_close(obj.loss(model, {"forget": qa, "retain": None}), torch.stack(at_answers).mean(),
                               rtol=1e-4, atol=1e-5)


def test_dpo_matches_open_unlearning_with_its_alternate_answers():
    """open-unlearning src/trainer/unlearn/dpo.py DPO.compute_loss (commit d3d7cf9): win = the alternate answer,
    lose = the forget answer, gamma * compute_dpo_loss + alpha * NLL retain; unpadded rows of equal length."""
    from malleable.forget.dpo import Paired
    from malleable.forget.registry import get_objective
    from malleable.learn.data import collate

    model, original = _moved_pair()
    g = torch.Generator().manual_seed(3)
    forget, alternates = [], []
    for _ in range(3):
        prompt = torch.randint(3, 100, (3,), generator=g).tolist()
        answer, other = (torch.randint(3, 100, (4,), generator=g).tolist() for _ in range(2))
        forget.append((prompt + answer, [-100] * 3 + answer))
        alternates.append((prompt + other, [-100] * 3 + other))
    retain = [(r[0], r[1]) for r in QA_ROWS[:1]]
    obj = get_objective("dpo", {"beta": 0.5, "alpha": 1.5})
    obj.setup(model, [Paired(f, a) for f, a in zip(forget, alternates)], None, lambda b: collate(b, 0))
    obj.reference = lambda fn, *args: fn(original, *args)
    order = [2, 0, 1]  # a batch in another order than the set: each row finds its own alternative
    ours = obj.loss(model, {"forget": collate([forget[i] for i in order], 0), "retain": collate(retain, 0)})
    theirs = (ref_compute_dpo_loss(model, original, _right_padded([alternates[i] for i in order]),
                                   _right_padded([forget[i] for i in order]), 0.5)
              + 1.5 * model(**_right_padded(retain)).loss)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert {k: get_objective(name, {}).p[k] for name in ("dpo", "idkdpo") for k in ("beta", "gamma", "alpha")} == \
        {"beta": 0.1, "gamma": 1.0, "alpha": 1.0}  # configs/trainer/DPO.yaml


class CharTokenizer:
    """Characters as tokens (with a BOS), enough for encode_pair and the refusals."""
    eos_token_id, bos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=[self.bos_token_id] * add_special_tokens + [3 + ord(c) % 120 for c in text])


def test_idkdpo_prefers_a_seeded_refusal_encoded_as_the_rows_own_completion():
    """The refusal is tokenised as encode_pair would tokenise it as the row's completion; one per example, seeded."""
    from malleable.forget.dpo import REFUSALS, refusals
    from malleable.forget.registry import get_objective

    tok = CharTokenizer()
    pairs = [("who is x?", "a painter"), ("where?", "in town"), ("when was it?", "in 1920")] * 4
    items = [encode_pair(tok, q, a, chat=False) for q, a in pairs]
    obj = get_objective("idkdpo", {})
    out = obj.examples(items, tok, seed=7)
    chosen = refusals(len(items), 7)
    assert len(set(chosen)) > 3 and set(chosen) <= set(REFUSALS)
    for (q, _), item, paired, refusal in zip(pairs, items, out, chosen):
        assert tuple(paired) == item and paired.alternate == encode_pair(tok, q, refusal, chat=False)
    assert [p.alternate for p in obj.examples(items, tok, seed=7)] == [p.alternate for p in out]
    assert [p.alternate for p in obj.examples(items, tok, seed=8)] != [p.alternate for p in out]


# ---- SOUL's own Sophia estimator (OPTML-Group/SOUL at 30f7a41) ----------------------------------------------------

def ref_soul_sophiag_step(p, grad, state, lr, betas, rho, weight_decay, bs=5120):
    """SOUL src/optim/sophia.py (commit 30f7a41) `SophiaG.step` with no arguments, as the HF Trainer calls it:
    update_hessian, update_exp_avg, then _single_tensor_sophiag (maximize and capturable off)."""
    beta1, beta2 = betas
    state["hessian"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
    p.mul_(1 - lr * weight_decay)
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
    ratio = (state["exp_avg"].abs() / (rho * bs * state["hessian"] + 1e-15)).clamp(None, 1)
    p.addcmul_(state["exp_avg"].sign(), ratio, value=-lr)


def test_soul_estimator_matches_souls_sophiag_step():
    from malleable.forget.soul import Sophia

    g = torch.Generator().manual_seed(4)
    start = torch.randn(6, 5, generator=g)
    grads = [torch.randn(6, 5, generator=g) * s for s in (1.0, 0.01, 3.0, 1e-4)]
    ours = torch.nn.Parameter(start.clone())
    opt = Sophia([{"params": [ours], "weight_decay": 0.1}], lr=5e-3, betas=(0.9, 0.95), rho=0.04, soul_bs=5120)
    theirs = start.clone()
    state = {"exp_avg": torch.zeros_like(start), "hessian": torch.zeros_like(start)}
    for grad in grads:
        ours.grad = grad.clone()
        opt.step()
        ref_soul_sophiag_step(theirs, grad, state, 5e-3, (0.9, 0.95), 0.04, 0.1)
        torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=1e-7)
    # without it, the Sophia paper's optimiser: no curvature from the step's gradient (h stays 0: sign steps)
    plain = torch.nn.Parameter(start.clone())
    plain.grad = grads[0].clone()
    sophia = Sophia([plain], lr=5e-3)
    sophia.step()
    assert torch.equal(sophia.state[plain]["h"], torch.zeros_like(start))
