"""The `malleable` command: one sub-command per verb, plus inspect / import-gguf / methods / bench.

Errors the user can fix (`MalleableError`) print one line on stderr and exit with code 2. Anything else is a
bug in malleable: its traceback is printed with a line asking for a report, and the exit code is 1, so the two
are never confused.
"""

from __future__ import annotations

import functools
import json
import math
import os
import traceback
from pathlib import Path

# Nothing is fetched from a model hub: every model is a local folder. Set before any Hugging Face library loads.
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

import click  # noqa: E402 (after the offline flags, on purpose)
import typer  # noqa: E402

from malleable.errors import MalleableError, RecipeError  # noqa: E402
from malleable.io.atomic import check_not_input  # noqa: E402
from malleable.protocols.zoo import ZooSettings  # noqa: E402

PICKLE_HELP = "load legacy .bin weights (torch.load with weights_only=True); refused otherwise"
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reshape trained models after training.")


def _user_errors(fn):
    """The error boundary: a MalleableError is one line on stderr and exit code 2 (no traceback); any other
    exception is a bug in malleable, shown with its traceback and a request to report it, exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MalleableError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written", err=True)
            raise typer.Exit(130) from None
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except Exception:
            traceback.print_exc()
            typer.echo("this is a bug in malleable, not a problem with your input: please report it with the "
                       "command and the traceback above", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@_user_errors
def merge(
    recipe: Path = typer.Argument(..., help="YAML recipe (malleable or mergekit format)"),
    out: Path = typer.Argument(..., help="output directory (a checkpoint or a PEFT adapter)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan; write nothing"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Merge full models or LoRA adapters into one model or one adapter."""
    from malleable.merge.engine import describe, plan_merge, run_merge
    from malleable.recipes.merge import load_recipe
    from malleable.recipes.mergekit import read_documents

    check_not_input(out, [recipe])
    docs = read_documents(recipe)
    if docs is not None:  # mergekit-multi: several merges, the unnamed one written to `out`
        from malleable.merge.multi import describe_documents, run_documents

        if dry_run:
            typer.echo(describe_documents(recipe, docs, allow_pickle))
            return
        report = run_documents(recipe, docs, out, force=force, progress=not quiet, allow_pickle=allow_pickle)
        typer.echo(f"merged {len(report['intermediate_merges'])} intermediate merge(s), then "
                   f"{len(report['tensors'])} tensors with {report['method']} in {report['wall_time_s']} s")
        typer.echo(f"output: {report['output']['path']}")
        return
    r = load_recipe(recipe)
    if allow_pickle:
        r.allow_pickle = True
    try:
        plan = plan_merge(r)
    except RecipeError as e:  # keys are relative to the recipe: name the file too
        raise RecipeError(f"{recipe}: {e}" if not str(e).startswith(str(recipe)) else str(e)) from None
    if dry_run:
        typer.echo(describe(plan))
        return
    report = run_merge(plan, out, force=force, progress=not quiet)
    if not report.get("main_process", True):  # a learned rule under `accelerate launch`: one process speaks
        return
    typer.echo(f"merged {len(report['tensors'])} tensors with {report['method']} in {report['wall_time_s']} s "
               f"(peak RSS {report['peak_rss_mb']} MB)")
    typer.echo(f"output: {report['output']['path']}")
    typer.echo(f"report: {Path(report['output']['path']) / 'report.json'}")


@app.command()
@_user_errors
def learn(
    recipe: Path = typer.Argument(..., help="YAML learn recipe"),
    out: Path = typer.Argument(..., help="output directory (a PEFT adapter or a checkpoint)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output and discard old checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from OUT.run/"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train an adapter or a model (LoRA, Bi-LoRA, zeroth-order, MemFT, full); `accelerate launch` for DDP or FSDP."""
    from malleable.learn.engine import learn as run
    from malleable.learn.engine import read_recipe

    check_not_input(out, [recipe])
    r = read_recipe(recipe)
    r.allow_pickle = r.allow_pickle or allow_pickle
    report = run(r, out, force=force, resume=resume, progress=not quiet)
    if not report["main_process"]:  # under `accelerate launch`, one process speaks
        return
    final = ", ".join(f"{k} {v}" for k, v in report["final"].items() if v is not None)
    typer.echo(f"trained {report['method']} for {report['batches']['steps']} steps in {report['wall_time_s']} s "
               f"({final}; peak RSS {report['peak_rss_mb']} MB)")
    typer.echo(f"output: {report['output']['path']}")
    typer.echo(f"report: {Path(report['output']['path']) / 'report.json'}")


@app.command()
@_user_errors
def forget(
    recipe: Path = typer.Argument(..., help="YAML forget recipe"),
    out: Path = typer.Argument(..., help="output directory (the unlearned checkpoint, or a PEFT adapter)"),
    reference: str = typer.Option(None, "--reference",
                                  help="a retrained model to compare with, or 'retrain' to train one from the "
                                       "recipe's `retrain:` learn recipe on data.retain"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and print the plan; write nothing"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Remove the forget set from a model (GA, NPO, SimNPO, RMU, SalUn, ...) and report the evidence."""
    from malleable.forget.run import check_recipe
    from malleable.forget.run import forget as run
    from malleable.forget.run import read_recipe

    check_not_input(out, [recipe])
    r = read_recipe(recipe)
    r.allow_pickle = r.allow_pickle or allow_pickle
    objective = check_recipe(r)
    if dry_run:
        typer.echo(f"forget {r.data.forget} from {r.model} with {r.objective} {json.dumps(objective.p)}"
                   + (f", mask {json.dumps(r.mask)}" if r.mask else "") + (f", through LoRA {json.dumps(r.lora)}"
                                                                          if r.lora else "")
                   + f"; retain {r.data.retain}; training {r.training.model_dump(exclude_none=True)}")
        return
    report = run(r, out, force=force, reference=reference, progress=not quiet)
    e = report["evidence"]
    typer.echo(f"{r.objective}: {report['steps']} steps in {report['unlearning_seconds']} s")
    for name, row in e.items():
        typer.echo(f"  {name:<10} " + ", ".join(f"{s} acc {row[s]['accuracy']:.3f}" for s in ("forget", "retain",
                                                                                            "holdout") if s in row)
                   + _membership(row))
    if report["calibration"]:
        c = report["calibration"]
        typer.echo(f"calibrated stopping ({c['rule']}): stopped at step {c['stopped_at']}"
                   + (f", back to step {c['restored_to']}" if c["restored_to"] else ""))
    if report["verdict"]:
        typer.echo(f"verdict: {report['verdict']}")
    typer.echo(f"output: {report['output']['path']}")
    typer.echo(f"report: {Path(report['output']['path']) / 'report.json'}")


@app.command()
@_user_errors
def continual(
    recipe: Path = typer.Argument(..., help="YAML continual recipe (a method and a stream of steps or a scenario, "
                                            "or a `tasks:` list)"),
    out: Path = typer.Argument(..., help="output folder: final model or adapter, one per step, report, plots"),
    force: bool = typer.Option(False, "--force", help="replace an existing output and discard old checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted stream from OUT.run/"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and print the plan; write nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Learn over a stream, online (finetune, ER, ER-ACE, LAS; joint as the upper bound), or a language model
    over a `tasks:` list with a LoRA strategy (seq_lora, inc_lora, o_lora, ...); report the accuracy matrix."""
    from malleable.continual.engine import continual as run
    from malleable.continual.engine import plan, read_recipe

    check_not_input(out, [recipe])
    r = read_recipe(recipe)
    if dry_run:
        typer.echo(plan(r))
        return
    report = run(r, out, force=force, resume=resume, progress=not quiet)
    m = report["metrics"]
    typer.echo(f"{report['method']}: {len(report['steps'])} steps in {report['train_seconds']} s; average accuracy "
               f"{m['average_accuracy']:.2f}%, forgetting "
               + ("-" if m["forgetting"] is None else f"{m['forgetting']:.2f}") + " points")
    typer.echo(f"output: {report['output']['path']}")
    typer.echo(f"report: {Path(report['output']['path']) / 'report.json'}")


@app.command()
@_user_errors
def audit(
    model: Path = typer.Argument(..., help="the model (checkpoint or PEFT adapter) that should have forgotten"),
    forget: Path = typer.Option(..., "--forget", help="the rows it should have forgotten"),
    retain: Path = typer.Option(None, "--retain", help="rows it should still know"),
    holdout: Path = typer.Option(None, "--holdout",
                                 help="similar rows it never saw (the membership attack's baseline)"),
    original: Path = typer.Option(None, "--original", help="the model before unlearning, for comparison"),
    task: str = typer.Option("causal_lm", "--task", help="causal_lm or classification"),
    relearn_steps: int = typer.Option(10, "--relearn-steps", help="fine-tuning steps of the relearning attack"),
    relearn_fraction: float = typer.Option(0.1, "--relearn-fraction", help="share of the forget rows it trains on"),
    relearn_lr: float = typer.Option(1e-4, "--relearn-lr"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", help="write report.json, report.md and evidence.png here"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Membership-inference and relearning evidence that a model has forgotten a set."""
    from malleable.protocols.audit import audit as run

    if task not in ("causal_lm", "classification"):
        raise RecipeError(f"--task: '{task}' is not one of ['causal_lm', 'classification']")
    if not 0 < relearn_fraction < 1:  # NaN fails this too
        raise RecipeError(f"--relearn-fraction: {relearn_fraction} must be between 0 and 1")
    if relearn_steps < 1:
        raise RecipeError(f"--relearn-steps: {relearn_steps} must be at least 1")
    if not 0 < relearn_lr < float("inf"):
        raise RecipeError(f"--relearn-lr: {relearn_lr} must be a positive finite number")
    if not 0 <= seed < 2**32:
        raise RecipeError(f"--seed: {seed} must be between 0 and 2**32 - 1")
    r = run(model, forget=forget, retain=retain, holdout=holdout, original=original, task=task,
            relearn_steps=relearn_steps, relearn_fraction=relearn_fraction, relearn_lr=relearn_lr, seed=seed,
            out=out, force=force, allow_pickle=allow_pickle)
    for name, row in r["evidence"].items():
        typer.echo(f"{name:<9} " + ", ".join(f"{s} acc {row[s]['accuracy']:.3f}" for s in ("forget", "retain",
                                                                                          "holdout") if s in row)
                   + _membership(row))
    for name, a in r["relearning"].items():
        typer.echo(f"relearning {name}: held-out forget accuracy {a['before']['accuracy']:.3f} -> "
                   f"{a['after']['accuracy']:.3f} after {a['steps']} steps on {a['trained_on']} rows")
    typer.echo(f"recovered: {json.dumps(r['recovered'])}")
    if out is not None:
        typer.echo(f"report: {out / 'report.json'}")


@app.command()
@_user_errors
def steer(
    recipe: Path = typer.Argument(..., help="YAML steer recipe"),
    out: Path = typer.Argument(..., help="output folder: the steering artefact (safetensors + JSON) and the report"),
    strengths: str = typer.Option(None, "--strengths", help="comma-separated strengths: samples at each, and "
                                  "PrefOdds / UtilOdds of the validation pairs with fitted curves (preference.png)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and print the plan; write nothing"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Extract a steering vector (CAA, ActAdd, PCA, logistic) from contrast pairs, or train a SPLIT intervention
    (split_vector, split_lora, split_weight) on them through learn's engine, or fit ITI's probes per attention head;
    report the probe per layer."""
    from malleable.recipes.steer import load_steer_recipe
    from malleable.steer.engine import check_recipe, plan
    from malleable.steer.engine import steer as run

    check_not_input(out, [recipe])
    values = _strengths(strengths)
    r = load_steer_recipe(recipe, check_recipe)
    r.allow_pickle = r.allow_pickle or allow_pickle
    if dry_run:
        sweep = f"; samples and the preference-utility sweep at strengths {values}" if values else ""
        typer.echo(plan(r, check_recipe(r)) + sweep)
        return
    report = run(r, out, force=force, strengths=values, progress=not quiet)
    a = report["artefact"]
    best = max(report["probe_accuracy"].items(), key=lambda kv: kv[1])
    typer.echo(f"{a['method']} on layers {a['layers']} (default strength {a['default_strength']:.4g}); best probe "
               f"layer {best[0]} at {best[1]:.3f} validation accuracy; {report['wall_time_s']} s")
    for line in report.get("fit_summary", []):  # what a fitted method (SPLIT, ITI) did
        typer.echo(line.removeprefix("- "))
    typer.echo(f"output: {report['output']['path']}")
    typer.echo(f"report: {Path(report['output']['path']) / 'report.json'}")


@app.command()
@_user_errors
def slim(
    recipe: Path = typer.Argument(..., help="YAML slim recipe"),
    out: Path = typer.Argument(..., help="output checkpoint folder (loads with from_pretrained) with its report"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and print the plan; write nothing"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Make a model cheaper: prune weights (magnitude, Wanda, SparseGPT; unstructured or N:M) or remove decoder
    layers (ShortGPT), and/or evict KV-cache positions at generation (StreamingLLM, SnapKV, H2O, key norm);
    report perplexity, speed, size and the KV cache's quality and memory against the dense model."""
    from malleable.recipes.slim import load_slim_recipe
    from malleable.slim.engine import check_recipe, describe, plan
    from malleable.slim.engine import slim as run

    check_not_input(out, [recipe])
    r = load_slim_recipe(recipe, check_recipe)
    r.allow_pickle = r.allow_pickle or allow_pickle
    if dry_run:
        typer.echo(describe(plan(r)))
        return
    report = run(r, out, force=force, progress=not quiet)
    if report["method"] is None:
        pass
    elif "pruned" in report:
        p = report["pruned"]
        typer.echo(f"{report['method']}: {p['modules']} modules pruned ({p['pattern']}), sparsity "
                   f"{p['achieved_sparsity']:.4f}; {report['wall_time_s']} s")
    else:
        lay = report["layers"]
        typer.echo(f"{report['method']}: removed layers {lay['removed']} of {lay['of']}; {report['wall_time_s']} s")
    e = report.get("evaluation")
    if e:
        typer.echo(f"perplexity on {e['source']}: {e['perplexity']['dense']:.4g} -> {e['perplexity']['slim']:.4g}"
                   + (f"; decode tokens/s x{e['speed']['decode_ratio']:.2f}" if "speed" in e else ""))
    if "kv" in report:
        k, s = report["kv"], report["kv"]["summary"]
        found = "" if s["evicted"]["needle"] is None else (f"; needles {s['full']['needle']:.2f} -> "
                                                            f"{s['evicted']['needle']:.2f}")
        typer.echo(f"kv {k['policy']}: {k['kept_positions']} of {k['context']} positions kept, KV memory "
                   f"{s['full']['kv_bytes'] / 2**20:.1f} -> {s['evicted']['kv_bytes'] / 2**20:.1f} MiB; next-token "
                   f"NLL {s['full']['nll']:.3f} -> {s['evicted']['nll']:.3f}, KL {s['evicted']['kl']:.4f}{found}")
    typer.echo(f"output: {report['output']['path']}")
    typer.echo(f"report: {Path(report['output']['path']) / 'report.json'}")


@app.command("steer-bake")
@_user_errors
def steer_bake(
    artefact: Path = typer.Argument(..., help="a folder written by `malleable steer`"),
    model: Path = typer.Argument(..., help="the checkpoint to bake it into (Llama family: config mlp_bias)"),
    out: Path = typer.Argument(..., help="output checkpoint folder (loads with plain from_pretrained)"),
    strength: float = typer.Option(None, "--strength", help="default: the artefact's default strength"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Bake a steering artefact into a plain transformers checkpoint (a vector: a bias on the layer's MLP output;
    SPLIT's LoRA and local weight: a delta on its mlp.down_proj)."""
    from malleable.steer.apply import bake

    check_not_input(out, [artefact, model])
    typer.echo(f"output: {bake(artefact, model, out, strength=strength, force=force)}")


@app.command("steer-peft")
@_user_errors
def steer_peft(
    artefact: Path = typer.Argument(..., help="a folder written by `malleable steer`"),
    model: Path = typer.Argument(..., help="the base checkpoint the adapter is for"),
    out: Path = typer.Argument(..., help="output PEFT adapter folder (PeftModel.from_pretrained(base, out))"),
    strength: float = typer.Option(None, "--strength", help="default: the artefact's default strength"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Export a steering artefact as a PEFT LoRA adapter on exactly the modules its bake changes (a bias part as
    PEFT's lora_bias); loaded with PEFT it gives the baked checkpoint's logits."""
    from malleable.steer.peft_export import export_peft

    check_not_input(out, [artefact, model])
    typer.echo(f"output: {export_peft(artefact, model, out, strength=strength, force=force)}")


@app.command("steer-gguf")
@_user_errors
def steer_gguf(
    artefact: Path = typer.Argument(..., help="a folder written by `malleable steer`"),
    out: Path = typer.Argument(..., help="output .gguf file (llama.cpp --control-vector)"),
    strength: float = typer.Option(None, "--strength", help="default: the artefact's default strength"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Export a steering vector as a llama.cpp control-vector GGUF (as repeng's export_gguf writes it)."""
    from malleable.steer.apply import export_gguf

    check_not_input(out, [artefact])
    typer.echo(f"output: {export_gguf(artefact, out, strength=strength, force=force)}")


def _strengths(text: str | None) -> list[float]:
    """--strengths '0,2,4' as finite numbers, else one line naming the option."""
    if text is None:
        return []
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--strengths: {text!r} is not a comma-separated list of numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise RecipeError(f"--strengths: {text!r} must hold finite numbers")
    return values


@app.command()
@_user_errors
def inspect(
    path: Path = typer.Argument(..., help="checkpoint directory, safetensors file, PEFT adapter or GGUF file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """What a checkpoint, adapter or GGUF file holds (from headers; no weights are loaded)."""
    from malleable.inspect import inspect_path

    info = inspect_path(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "bytes":
            v = f"{v / 1e6:.1f} MB"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
        typer.echo(f"{k:<{width}}  {v}")


@app.command("import-gguf")
@_user_errors
def import_gguf(
    file: Path = typer.Argument(..., help="GGUF file"),
    out: Path = typer.Argument(..., help="output checkpoint directory"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
) -> None:
    """Convert a GGUF file to a plain transformers checkpoint (safetensors), via transformers' GGUF loader."""
    from malleable.io.gguf import import_gguf as run

    typer.echo(f"output: {run(file, out, force=force)}")


@app.command()
def methods() -> None:
    """List the merge, learn, forget and continual methods, the routers and the steering methods, with parameters."""
    from malleable.forget import MASKS, OBJECTIVES
    from malleable.learn import METHODS
    from malleable.merge import RULES, get_rule

    get_rule("linear")  # imports every rule module
    typer.echo("merge methods:")
    for name in sorted(RULES):
        rule = RULES[name]
        _describe(f"{name}  [{rule.space}]", rule.doc, rule.params)
    typer.echo("\nlearn methods:")
    for name in sorted(METHODS):
        _describe(name, METHODS[name].__doc__ or "", METHODS[name].params)
    typer.echo("\nforget objectives:")
    for name in sorted(OBJECTIVES):
        cls = OBJECTIVES[name]
        _describe(f"{name}  [{', '.join(sorted(cls.kinds))}]", cls.__doc__ or "", cls.params)
    typer.echo("\nforget masks:")
    for name in sorted(MASKS):
        _, params, doc = MASKS[name]
        _describe(name, doc, params)
    from malleable.continual import METHODS as CONTINUAL

    typer.echo("\ncontinual methods:")
    for name in sorted(CONTINUAL):
        _describe(name, CONTINUAL[name].__doc__ or "", CONTINUAL[name].params)
    from malleable.route import ROUTERS

    typer.echo("\nrouters:")
    for name in sorted(ROUTERS):
        cls = ROUTERS[name]
        _describe(f"{name}  [{cls.knob or 'no trade-off'}]", cls.__doc__ or "", cls.params)
    from malleable.steer import METHODS as STEERING

    typer.echo("\nsteering methods:")
    for name in sorted(STEERING):
        cls = STEERING[name]
        _describe(f"{name}  [read {cls.read}, add at {cls.intervene}]", cls.__doc__ or "", cls.params)
    from malleable.slim import METHODS as SLIMMING

    typer.echo("\nslim methods:")
    for name in sorted(SLIMMING):
        cls = SLIMMING[name]
        _describe(f"{name}  [{cls.kind}]", cls.__doc__ or "", cls.params)
    import sys

    from malleable.slim.evict import POLICIES

    typer.echo("\nKV-cache eviction policies (a slim recipe's kv.policy):")
    for name in sorted(POLICIES):
        _describe(name, sys.modules[POLICIES[name].__module__].__doc__ or "", POLICIES[name].params)


def _membership(row: dict) -> str:
    """The membership-inference AUCs of one evidence row, as a clause."""
    names = {"membership_auc": "loss", "membership_auc_min_k": "min-k%"}
    found = [f"{names[k]} {row[k]:.3f}" for k in names if k in row]
    return f", membership AUC {' / '.join(found)}" if found else ""


def _describe(title: str, doc: str, params: dict) -> None:
    typer.echo(f"{title}  {' '.join(doc.strip().split(chr(10) * 2)[0].split())}")
    for key, p in params.items():
        extra = f" one of {list(p.choices)}" if p.choices else ""
        per = " (per input)" if p.per_input else ""
        value = "(required)" if p.required else f"= {p.default!r}"
        typer.echo(f"    {key} {value}{per}{extra}: {p.doc}")


route_app = typer.Typer(no_args_is_help=True, help="Choose which model or adapter answers each query under a cost "
                        "budget: fit routers on quality and cost matrices, and compare them.")
app.add_typer(route_app, name="route")


def _route_summary(report: dict) -> None:
    for r in sorted(report["routers"].values(), key=lambda r: -(r["test"]["rank_score"] or 0)):
        t = r["test"]
        typer.echo(f"  {r['router']:<20} accuracy {t['accuracy']:.3f}  cost {t['cost']:.4g}  rank score "
                   f"{t['rank_score']:.3f}  AIQ {r['aiq']:.3f}")


@route_app.command("fit")
@_user_errors
def route_fit(
    matrices: Path = typer.Argument(..., help="folder with the quality and cost matrices (Y/C arrays, "
                                              "VL-RouterBench's layout, or a scores.csv/parquet long table)"),
    out: Path = typer.Argument(..., help="output folder: routers/, report.json, report.md, curves.png"),
    recipe: Path = typer.Option(None, "--recipe", help="YAML route recipe (default: every router, 60/20/20 split)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the recipe and print the plan; write nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Fit routers (baselines, kNN, linear, MLP, MF, soft-label) and compare them on the test split."""
    from malleable.recipes.route import RouteRecipe, load_route_recipe
    from malleable.route.engine import check_recipe, fit_routers

    if recipe is not None:
        check_not_input(out, [recipe])
    r = load_route_recipe(recipe, check_recipe) if recipe is not None else RouteRecipe()
    routers = check_recipe(r)
    if dry_run:
        typer.echo(f"fit {', '.join(x.name for x in routers)} on {matrices}; split {r.split.model_dump()} "
                   f"(when the matrices carry none), seed {r.seed}, beta {r.beta}")
        return
    report = fit_routers(matrices, r, out, force=force, progress=not quiet)
    q = report["queries"]
    typer.echo(f"fitted {len(report['routers'])} routers on {q['train']} queries in {report['wall_time_s']} s; "
               f"test ({q['test']} queries):")
    _route_summary(report)
    typer.echo(f"output: {report['output']['path']}")


@route_app.command("build")
@_user_errors
def route_build(
    recipe: Path = typer.Argument(..., help="YAML build recipe: candidates (checkpoints, PEFT adapters) and tasks"),
    out: Path = typer.Argument(..., help="output matrices folder (Y.npy, C.npy, embeddings.npy, meta.csv, ...)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Run every candidate on every labelled query once (the recipe's metric: exact match of a greedy answer,
    teacher-forced match, or log-likelihood multiple choice) and write the quality and cost matrices, the query
    embeddings and, with `arrow: true`, the Arrow scores; a killed build resumes from OUT.cache/."""
    from malleable.recipes.route import load_route_build_recipe
    from malleable.route.build import build

    check_not_input(out, [recipe])
    report = build(load_route_build_recipe(recipe), out, force=force, progress=not quiet)
    typer.echo(f"{report['queries']} queries x {len(report['candidates'])} candidates in {report['wall_time_s']} s: "
               + ", ".join(f"{c} {a:.3f}" for c, a in report["accuracy"].items()))
    typer.echo(f"output: {report['output']['path']}")


@route_app.command("eval")
@_user_errors
def route_eval(
    fitted: Path = typer.Argument(..., help="a folder written by `malleable route fit`"),
    matrices: Path = typer.Argument(..., help="matrices folder to score the routers on (its test split)"),
    out: Path = typer.Option(None, "--out", help="write report.json, report.md and curves.png here"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
) -> None:
    """Score fitted routers side by side on the test split of a matrices folder."""
    from malleable.route.engine import evaluate_routers

    report = evaluate_routers(fitted, matrices, out, force=force)
    typer.echo(f"test ({report['queries']['test']} queries):")
    _route_summary(report)
    if out is not None:
        typer.echo(f"report: {out / 'report.json'}")


@route_app.command("run")
@_user_errors
def route_run(
    fitted: Path = typer.Argument(..., help="a folder written by `malleable route fit`"),
    router: str = typer.Option(..., "--router", help="which fitted router routes (its value chosen on validation)"),
    queries: Path = typer.Option(..., "--input", help="JSONL / CSV / Parquet: a prompt per row, optional id and task"),
    out: Path = typer.Option(..., "--out", help="answers as JSONL: id, prompt, candidate, answer"),
    pool: Path = typer.Option(None, "--pool", help="YAML: the build recipe or its candidates: list (default: the "
                                                   "pool `route build` ran, found through fit's report)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output file"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Answer queries with a routed pool: the router picks a candidate per query; adapters on one base answer
    in one mixed-adapter batch, whole models on their own."""
    from malleable.route.serve import run

    report = run(fitted, router, queries, out, pool=pool, force=force, progress=not quiet)
    counts = ", ".join(f"{c} {n}" for c, n in report["per_candidate"].items() if n)
    typer.echo(f"{report['queries']} queries routed by {router} ({counts}); loaded in {report['load_s']} s, "
               f"answered in {report['serve_s']} s")
    typer.echo(f"output: {report['output']['path']}")


bench_app = typer.Typer(no_args_is_help=True, help="Reproducible benchmarks on real models and data.")
app.add_typer(bench_app, name="bench")


@bench_app.command("zoo")
@_user_errors
def bench_zoo(
    out: Path = typer.Option(Path("bench/results"), "--out", help="folder for zoo.json and zoo.md"),
    steps: int = typer.Option(ZooSettings.steps, "--steps", help="training steps per task adapter (batch of 8)"),
    multi_steps: int = typer.Option(ZooSettings.multi_steps, "--multi-steps",
                                    help="training steps of the multi-task adapter"),
    max_eval: int = typer.Option(ZooSettings.max_eval, "--max-eval",
                                 help="held-out pairs per task to evaluate, at most"),
    seed: int = typer.Option(ZooSettings.seed, "--seed"),
    cache: Path = typer.Option(None, "--cache", help="adapter cache (default $MALLEABLE_CACHE/zoo)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train (or reuse from the cache) eight word-relation LoRAs and a multi-task one on SmolLM2-135M-Instruct
    and score every adapter on every task."""
    from malleable.protocols.zoo import write_zoo_results

    settings = ZooSettings(steps=steps, multi_steps=multi_steps, max_eval=max_eval, seed=seed)
    result = write_zoo_results(settings, out, cache, progress=not quiet)
    typer.echo(f"zoo {result['key']}: {result['directory']}")
    typer.echo("mean exact match: " + ", ".join(f"{k} {v:.1%}" for k, v in result["mean"].items()))
    typer.echo(f"results: {out / 'zoo.json'}, {out / 'zoo.md'}")
