"""Hostile input for the readers: each case damages a private copy of the fixtures and runs `merge`, `inspect` or
`import-gguf` through `refused`: one `error:` line naming the file (and the tensor or key), exit 2, nothing
written, inputs byte-identical, and, for every case that points outside its folder, no file there opened."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_finetune, tiny_llama
from hostile import SECRET, plant, recording_opens, refused
from safetensors.torch import load_file
from typer.testing import CliRunner

from malleable.cli import app

INDEX = "model.safetensors.index.json"
T = "model.layers.0.mlp.up_proj.weight"  # [128, 64] float32, like its neighbour gate_proj
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A fine-tune of the tiny base saved in ~100 KB shards with an index, as save_pretrained writes it."""
    return save_finetune(tiny_llama(0), tmp_path_factory.mktemp("sharded") / "sharded", seed=7,
                         max_shard_size="100KB")


@pytest.fixture
def work(models, adapters, sharded, tmp_path) -> dict[str, Path]:
    """Private copies of the fixtures, free to be damaged."""
    out = {}
    for name, src in {**models, **adapters, "sharded": sharded}.items():
        if name not in ("ft2", "lora2"):
            out[name] = tmp_path / name
            shutil.copytree(src, out[name])
    return out


@pytest.fixture
def outside(tmp_path) -> Path:
    return plant(tmp_path / "elsewhere")


def header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, head: dict | bytes, data: bytes) -> None:
    raw = head if isinstance(head, bytes) else json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_json(path: Path, edit) -> None:
    """Apply `edit` to the file's JSON in place; a value it returns replaces the whole (a list, say)."""
    value = json.loads(path.read_text())
    value = edit(value) or value
    path.write_text(json.dumps(value))


def write_index(folder: Path, **override) -> Path:
    """An index for a single-file checkpoint (every tensor in model.safetensors), with some entries changed."""
    names = [k for k in header(folder / "model.safetensors")[0] if k != "__metadata__"]
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        **dict.fromkeys(names, "model.safetensors"), **override}}))
    return folder / INDEX


def command(verb: str, work: dict[str, Path], target: Path, tmp_path: Path) -> tuple[list, Path | None]:
    """`malleable <verb>` with `target` as the damaged input (merged with an undamaged partner)."""
    if verb == "inspect":
        return ["inspect", target], None
    if (target / "adapter_config.json").exists() or (target / "adapter_config.json").is_symlink():
        recipe = {"method": "ties", "inputs": [{"path": str(work["lora0"])}, {"path": str(target)}]}
    else:
        recipe = {"method": "ties", "base": str(work["base"]),
                  "inputs": [{"path": str(work["ft0"])}, {"path": str(target)}]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    return ["merge", tmp_path / "recipe.yml", out, "-q"], out


def check_refused(verb, work, target, tmp_path, mentions, outside=None, extra=()) -> str:
    args, out = command(verb, work, target, tmp_path)
    return refused([*args, *extra], mentions=mentions, inputs=list(work.values()), out=out, outside=outside)


# -- 1. names from inside an input, and links, stay inside the folder the user gave ---------------------------

def _index_to(where: str):
    def damage(d: Path, outside: Path) -> list[str]:
        write_index(d, **{T: where.format(outside=outside)})
        return [str(d / INDEX), "outside"]
    return damage


def _link(name: str, to: str):
    def damage(d: Path, outside: Path) -> list[str]:
        (d / name).unlink(missing_ok=True)
        (d / name).symlink_to(outside / to)
        return [name, "outside"]
    return damage


def _shard_link(d: Path, outside: Path) -> list[str]:
    write_index(d, **{T: "model-00002.safetensors"})
    (d / "model-00002.safetensors").symlink_to(outside / "x.safetensors")
    return ["model-00002.safetensors", "outside"]


ESCAPES = {
    "index-dotdot": _index_to("../elsewhere/x.safetensors"),
    "index-dotdot-inside-subfolder": _index_to("sub/../../elsewhere/x.safetensors"),
    "index-absolute": _index_to("{outside}/x.safetensors"),
    "index-backslash": _index_to("..\\elsewhere\\x.safetensors"),
    "index-drive": _index_to("C:x.safetensors"),
    "index-is-a-link": _link(INDEX, "secret.json"),
    "shard-is-a-link": _shard_link,
    "single-file-is-a-link": _link("model.safetensors", "x.safetensors"),
    "config-is-a-link": _link("config.json", "secret.json"),
}
ADAPTER_ESCAPES = {
    "adapter-weights-link": _link("adapter_model.safetensors", "x.safetensors"),
    "adapter-config-link": _link("adapter_config.json", "secret.json"),
}


@pytest.mark.parametrize("verb", ["merge", "inspect"])
@pytest.mark.parametrize("case", [*ESCAPES, *ADAPTER_ESCAPES])
def test_names_and_links_out_of_the_folder_are_refused(case, verb, work, outside, tmp_path):
    target = work["lora1"] if case in ADAPTER_ESCAPES else work["ft1"]
    mentions = {**ESCAPES, **ADAPTER_ESCAPES}[case](target, outside)
    check_refused(verb, work, target, tmp_path, mentions, outside=outside)


def test_pickle_index_escape_refused_even_with_allow_pickle(work, outside, tmp_path):
    """allow_pickle opts in to the folder's pickles, not to torch.load on a file an index points at elsewhere."""
    d = work["ft1"]
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {T: "../elsewhere/pytorch_model.bin"}}))
    check_refused("merge", work, d, tmp_path, ["pytorch_model.bin.index.json", "outside"], outside=outside,
                  extra=["--allow-pickle"])


def test_shards_in_a_subfolder_inside_are_read(work, tmp_path):
    d = work["ft1"]
    (d / "sub").mkdir()
    write_index(d)
    (d / "model.safetensors").rename(d / "sub" / "model.safetensors")
    edit_json(d / INDEX, lambda i: i.__setitem__("weight_map", dict.fromkeys(i["weight_map"], "sub/model.safetensors")))
    assert json.loads(merged_ok(["inspect", d, "--json"]))["shards"] == ["sub/model.safetensors"]


def test_copied_model_file_linking_outside_is_refused(work, outside, tmp_path):
    """The tokenizer files beside the base are copied into the output: a link must not carry a file in."""
    (work["base"] / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    check_refused("merge", work, work["ft1"], tmp_path, ["tokenizer.json", "outside"], outside=outside)


def test_hub_cache_snapshot_link_out_of_the_repository_is_refused(work, outside, tmp_path):
    snap = tmp_path / "hub" / "models--x" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "blobs").mkdir()
    shutil.copy(work["ft1"] / "config.json", snap)
    (snap / "model.safetensors").symlink_to("../../../../elsewhere/x.safetensors")
    work["hub"] = snap.parents[2]
    check_refused("merge", work, snap, tmp_path, ["model.safetensors", "outside"], outside=outside)


# -- 2. no pickle without allow_pickle, whatever the index is called -----------------------------------------

@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pickle"])
def test_safetensors_index_naming_a_pickle_shard_needs_allow_pickle(suffix, work, tmp_path):
    d = work["ft1"]
    torch.save({T: load_file(d / "model.safetensors")[T]}, d / f"extra{suffix}")
    write_index(d, **{T: f"extra{suffix}"})
    check_refused("merge", work, d, tmp_path, [f"extra{suffix}", "--allow-pickle"])
    check_refused("inspect", work, d, tmp_path, [f"extra{suffix}", "--allow-pickle"])


def test_pickle_shard_loads_with_allow_pickle(work, tmp_path):
    """With the opt-in the shard is read (weights_only=True) and the index still has to agree with it."""
    d = work["ft1"]
    tensors = load_file(d / "model.safetensors")
    torch.save({T: tensors[T]}, d / "extra.bin")
    write_index(d, **{T: "extra.bin"})
    check_refused("merge", work, d, tmp_path, [T, "two shards"], extra=["--allow-pickle"])
    write_raw(d / "model.safetensors", *_without(d / "model.safetensors", T))
    args, _ = command("merge", work, d, tmp_path)
    result = CliRunner().invoke(app, [*map(str, args), "--allow-pickle"])
    assert result.exit_code == 0, result.output


def _without(path: Path, name: str) -> tuple[dict, bytes]:
    """The header and data of `path` with tensor `name` cut out (later offsets moved down)."""
    head, data = header(path)
    b, e = head.pop(name)["data_offsets"]
    for k, v in head.items():
        if k != "__metadata__" and v["data_offsets"][0] >= e:
            v["data_offsets"] = [x - (e - b) for x in v["data_offsets"]]
    return head, data[:b] + data[e:]


def test_pickle_that_is_not_a_state_dict(work, tmp_path):
    d = work["ft1"]
    torch.save([1, 2, 3], d / "extra.bin")
    write_index(d, **{T: "extra.bin"})
    check_refused("merge", work, d, tmp_path, ["extra.bin", "not a state dict"], extra=["--allow-pickle"])


def test_pickle_adapter_refused(work, tmp_path):
    d = work["lora1"]
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    for verb in ("merge", "inspect"):
        check_refused(verb, work, d, tmp_path, ["adapter_model.bin", "pickle"])


# -- 3. safetensors headers checked as the safetensors library checks them -----------------------------------

def _set(key, value):
    return lambda h: h[T].__setitem__(key, value)


def _overlap(h):
    h[T]["data_offsets"] = h["model.layers.0.mlp.gate_proj.weight"]["data_offsets"]


def _gap(h):
    h[T]["data_offsets"] = [x + 4 for x in h[T]["data_offsets"]]


HEADERS = {
    "header-is-a-list": (lambda h: [h], "not a JSON object"),
    "entry-is-a-string": (lambda h: h.__setitem__(T, "F32"), T),
    "nested-entry": (lambda h: h.__setitem__(T, {"inner": h[T]}), T),
    "unknown-dtype": (_set("dtype", "F9"), T),
    "dtype-not-a-string": (_set("dtype", ["F32"]), T),
    "negative-shape": (_set("shape", [-128, -64]), T),
    "float-shape": (_set("shape", [128.0, 64]), T),
    "bool-shape": (_set("shape", [True, 64]), T),
    "shape-not-a-list": (_set("shape", "128x64"), T),
    "offsets-three": (lambda h: h[T]["data_offsets"].append(0), T),
    "offsets-negative": (lambda h: h[T].__setitem__("data_offsets", [-8, h[T]["data_offsets"][1]]), T),
    "offsets-float": (lambda h: h[T].__setitem__("data_offsets", [float(x) for x in h[T]["data_offsets"]]), T),
    "offsets-reversed": (lambda h: h[T].__setitem__("data_offsets", h[T]["data_offsets"][::-1]), T),
    "shape-disagrees-with-bytes": (_set("shape", [129, 64]), T),
    "overlap": (_overlap, "overlaps"),
    "gap": (_gap, T),
    "metadata-value-not-string": (lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__"),
    "metadata-nested": (lambda h: h.__setitem__("__metadata__", {"format": {"pt": "x"}}), "__metadata__"),
    "metadata-list": (lambda h: h.__setitem__("__metadata__", ["pt"]), "__metadata__"),
    "metadata-empty-list": (lambda h: h.__setitem__("__metadata__", []), "__metadata__"),
}


@pytest.mark.parametrize("verb", ["merge", "inspect"])
@pytest.mark.parametrize("case", HEADERS)
def test_bad_safetensors_header(case, verb, work, tmp_path):
    f = work["ft1"] / "model.safetensors"
    edit, mention = HEADERS[case]
    head, data = header(f)
    write_raw(f, edit(head) or head, data)
    check_refused(verb, work, work["ft1"], tmp_path, [str(f), mention])


@pytest.mark.parametrize("case", ["trailing-bytes", "not-utf8", "utf16-json"])
def test_bad_safetensors_bytes(case, work, tmp_path):
    f = work["ft1"] / "model.safetensors"
    head, data = header(f)
    if case == "trailing-bytes":
        write_raw(f, head, data + b"\0" * 16)
    elif case == "not-utf8":
        write_raw(f, json.dumps(head).replace(T, "model.\xff").encode("latin-1"), data)
    else:
        write_raw(f, json.dumps(head).encode("utf-16"), data)
    check_refused("merge", work, work["ft1"], tmp_path, str(f))


def test_adapter_weights_with_bad_header(work, tmp_path):
    f = work["lora1"] / "adapter_model.safetensors"
    head, data = header(f)
    name = next(k for k in head if k != "__metadata__")
    head[name]["shape"] = [-4, 64]
    write_raw(f, head, data)
    check_refused("merge", work, work["lora1"], tmp_path, [str(f), name])


# FIFOs would block the reader forever: each is refused before it is opened
FIFOS = {
    "model.safetensors": "ft1", "config.json": "ft1", INDEX: "ft1",
    "adapter_config.json": "lora1", "adapter_model.safetensors": "lora1",
}


@pytest.mark.parametrize("verb", ["merge", "inspect"])
@pytest.mark.parametrize("name", FIFOS)
def test_fifo_is_refused_not_read(name, verb, work, tmp_path):
    d = work[FIFOS[name]]
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name)
    check_refused(verb, work, d, tmp_path, [name, "not a regular file"])


# -- 4. an index and its shards agree -------------------------------------------------------------------------

def _first_two(d: Path) -> tuple[dict, list[str]]:
    index = json.loads((d / INDEX).read_text())
    return index, sorted(set(index["weight_map"].values()))


def _moved(d: Path) -> str:
    index, shards = _first_two(d)
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (d / INDEX).write_text(json.dumps(index))
    return name


INDEX_CASES = {
    "weight-map-is-a-list": lambda d: edit_json(d / INDEX, lambda i: i.__setitem__("weight_map", [1])) or "weight_map",
    "weight-map-value-int": lambda d: edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__(T, 3)) or T,
    "weight-map-value-null": lambda d: edit_json(d / INDEX, lambda i: i["weight_map"].__setitem__(T, None)) or T,
    "no-weight-map": lambda d: edit_json(d / INDEX, lambda i: i.__delitem__("weight_map")) or "weight_map",
    "index-is-a-list": lambda d: edit_json(d / INDEX, lambda i: [i]) or "not a JSON object",
    "tensor-in-no-shard": lambda d: edit_json(
        d / INDEX, lambda i: i["weight_map"].__setitem__("model.ghost.weight", _first_two(d)[1][0])) or "model.ghost",
    "tensor-in-another-shard": _moved,
    "shard-tensor-not-listed": lambda d: edit_json(d / INDEX, lambda i: i["weight_map"].__delitem__(T)) or T,
    "listed-shard-missing": lambda d: edit_json(
        d / INDEX, lambda i: i["weight_map"].__setitem__(T, "model-99999.safetensors")) or "model-99999",
}


@pytest.mark.parametrize("verb", ["merge", "inspect"])
@pytest.mark.parametrize("case", INDEX_CASES)
def test_index_and_shards_disagree(case, verb, work, tmp_path):
    d = work["sharded"]
    mention = INDEX_CASES[case](d)
    check_refused(verb, work, d, tmp_path, [str(d / INDEX), mention])


# -- 5. adapter config checked against the factors it describes ---------------------------------------------

ADAPTER_CONFIGS = {
    "config-is-a-list": (lambda c: [c], "not a JSON object"),
    "r-string": ({"r": "sixteen"}, "r must be"),
    "r-zero": ({"r": 0}, "r must be"),
    "r-negative": ({"r": -1}, "r must be"),
    "r-bool": ({"r": True}, "r must be"),
    "r-infinite": ({"r": float("inf")}, "r must be"),
    "r-float": ({"r": 4.0}, "r must be"),
    "r-far-above-the-factors": ({"r": 64}, MODULE),
    "alpha-string": ({"lora_alpha": "eight"}, "lora_alpha"),
    "alpha-nan": ({"lora_alpha": float("nan")}, "lora_alpha"),
    "alpha-infinite": ({"lora_alpha": float("inf")}, "lora_alpha"),
    "alpha-bool": ({"lora_alpha": True}, "lora_alpha"),
    "rank-pattern-list": ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    "rank-pattern-bad-regex": ({"rank_pattern": {"q_proj(": 4}}, "q_proj("),
    "rank-pattern-zero": ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    "rank-pattern-string": ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern"),
    "rank-pattern-wrong-rank": ({"rank_pattern": {"q_proj": 8}}, MODULE),
    "alpha-pattern-bad-regex": ({"alpha_pattern": {"[v_proj": 4}}, "[v_proj"),
    "alpha-pattern-negative": ({"alpha_pattern": {"v_proj": -1}}, "alpha_pattern"),
    "use-dora": ({"use_dora": True}, "DoRA"),
    "use-dora-string": ({"use_dora": "yes"}, "use_dora"),
    "use-rslora-string": ({"use_rslora": "yes"}, "use_rslora"),
    "fan-in-fan-out-int": ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
    "target-modules-int": ({"target_modules": 5}, "target_modules"),
    "target-modules-mixed": ({"target_modules": ["q_proj", 1]}, "target_modules"),
    "peft-type": ({"peft_type": "IA3"}, "IA3"),
}


@pytest.mark.parametrize("verb", ["merge", "inspect"])
@pytest.mark.parametrize("case", ADAPTER_CONFIGS)
def test_bad_adapter_config(case, verb, work, tmp_path):
    cfg = work["lora1"] / "adapter_config.json"
    edit, mention = ADAPTER_CONFIGS[case]
    edit_json(cfg, edit if callable(edit) else lambda c: c.update(edit))
    check_refused(verb, work, work["lora1"], tmp_path, [str(work["lora1"]), mention])


def test_adapter_config_not_utf8(work, tmp_path):
    cfg = work["lora1"] / "adapter_config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b'"none"', b'"\xff"'))
    check_refused("merge", work, work["lora1"], tmp_path, [str(cfg), "UTF-8"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_factor_not_finite(bad, work, tmp_path):
    f = work["lora1"] / "adapter_model.safetensors"
    head, data = header(f)
    name = f"base_model.model.{MODULE}.lora_B.weight"
    data, at = bytearray(data), head[name]["data_offsets"][0]
    data[at:at + 4] = struct.pack("<f", bad)
    write_raw(f, head, bytes(data))
    check_refused("merge", work, work["lora1"], tmp_path, [str(f), MODULE, "NaN or inf"])


# -- 6. a checkpoint's config.json ------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["merge", "inspect"])
@pytest.mark.parametrize("content, mention", [(b"[1, 2]", "not a JSON object"), (b"3", "not a JSON object"),
                                              (b'{"model_type": "\xff"}', "UTF-8"), (b"{", "not valid JSON")])
def test_bad_config_json(content, mention, verb, work, tmp_path):
    cfg = work["ft1"] / "config.json"
    cfg.write_bytes(content)
    check_refused(verb, work, work["ft1"], tmp_path, [str(cfg), mention])


# -- 7. GGUF ------------------------------------------------------------------------------------------------------

def tiny_gguf(path: Path, drop: str | None = None, merges=("a b",)) -> Path:
    """A one-layer Llama GGUF of 8-wide tensors with a 4-token BPE vocabulary, written with gguf's writer."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "c"])
    w.add_token_types([1] * 4)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    shapes = {"token_embd": (4, 8), "output_norm": (8,), "output": (4, 8), "blk.0.attn_norm": (8,),
              "blk.0.ffn_norm": (8,), "blk.0.attn_q": (8, 8), "blk.0.attn_k": (8, 8), "blk.0.attn_v": (8, 8),
              "blk.0.attn_output": (8, 8), "blk.0.ffn_gate": (16, 8), "blk.0.ffn_up": (16, 8),
              "blk.0.ffn_down": (8, 16)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if name != drop:
            w.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    pytest.importorskip("gguf")
    return tiny_gguf(tmp_path / "tiny.gguf")


def _truncate(f: Path, keep: float) -> None:
    f.write_bytes(f.read_bytes()[:int(f.stat().st_size * keep)])


@pytest.mark.parametrize("verb", ["import-gguf", "inspect"])
@pytest.mark.parametrize("keep", [0.95, 0.5, 0.05])
def test_truncated_gguf(keep, verb, gguf_file, tmp_path):
    _truncate(gguf_file, keep)
    out = tmp_path / "imported" if verb == "import-gguf" else None
    refused([verb, gguf_file, *([out] if out else [])], mentions=[str(gguf_file), "GGUF"], inputs=[gguf_file],
            out=out)


@pytest.mark.parametrize("verb", ["import-gguf", "inspect"])
def test_fifo_gguf(verb, tmp_path):
    f = tmp_path / "model.gguf"
    os.mkfifo(f)
    out = tmp_path / "imported" if verb == "import-gguf" else None
    refused([verb, f, *([out] if out else [])], mentions=[str(f), "not a regular file"], inputs=[], out=out)


@pytest.mark.parametrize("damage, mention", [({"drop": "blk.0.attn_q"}, "self_attn.q_proj"),
                                             ({"merges": ("a x y",)}, "transformers cannot load")])
def test_gguf_transformers_cannot_use(damage, mention, tmp_path):
    """Files gguf's reader accepts but transformers cannot turn into the model they describe."""
    pytest.importorskip("gguf")
    f = tiny_gguf(tmp_path / "odd.gguf", **damage)
    out = tmp_path / "imported"
    refused(["import-gguf", f, out], mentions=[str(f), mention], inputs=[f], out=out)


# -- inputs that must keep working ------------------------------------------------------------------------------

def merged_ok(args: list, outside: Path | None = None) -> str:
    """Run a command that should succeed; no planted file is opened and no marker reaches its output."""
    with recording_opens() as opened:
        result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert SECRET.decode() not in result.output
    if outside is not None:
        assert not [p for p in opened if p and p.startswith(str(outside.resolve()))]
    return result.stdout


def test_sharded_checkpoint_merges_and_inspects(work, outside, tmp_path):
    d = work["sharded"]
    shards = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
    assert len(shards) > 1
    info = json.loads(merged_ok(["inspect", d, "--json"]))
    assert info["shards"] == shards
    args, out = command("merge", work, d, tmp_path)
    merged_ok(args, outside)
    assert all(SECRET not in f.read_bytes() for f in out.rglob("*") if f.is_file())


def test_hub_cache_snapshot_merges(work, outside, tmp_path):
    """from_pretrained's cache: snapshot files are relative links into the repository's blobs."""
    repo = tmp_path / "hub" / "models--x"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in ("config.json", "model.safetensors"):
        blob = hashlib.sha256((work["ft1"] / f).read_bytes()).hexdigest()
        shutil.copy(work["ft1"] / f, repo / "blobs" / blob)
        (snap / f).symlink_to(f"../../blobs/{blob}")
    args, out = command("merge", work, snap, tmp_path)
    merged_ok(args, outside)
    assert json.loads(merged_ok(["inspect", snap, "--json"]))["tensors"] > 0
    assert all(SECRET not in f.read_bytes() for f in out.rglob("*") if f.is_file())


def test_peft_adapters_still_merge_and_inspect(work, outside, tmp_path):
    args, out = command("merge", work, work["lora1"], tmp_path)
    merged_ok(args, outside)
    assert (out / "adapter_model.safetensors").is_file()
    info = json.loads(merged_ok(["inspect", work["lora1"], "--json"]))
    assert info["r"] == 4 and info["modules"] == 4


def test_rank_pattern_that_matches_the_factors_is_accepted(work, tmp_path):
    """r may differ from the factors' rank where rank_pattern gives the module its own."""
    edit_json(work["lora1"] / "adapter_config.json", lambda c: c.update(r=16, rank_pattern={"q_proj": 4, "v_proj": 4}))
    assert json.loads(merged_ok(["inspect", work["lora1"], "--json"]))["ranks"] == {"4": 4}


def test_tiny_gguf_imports(gguf_file, tmp_path):
    merged_ok(["import-gguf", gguf_file, tmp_path / "imported"])
    assert (tmp_path / "imported" / "model.safetensors").is_file()
