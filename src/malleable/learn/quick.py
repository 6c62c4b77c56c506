"""A minimal LoRA trainer and exact-match evaluator for prompt/completion records, used by the quickstart.

This is deliberately small: one process, a plain PyTorch loop (AdamW, loss on completion tokens only),
no accelerate, no checkpointing, no progress reporting beyond a log line. The full `learn` engine (shared
training loop on accelerate, registered methods, recipes, reports) will replace it; keep this file minimal.
"""

from __future__ import annotations

import math
import random
import re
import time

import torch


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model's chat template renders a user turn followed by the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels): chat prompt + completion + EOS; labels are -100 on the prompt."""
    prompt = tokenizer(chat_prompt(tokenizer, record["prompt"]), add_special_tokens=False).input_ids
    answer = tokenizer(record["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch of (input_ids, labels), so every completion ends at the last position."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, width - len(x) :] = torch.tensor(x)
        labels[i, width - len(y) :] = torch.tensor(y)
        mask[i, width - len(x) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of a left-padded batch.

    Only the last positions (those that predict a completion token) go through the LM head: with a 49k
    vocabulary that head is a quarter of a small model's compute, and prompts are most of each sequence.
    """
    labels = batch["labels"]
    keep = int((labels != -100).sum(1).max())  # longest completion, in tokens
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                   logits_to_keep=keep + 1, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, -keep:].flatten(), ignore_index=-100
    )


def train_lora(
    model,
    tokenizer,
    records: list[dict],
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: list[str] | str = "all-linear",
    steps: int = 60,
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup: int = 5,
    seed: int = 0,
    log_every: int = 10,
):
    """Wrap `model` in a fresh PEFT LoRA and train it on `records`; return the PeftModel (in eval mode).

    Each step draws `batch_size` records from a seeded shuffle that restarts every epoch. The learning rate
    warms up linearly for `warmup` steps, then follows a cosine decay to zero.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    examples = [encode(tokenizer, r) for r in records]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    start, tokens, running = time.perf_counter(), 0, 0.0
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = collate([examples[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        loss = completion_loss(model, batch)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        running += loss.item()
        if log_every and (step % log_every == 0 or step == steps):
            n = step % log_every or log_every
            elapsed = time.perf_counter() - start
            print(f"  step {step:4d}/{steps}  loss {running / n:.4f}  {tokens / elapsed:.0f} tok/s", flush=True)
            running = 0.0
    model.eval()
    return model


_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def normalise(text: str) -> str:
    """Lower case, single spaces, no leading or trailing punctuation."""
    return _EDGE.sub("", " ".join(text.lower().split()))


def is_match(generated: str, gold: str) -> bool:
    """True when the generated text starts with the gold answer as a whole word (case and punctuation aside)."""
    pred, gold = normalise(generated), normalise(gold)
    return pred == gold or (pred.startswith(gold) and not pred[len(gold)].isalnum())


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def exact_match(model, tokenizer, records: list[dict], **generate_kwargs) -> tuple[float, list[str]]:
    """(accuracy, generations) of greedy completions of `records` against their `completion`."""
    model.eval()
    generations = generate(model, tokenizer, [r["prompt"] for r in records], **generate_kwargs)
    hits = sum(is_match(g, r["completion"]) for g, r in zip(generations, records, strict=True))
    return hits / max(1, len(records)), generations
