"""Loading a user's transformers checkpoint or PEFT adapter: the one place every verb gets its model and tokenizer.

Before transformers or PEFT sees a folder, it is checked the way `merge` checks its inputs: a local folder
(nothing is fetched from a hub), no link leading outside it, weights in safetensors (pickle only when the user
allowed it, and then with `weights_only=True`), headers and indexes consistent. After loading, any weight
transformers had to initialise afresh (a config that declares more layers than the checkpoint holds) is an
error. Failures become one InputError line naming the path (the CLI turns that into exit 2), never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from malleable.errors import InputError, reason
from malleable.io.checkpoint import Checkpoint, read_json
from malleable.io.paths import check_folder, contained
from malleable.io.quiet import quiet_transformers
from malleable.models.chat import check_chat_template

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Trust:
    """What the user allowed beyond plain data: code shipped inside a model folder, pickle weight files."""

    remote_code: bool = False
    pickle: bool = False


def checkpoint_base(path: Path) -> tuple[Path, bool]:
    """(the checkpoint whose weights load, whether `path` is a PEFT adapter on top of it); both local folders."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such folder (malleable loads models from local folders only)")
    if (path / ADAPTER_CONFIG).is_file():
        cfg = path / ADAPTER_CONFIG
        base = read_json(cfg).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise InputError(f"{cfg}: base_model_name_or_path is not set; malleable needs the base model's folder")
        if not (Path(base) / "config.json").is_file():
            raise InputError(f"{cfg}: base model '{base}' is not a local checkpoint folder (no {base}/config.json); "
                             "malleable loads local paths only, nothing from a hub")
        return Path(base), True
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: neither a transformers checkpoint (config.json) nor a PEFT adapter")
    return path, False


def check_model_folder(path: Path, trust: Trust = Trust()) -> tuple[Path, bool]:
    """`checkpoint_base(path)`, after checking every folder it involves the way `merge` checks its inputs:
    no links leading outside, a config that is a JSON object, and weights that open (headers, indexes, shards
    inside the folder, no pickle unless allowed)."""
    base, adapter = checkpoint_base(path)
    for folder in {Path(path), base}:
        check_folder(folder)
    read_json(base / "config.json")
    Checkpoint(base, allow_pickle=trust.pickle)
    if adapter:
        weights = contained(path, ADAPTER_WEIGHTS, path / ADAPTER_CONFIG)
        if not weights.is_file() and not trust.pickle:
            raise InputError(f"{path}: no {ADAPTER_WEIGHTS}; pickle adapters (adapter_model.bin) are refused unless "
                             "you allow them (--allow-pickle / allow_pickle: true)")
        if weights.is_file():
            Checkpoint(weights)
    return base, adapter


def load_tokenizer(path: Path, trust: Trust = Trust()):
    """The tokenizer beside a checkpoint or adapter (else the adapter's base), with a pad token (EOS if none).
    Its chat template is tried once, within bounds, so a broken or hostile one is refused here."""
    from transformers import AutoTokenizer

    path = Path(path)
    base, _ = check_model_folder(path, trust)
    source = path if (path / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust.remote_code, local_files_only=True)
    except Exception as e:  # tokenizers, sentencepiece and transformers each raise their own types on bad files
        raise InputError(f"{source}: cannot load its tokenizer ({reason(e, typed=True)})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise InputError(f"{source}: its tokenizer has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    check_chat_template(tokenizer)
    return tokenizer


def model_labels(path: Path, task: str) -> list[str] | None:
    """A classifier checkpoint's classes in index order, from its config (no weights loaded)."""
    if task != "classification":
        return None
    base, _ = checkpoint_base(path)
    id2label = read_json(base / "config.json").get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))]
    except (KeyError, TypeError):
        raise InputError(f"{base / 'config.json'}: id2label must map 0..{len(id2label) - 1} to names") from None


def load_model(path: Path, task: str, pad_id: int, *, labels: list[str] | None = None, trust: Trust = Trust()):
    """A checkpoint's model in float32 (mixed precision is autocast's job), or a PEFT adapter on its base with
    the adapter's factors trainable. `labels` gives a classifier a fresh head sized and named by them; without
    it a classifier keeps the head it was saved with."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base, adapter = check_model_folder(path, trust)
    # mismatched shapes are loaded as fresh weights and reported, so the check below names the tensor
    kw = {"dtype": torch.float32, "trust_remote_code": trust.remote_code, "local_files_only": True,
          "use_safetensors": None if trust.pickle else True, "output_loading_info": True,
          "ignore_mismatched_sizes": True}
    if task == "classification" and labels is not None:
        kw |= {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
               "label2id": {x: i for i, x in enumerate(labels)}}
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:  # its load report and bar go quiet: what matters in them becomes our one line below
        with quiet_transformers():
            model, info = cls.from_pretrained(base, **kw)
    except Exception as e:  # an unknown architecture, a config transformers rejects, a damaged file
        raise InputError(f"{base}: cannot load the model ({reason(e, typed=True)})") from None
    fresh = [k for k in info.get("missing_keys", ()) if not (labels is not None and _head(model, k))]
    mismatched = sorted(m for m in info.get("mismatched_keys", ()) if not (labels is not None and _head(model, m[0])))
    if mismatched:
        key, found, wanted = (list(mismatched[0]) + [None, None])[:3]
        raise InputError(f"{base}: tensor '{key}' has shape {list(found or [])} in the checkpoint, but config.json "
                         f"makes it {list(wanted or [])}")
    if fresh:
        raise InputError(f"{base}: config.json declares weights the checkpoint does not hold ({len(fresh)}, e.g. "
                         f"'{sorted(fresh)[0]}'); transformers would initialise them at random")
    if getattr(model.config, "malleable_skipgpt", None):  # slim's SkipGPT: routers in a file beside the weights
        from malleable.models.routed import attach

        attach(model, base)
    if adapter:
        from peft import PeftModel

        try:
            with quiet_transformers():
                model = PeftModel.from_pretrained(model, path, is_trainable=True)
        except Exception as e:  # PEFT raises ValueError, KeyError, RuntimeError (shapes) on a bad adapter
            raise InputError(f"{path}: cannot load the adapter ({reason(e, typed=True)})") from None
    if task == "classification":
        model.config.pad_token_id = pad_id
    return model.eval()


def _head(model, key: str) -> bool:
    """A weight of the task head that a classifier with new labels gets afresh (outside the base model)."""
    return key.split(".", 1)[0] != getattr(model, "base_model_prefix", "model")


def default_cache_dir(name: str) -> Path:
    """Where malleable keeps what it builds once and reuses (a packaged model imported to a checkpoint, the
    benchmarks' zoo): `$MALLEABLE_CACHE/<name>`, else `~/.cache/malleable/<name>`."""
    root = os.environ.get("MALLEABLE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "malleable") / name


def materialised(out: Path) -> bool:
    """A checkpoint folder a loader wrote earlier (its config and weights are there)."""
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()
