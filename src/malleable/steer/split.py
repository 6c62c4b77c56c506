"""SPLIT (Xu et al., "Why Steering Works: Toward a Unified View of Language Model Parameter Dynamics"): a steering
intervention with a few trainable parameters, trained through learn's engine (`learn.engine.fit`) with a joint
preference-utility objective. The three forms (split_vector.py, split_lora.py, split_weight.py) differ only in
the intervention; this file holds what they share: the loss, the pairs, the strength draw and the hooks.

The authors' code (zjunlp/EasyEdit: steer/trainer/SFTModelTrainer.py, steer/models/interventions.py,
steer/trainer/utils/data_utils.py, hparams/Steer/experiment_hparams/spilt_experiment/*/spilt/*.yaml) trains, per
row, with L the NLL of a completion's tokens after the prompt under the intervention at strength m:

    loss = w_pos L_pos + w_neg L_neg + gamma relu(theta - (L_neg - L_pos))
           + w_ref (relu(L_pos - L_pos_ref) + relu(L_neg - L_neg_ref))

(L_ref: the same text with the intervention off). Each pair gives a row at +m (matching answer preferred,
"orig_add") and, with `swapped`, a row with the answers swapped at -m ("orig_sub"); m is drawn per row from an
even grid of strengths. Every form adds its delta to the steered decoder layer's output (the residual stream)
at every position: h + m v, h + m x A B, h + m (x dW + db), x the input of the chosen module of that layer (the
MLP's intermediate activation, i.e. down_proj's input, by default, the authors' "mlp_mid"). AdamW, weight
decay 0, a linear decay of the learning rate without warm-up, gradients clipped at norm 1, the base model frozen
in eval mode, dropout on the intervention's output.

Where ours differs, and why:
- L is each row's mean token NLL and the hinge is taken per row; the authors take HF's `loss` (the token mean
  pooled over a micro-batch of 4 rows) and one hinge per micro-batch. Per row, the gradient does not depend on
  how a step is split into micro-batches (learn's engine sums per-unit losses; a unit here is a row).
- One m per row for both of its completions; the authors draw the winning and the losing completion's strength
  separately, so their hinge compares L_pos and L_neg at two different strengths. PrefOdds is defined at one m.
- The vector form trains h + m v; the authors' vector carries a trainable scalar b (h + (m + b) v in training)
  that their applier drops (h + m v). We train what is applied.
- The intervention covers every text position, BOS included, as `steer.applied` does; the authors skip BOS.
- The artefact's default strength is 1 (a recipe's `strength` sets another), as the authors' apply config's
  multiplier; the vector form trains at 2..20, so give it a strength in that range.
- A plain-text pair (empty prompt) is read after the BOS token (EOS where there is none), as the sweep scores it;
  the completions carry no EOS, as the authors' labels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from malleable.errors import InputError, RecipeError
from malleable.learn.data import collate, encode_pair
from malleable.learn.loss import lm_logits
from malleable.learn.registry import Method
from malleable.params import Param
from malleable.steer.apply import decoder_layers
from malleable.steer.registry import SteeringMethod


def split_params(lr: float, batch_size: int, gamma: float, theta: float, m_min: float, m_max: float,
                 swapped: bool, **extra: Param) -> dict[str, Param]:
    """The declared parameters of a SPLIT form, with that form's defaults from the authors' configs."""
    return {
        "lr": Param(lr, "AdamW learning rate (linear decay, no warm-up)", gt=0),
        "epochs": Param(2.0, "passes over the training pairs", gt=0),
        "batch_size": Param(batch_size, "pairs per optimiser step (each gives 1 row, or 2 with `swapped`)", gt=0),
        "micro_batch_size": Param(0, "pairs per forward pass (0: the whole step)", ge=0),
        "w_pos": Param(1.0, "weight of L_pos, the preferred completion's NLL", ge=0),
        "w_neg": Param(0.5, "weight of L_neg, the other completion's NLL (0 with gamma 0: the SFT baseline)", ge=0),
        "gamma": Param(gamma, "weight of the preference hinge relu(theta - (L_neg - L_pos))", ge=0),
        "theta": Param(theta, "the hinge's margin (nats of mean token NLL)", ge=0),
        "w_ref": Param(0.0, "weight of the reference terms relu(L - L_unsteered), both completions", ge=0),
        "m_min": Param(m_min, "smallest training strength", gt=0),
        "m_max": Param(m_max, "largest training strength", gt=0),
        "m_count": Param(10, "strengths on the even grid m_min..m_max; one drawn per row", gt=0),
        "swapped": Param(swapped, "also train each pair with its answers swapped at -m"),
        "dropout": Param(0.1, "dropout on the intervention's output while training", ge=0, le=0.9),
        **extra,
    }


def split_loss(l_pos: torch.Tensor, l_neg: torch.Tensor, p: dict[str, Any], ref_pos: torch.Tensor | None = None,
               ref_neg: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: w_pos L_pos + w_neg L_neg + gamma relu(theta - (L_neg - L_pos)) [+ w_ref (relu(L_pos - ref_pos)
    + relu(L_neg - ref_neg))]."""
    loss = p["w_pos"] * l_pos + p["w_neg"] * l_neg + p["gamma"] * F.relu(p["theta"] - (l_neg - l_pos))
    if p["w_ref"]:
        loss = loss + p["w_ref"] * (F.relu(l_pos - ref_pos) + F.relu(l_neg - ref_neg))
    return loss


def row_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean token NLL over its labelled tokens, (rows,)."""
    logits, labels = lm_logits(model, batch)
    mask = labels != -100
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (ce * mask).sum(1) / mask.sum(1).clamp(min=1)


def encode(tokenizer, row: dict) -> dict:
    """A pair's two completions tokenised after its prompt (BOS/EOS text for an empty one), without the EOS."""
    from malleable.steer.sweep import context

    prompt = context(tokenizer, row["prompt"])
    out = {}
    for side in ("positive", "negative"):
        ids, labels = encode_pair(tokenizer, prompt, row[side], chat=False)
        out[side] = (ids[:-1], labels[:-1])
    return out


class Strength:
    """The strength the hooks multiply by: a number, or one per row of the batch (training)."""

    def __init__(self, m: float | torch.Tensor = 0.0) -> None:
        self.m = m

    def times(self, delta: torch.Tensor) -> torch.Tensor:
        m = self.m
        if isinstance(m, torch.Tensor):
            m = m.to(device=delta.device, dtype=delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
        return m * delta


def install(model, deltas: dict[int, torch.nn.Module], module: str | None, strength: Strength) -> list:
    """Hooks adding `strength * delta(x)` to each steered decoder layer's output, x the input of `module` in that
    layer (its dotted path; "" the layer's own input; None: the delta gets the layer's output, the vector form,
    which only reads its shape)."""
    layers = decoder_layers(model)
    handles = []
    for i, delta in deltas.items():
        seen: dict[str, torch.Tensor] = {}
        if module is not None:
            try:
                target = layers[i].get_submodule(module)
            except AttributeError:
                raise RecipeError(f"parameters.module: layer {i} ({type(layers[i]).__name__}) has no submodule "
                                  f"'{module}'") from None

            def keep(mod, args, kwargs, seen=seen):
                seen["x"] = args[0] if args else kwargs["hidden_states"]

            handles.append(target.register_forward_pre_hook(keep, with_kwargs=True))

        def add(mod, args, output, delta=delta, seen=seen):
            h = output[0] if isinstance(output, tuple) else output
            h = h + strength.times(delta(seen.pop("x") if module is not None else h)).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(layers[i].register_forward_hook(add))
    return handles


def module_width(model, layer: int, module: str) -> int:
    """The width of `module`'s input in decoder layer `layer` (a Linear's in_features, else the hidden size)."""
    layers = decoder_layers(model)
    try:
        target = layers[layer].get_submodule(module)
    except AttributeError:
        raise RecipeError(f"parameters.module: layer {layer} ({type(layers[layer]).__name__}) has no submodule "
                          f"'{module}'") from None
    if isinstance(target, torch.nn.Linear):
        return target.in_features
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.hidden_size)


class _Steered(torch.nn.Module):
    """The frozen model with the interventions as its only trainable parameters; training mode reaches the
    interventions (their dropout) while the model stays in eval mode, as the authors keep it."""

    def __init__(self, model, deltas: torch.nn.ModuleDict):
        super().__init__()
        self.model, self.deltas = model, deltas
        self.config = model.config

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, **kwargs):
        return self.model(**kwargs)


class SplitMethod(SteeringMethod, Method):
    """Base of the SPLIT forms: a steering method whose artefact is trained (steer's engine calls `train`), and a
    learn Method (`prepare`, `loss`) driven by learn's engine."""

    fitted = True
    fitting = "train its {form} intervention through learn's engine"
    module: ClassVar[str | None] = None  # the input the delta reads; a form with a `module` parameter overrides

    def __init__(self, **p: Any) -> None:
        super().__init__(**p)
        if p["m_min"] > p["m_max"]:
            raise RecipeError(f"parameters.m_min: {p['m_min']} is above m_max ({p['m_max']})")
        if p["micro_batch_size"] and p["batch_size"] % p["micro_batch_size"]:
            raise RecipeError(f"parameters.micro_batch_size: {p['micro_batch_size']} does not divide batch_size "
                              f"({p['batch_size']})")

    def check_model(self, model, rows: list[dict] | None = None, layers: list[int] | None = None) -> None:
        """Refuse, before any work, a model whose layers lack the module the intervention reads."""
        if self.input_module() is not None:
            for i in range(len(decoder_layers(model))):
                module_width(model, i, self.input_module())

    def delta(self, model, layer: int) -> torch.nn.Module:
        """A fresh intervention for decoder layer `layer` (its forward maps the module's input to the delta)."""
        raise NotImplementedError

    def input_module(self) -> str | None:
        return self.p.get("module", self.module)

    def artefact_config(self) -> dict[str, Any]:
        return {} if self.input_module() is None else {"module": self.input_module()}

    def summary(self, log: list[dict] | None) -> list[str]:
        """The training in one line: steps, first and last logged loss."""
        from malleable.steer.sweep import number

        if not log:
            return []
        first, last = log[0], log[-1]
        return [f"- trained through learn's engine: {last['step']} steps, loss {number(first['loss'])} (step "
                f"{first['step']}) -> {number(last['loss'])}; every logged step in report.json `training`"]

    def strengths(self) -> torch.Tensor:
        return torch.linspace(self.p["m_min"], self.p["m_max"], self.p["m_count"], dtype=torch.float64)

    def prepare(self, model, task: str):
        model.requires_grad_(False)
        self.deltas = torch.nn.ModuleDict({str(i): self.delta(model, i) for i in self.layers})
        self.strength = Strength()
        self.handles = install(model, {i: self.deltas[str(i)] for i in self.layers}, self.input_module(),
                               self.strength)
        return _Steered(model, self.deltas)

    def collate(self, items: list[dict], pad_id: int) -> dict:
        """The step's rows: each pair at +1 (positive preferred) and, with `swapped`, at -1 (negative preferred)."""
        win, lose, sign = [], [], []
        for it in items:
            win.append(it["positive"])
            lose.append(it["negative"])
            sign.append(1.0)
            if self.p["swapped"]:
                win.append(it["negative"])
                lose.append(it["positive"])
                sign.append(-1.0)
        return {"win": collate(win, pad_id), "lose": collate(lose, pad_id), "sign": torch.tensor(sign)}

    def loss(self, model, batch: dict) -> torch.Tensor:
        grid = self.strengths()
        m = batch["sign"].double() * grid[torch.randint(len(grid), batch["sign"].shape, generator=self.generator)]
        self.strength.m = m
        p = self.p
        l_pos = row_nll(model, batch["win"])
        needs_neg = p["w_neg"] > 0 or p["gamma"] > 0 or p["w_ref"] > 0
        l_neg = row_nll(model, batch["lose"]) if needs_neg else torch.zeros_like(l_pos)
        ref_pos = ref_neg = None
        if p["w_ref"]:
            self.strength.m = 0.0
            with torch.no_grad():
                ref_pos, ref_neg = row_nll(model, batch["win"]), row_nll(model, batch["lose"])
        self.last = {"pref_margin": round(float((l_neg - l_pos).detach().mean()), 4)} if needs_neg else {}
        return split_loss(l_pos, l_neg, p, ref_pos, ref_neg).sum()

    def metrics(self) -> dict[str, Any]:
        return dict(getattr(self, "last", {}))

    def training(self):
        from malleable.recipes.learn import TrainingSpec

        return TrainingSpec(epochs=self.p["epochs"], batch_size=self.p["batch_size"],
                            micro_batch_size=self.p["micro_batch_size"] or self.p["batch_size"],
                            lr=self.p["lr"], schedule="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                            log_every=10)

    def fit(self, model, tokenizer, rows: list[dict], layers: list[int], seed: int = 0, progress: bool = False,
            read: str | int = "last", batch_size: int = 16) -> tuple[dict[int, Any], list[dict]]:
        """Train the intervention on `layers` of `model` (left as it was) from the contrast pairs `rows`; returns
        (the artefact's tensors by layer, the logged training steps). `read` and `batch_size` are the reading's
        settings, unused here (the step's size is the `batch_size` parameter)."""
        from malleable.learn.engine import fit

        items = [encode(tokenizer, r) for r in rows]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        grads = {name: p.requires_grad for name, p in model.named_parameters()}
        self.layers = list(layers)
        torch.manual_seed(seed)  # the interventions' initial values
        self.generator = torch.Generator().manual_seed(seed)  # the strengths drawn per row
        steered = self.prepare(model, "causal_lm")
        try:
            history = fit(steered, self, items, lambda b: self.collate(b, pad), [2 if self.p["swapped"] else 1] *
                          len(items), self.training(), seed, progress, f"steer {self.name}")
        finally:
            for h in self.handles:
                h.remove()
            for name, p in model.named_parameters():
                p.requires_grad_(grads[name])
            model.eval()
        return {i: self.deltas[str(i)].tensors() for i in self.layers}, history


def form_hooks(build):
    """The `applied` hooks of a trained form: `build(model, layer, tensors)` gives the layer's intervention (in
    eval mode), its delta added at the artefact's strength through `install`."""

    def hooks(model, artefact, strength: float, where) -> list:
        module = artefact.config.get("module")
        deltas = {i: build(model, i, t).eval() for i, t in artefact.vectors.items()}
        for i, d in deltas.items():
            width, want = next(d.parameters()).shape[0], module_width(model, i, module)
            if width != want:
                raise InputError(f"{artefact.where()}: layer {i}'s intervention reads {width} features; the "
                                 f"model's {module or 'layer input'} has {want}")
        return install(model, deltas, module, Strength(strength))

    return hooks


def down_proj_bake(model, artefact, strength: float, weight: torch.Tensor, layer: int,
                   bias: torch.Tensor | None = None) -> None:
    """Fold `strength * (x weight + bias)` into decoder layer `layer`'s mlp.down_proj (x its input, weight
    (in, hidden)): exact where the MLP's output joins the residual stream unchanged (Llama; not Gemma's post-MLP
    norm). The bias goes through the vector form's `mlp_bias` baking."""
    from malleable.steer.apply import _vector_bake
    from malleable.steer.artefact import Artefact

    if artefact.config.get("module") != "mlp.down_proj":
        raise InputError(f"{artefact.where()}: only an intervention on mlp.down_proj's input bakes into weights; "
                         f"this one reads {artefact.config.get('module')!r} (apply it with hooks)")
    block = decoder_layers(model)[layer]
    if hasattr(block, "post_feedforward_layernorm"):
        raise InputError(f"{artefact.where()}: {type(block).__name__} normalises the MLP output before the residual "
                         "stream; the intervention does not bake into its weights (apply it with hooks)")
    down = block.mlp.down_proj
    if tuple(weight.shape) != (down.in_features, down.out_features):
        raise InputError(f"{artefact.where()}: layer {layer}'s tensors are {list(weight.shape)}; the model's "
                         f"down_proj maps {down.in_features} to {down.out_features}")
    with torch.no_grad():
        down.weight.add_((strength * weight.to(torch.float64).T).to(down.weight.dtype))
    if bias is not None:
        _vector_bake(model, Artefact({layer: bias}, artefact.config, artefact.path), strength)
