"""Build the lab's model: a tiny Llama-architecture transformer in the Hugging Face layout.

    make_model.py --root DIR [--name llmfleet-tiny] [--seed 0] [--revision-salt B] [--shards 3]
                  [--hidden-size 64] [--intermediate-size 128] [--layers 2] [--heads 4]
                  [--kv-heads 2] [--target-mib N] [--force]

writes DIR/<name>/<revision>/ with config.json, generation_config.json, a byte-level tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json), several safetensors shards, their
model.safetensors.index.json, and manifest.json ({schema, name, revision, files: [{path, size,
sha256}]}), then prints a JSON summary. No weights come from any hub: they are made here.

Deterministic: the same options give the same bytes, so the same sha256 and the same 40-hex
revision (derived from the files' digests). `--revision-salt` changes the weights, which makes the
"release B/C" variants rollout tests switch between. `--target-mib` widens the MLP until the
weights reach that size, for staging benchmarks with GB-sized shards.

The weights are small random numbers with one deliberate structure, so that a CPU engine running
this model answers with printable text instead of arbitrary bytes: residual dimension 0 carries a
constant (set by the embedding, never written by attention or MLP outputs), and lm_head reads it
as a large negative logit for non-printable bytes and the special tokens. This is plain Llama
arithmetic; engines need nothing special to run it.

Stdlib only (runs with any Python >= 3.9 on the control node).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

SCHEMA = 1
DEFAULT_NAME = "llmfleet-tiny"
ARCHITECTURE = "LlamaForCausalLM"

# Token ids: the 256 byte values first (id == byte), then the special tokens.
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(256, 256 + len(SPECIAL_TOKENS))
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# ChatML. The reference engine renders exactly this template (it carries no Jinja interpreter).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Weights are bfloat16, the dtype of most released checkpoints.
DTYPE = "BF16"
ITEM = 2
BLOCK = 4 << 20
# bf16 bit layout (little endian: low byte first): high byte = sign + exponent bits 7..1, low byte
# = exponent bit 0 + mantissa. Keeping the sign and two exponent bits random and fixing the rest to
# exponent 120..123 gives magnitudes in [2**-7, 2**-3): small random weights, never inf or NaN.
_HIGH_BYTE = bytes(((b & 0x81) | 0x3C) for b in range(256))
BIAS_DIM = 0
BIAS_VALUE = 1.0
PENALTY = -32.0
EOS_PENALTY = -2.0
PRINTABLE = set(range(0x20, 0x7F)) | {0x0A}


def bf16(value: float) -> bytes:
    """bf16 little-endian bytes of a value exactly representable in bf16."""
    return struct.pack("<f", value)[2:4]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the others to code points
    from 256 up, so every byte is one visible character in tokenizer.json."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# ---------------------------------------------------------------- the files' contents


def model_config(dims: dict) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": dims["hidden_size"],
        "intermediate_size": dims["intermediate_size"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "head_dim": dims["hidden_size"] // dims["heads"],
        "hidden_act": "silu",
        "max_position_embeddings": dims["max_position_embeddings"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def generation_config() -> dict:
    return {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, IM_END_ID],
        "pad_token_id": PAD_ID,
        "do_sample": False,
    }


def tokenizer_json() -> dict:
    """Hugging Face `tokenizers` format: byte-level BPE without merges (one token per byte), a
    BOS post-processor like Llama's, and the special tokens as added tokens."""
    alphabet = bytes_to_unicode()
    added = [
        {"id": 256 + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, tok in enumerate(SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {alphabet[b]: b for b in range(256)},
            "merges": [],
        },
    }


def tokenizer_config(max_positions: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(256 + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    }


def special_tokens_map() -> dict:
    return {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}


def tensor_specs(dims: dict) -> list[tuple[str, list[int]]]:
    """Tensor names and shapes of LlamaForCausalLM, in the order HF checkpoints shard them."""
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    head_dim = hidden // dims["heads"]
    q_out, kv_out = dims["heads"] * head_dim, dims["kv_heads"] * head_dim
    specs = [("model.embed_tokens.weight", [VOCAB_SIZE, hidden])]
    for layer in range(dims["layers"]):
        p = f"model.layers.{layer}."
        specs += [
            (p + "input_layernorm.weight", [hidden]),
            (p + "self_attn.q_proj.weight", [q_out, hidden]),
            (p + "self_attn.k_proj.weight", [kv_out, hidden]),
            (p + "self_attn.v_proj.weight", [kv_out, hidden]),
            (p + "self_attn.o_proj.weight", [hidden, q_out]),
            (p + "post_attention_layernorm.weight", [hidden]),
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
        ]
    specs += [("model.norm.weight", [hidden]), ("lm_head.weight", [VOCAB_SIZE, hidden])]
    return specs


def nbytes(shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * ITEM


def tensor_patches(name: str, shape: list[int]) -> list[tuple[int, bytes]]:
    """(byte offset, bytes) overrides of the random weights: the printable-text structure."""
    if name == "model.embed_tokens.weight":
        row = shape[1] * ITEM
        return [(v * row + BIAS_DIM * ITEM, bf16(BIAS_VALUE)) for v in range(shape[0])]
    if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
        # Row BIAS_DIM (the output feature) is zero: the blocks never write the constant dimension.
        return [(BIAS_DIM * shape[1] * ITEM, bytes(shape[1] * ITEM))]
    if name == "lm_head.weight":
        row = shape[1] * ITEM
        patches = []
        for v in range(shape[0]):
            if v < 256 and v in PRINTABLE:
                value = 0.0
            elif v in (EOS_ID, IM_END_ID):
                value = EOS_PENALTY
            else:
                value = PENALTY
            patches.append((v * row + BIAS_DIM * ITEM, bf16(value)))
        return patches
    return []


def tensor_chunks(key: bytes, name: str, shape: list[int]):
    """The tensor's bytes, in chunks of at most BLOCK.

    Norm weights are ones (the usual initialisation). Other tensors are random bf16 from SHAKE-256
    keyed by seed, salt and tensor name; beyond the first BLOCK, each block is the first one
    rotated by a key-derived even offset, so GB-sized tensors cost a memory copy per block instead
    of a hash pass, and are still incompressible for block-level compressors (lz4 on ZFS).
    """
    size = nbytes(shape)
    if name.endswith("norm.weight"):
        yield bf16(1.0) * (size // ITEM)
        return
    first = bytearray(hashlib.shake_256(key + b"\0" + name.encode()).digest(min(size, BLOCK)))
    first[1::2] = first[1::2].translate(_HIGH_BYTE)
    first = bytes(first)
    patches = tensor_patches(name, shape)
    offset = 0
    index = 0
    while offset < size:
        length = min(BLOCK, size - offset)
        if index == 0:
            chunk = bytearray(first[:length])
        else:
            digest = hashlib.sha256(key + b"\0" + name.encode() + b"\0" + index.to_bytes(8, "little")).digest()
            turn = 2 * (int.from_bytes(digest[:8], "little") % (len(first) // 2))
            chunk = bytearray((first[turn:] + first[:turn])[:length])
        for at, data in patches:
            lo, hi = max(at, offset), min(at + len(data), offset + length)
            if lo < hi:
                chunk[lo - offset:hi - offset] = data[lo - at:hi - at]
        yield bytes(chunk)
        offset += length
        index += 1


def plan_shards(specs: list[tuple[str, list[int]]], shards: int) -> list[list[tuple[str, list[int]]]]:
    """Split the tensors, in order, into `shards` contiguous groups of about equal size."""
    if shards < 1 or shards > len(specs):
        raise ValueError(f"--shards must be between 1 and {len(specs)} (the number of tensors)")
    total = sum(nbytes(shape) for _name, shape in specs)
    groups: list[list] = [[]]
    done = 0
    for i, spec in enumerate(specs):
        left_tensors = len(specs) - i
        left_groups = shards - len(groups)
        if groups[-1] and left_groups and (done >= total * len(groups) / shards or left_tensors == left_groups):
            groups.append([])
        groups[-1].append(spec)
        done += nbytes(spec[1])
    return groups


def safetensors_header(group: list[tuple[str, list[int]]]) -> bytes:
    """safetensors: u64 little-endian header length, then a JSON header (padded with spaces to a
    multiple of 8 like the reference writer), then the tensors' raw bytes back to back."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in group:
        size = nbytes(shape)
        header[name] = {"dtype": DTYPE, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def revision_of(files: list[dict]) -> str:
    """40-hex release revision from the files' paths, sizes and digests (like a git commit id)."""
    canonical = json.dumps(sorted((f["path"], f["size"], f["sha256"]) for f in files), separators=(",", ":"))
    return hashlib.sha1(b"llmfleet-release\0" + canonical.encode()).hexdigest()


def widen_for_target(dims: dict, target_mib: int) -> dict:
    """Raise intermediate_size until the weights reach target_mib (the MLP dominates the size)."""
    dims = dict(dims)
    fixed = sum(nbytes(s) for n, s in tensor_specs({**dims, "intermediate_size": 0}))
    per_unit = 3 * dims["hidden_size"] * ITEM * dims["layers"]
    want = max(dims["intermediate_size"], -(-(target_mib * (1 << 20) - fixed) // per_unit))
    dims["intermediate_size"] = want
    return dims


# ---------------------------------------------------------------- writing


def _write_file(directory: Path, rel: str, chunks) -> dict:
    digest = hashlib.sha256()
    size = 0
    with open(directory / rel, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return {"path": rel, "size": size, "sha256": digest.hexdigest()}


def _shard_chunks(key: bytes, group):
    yield safetensors_header(group)
    for name, shape in group:
        yield from tensor_chunks(key, name, shape)


def options_digest(name: str, seed: int, salt: str, shards: int, dims: dict) -> str:
    source = Path(__file__).read_bytes()
    blob = json.dumps([name, seed, salt, shards, dims, hashlib.sha256(source).hexdigest()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_model(root, name: str = DEFAULT_NAME, seed: int = 0, revision_salt: str = "", shards: int = 3,
                hidden_size: int = 64, intermediate_size: int = 128, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, max_position_embeddings: int = 2048, target_mib: int = 0,
                force: bool = False) -> dict:
    """Write the model under root/name/<revision>/ and return a summary (also the CLI's output).

    A finished build is remembered by its options (root/name/.builds/<digest>): asking again for the
    same model costs a few stat() calls unless `force` or a file went missing or changed size.
    """
    if "/" in name or name.startswith(".") or not name:
        raise ValueError(f"model name {name!r} must be one path component (no '/', not hidden)")
    if hidden_size % heads or heads % kv_heads:
        raise ValueError("hidden_size must be a multiple of heads, and heads a multiple of kv_heads")
    if (hidden_size // heads) % 2:
        raise ValueError("head_dim (hidden_size / heads) must be even for rotary embeddings")
    dims = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "layers": layers,
            "heads": heads, "kv_heads": kv_heads, "max_position_embeddings": max_position_embeddings}
    if target_mib:
        dims = widen_for_target(dims, target_mib)
    model_root = Path(root) / name
    builds = model_root / ".builds"
    marker = builds / options_digest(name, seed, revision_salt, shards, dims)
    if not force and marker.is_file():
        revision = marker.read_text().strip()
        cached = _summary_if_intact(model_root / revision)
        if cached:
            return {**cached, "built": False}

    specs = tensor_specs(dims)
    groups = plan_shards(specs, shards)
    key = f"llmfleet-tiny-weights\0{seed}\0{revision_salt}".encode()
    builds.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_root))
    try:
        files = []
        weight_map = {}
        for i, group in enumerate(groups, 1):
            rel = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            files.append(_write_file(staging, rel, _shard_chunks(key, group)))
            weight_map.update({tensor: rel for tensor, _shape in group})
        index = {"metadata": {"total_size": sum(nbytes(s) for _name, s in specs)}, "weight_map": weight_map}
        documents = {
            "config.json": model_config(dims),
            "generation_config.json": generation_config(),
            "model.safetensors.index.json": index,
            "special_tokens_map.json": special_tokens_map(),
            "tokenizer.json": tokenizer_json(),
            "tokenizer_config.json": tokenizer_config(max_position_embeddings),
        }
        for rel, doc in documents.items():
            files.append(_write_file(staging, rel, [dump_json(doc)]))
        files.sort(key=lambda f: f["path"])
        revision = revision_of(files)
        manifest = {"schema": SCHEMA, "name": name, "revision": revision, "files": files}
        (staging / "manifest.json").write_bytes(dump_json(manifest))
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)
        final = model_root / revision
        if final.exists():
            # Same revision means same content: replace whatever is there (it may be damaged).
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=model_root))
            final.rename(trash / revision)
            staging.rename(final)
            shutil.rmtree(trash)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    marker_tmp = marker.with_suffix(".tmp")
    marker_tmp.write_text(revision + "\n")
    os.replace(marker_tmp, marker)
    return {**_summary(final, manifest), "built": True}


def _summary(path: Path, manifest: dict) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {
        "name": manifest["name"],
        "revision": manifest["revision"],
        "path": str(path),
        "manifest": str(path / "manifest.json"),
        "files": len(manifest["files"]),
        "total_bytes": sum(f["size"] for f in manifest["files"]),
        "architecture": config["architectures"][0],
        "intermediate_size": config["intermediate_size"],
    }


def _summary_if_intact(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for entry in manifest["files"]:
            if (path / entry["path"]).stat().st_size != entry["size"]:
                return None
        return _summary(path, manifest)
    except (OSError, ValueError, KeyError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--root", required=True, help="mirror root; the model goes to ROOT/NAME/REVISION/")
    parser.add_argument("--name", default=DEFAULT_NAME)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--revision-salt", default="", help="changes the weights: release B/C variants")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--target-mib", type=int, default=0,
                        help="widen the MLP until the weights are about this many MiB (benchmarks)")
    parser.add_argument("--force", action="store_true", help="rebuild even if this model was built")
    args = parser.parse_args(argv)
    try:
        summary = build_model(
            args.root, name=args.name, seed=args.seed, revision_salt=args.revision_salt, shards=args.shards,
            hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, layers=args.layers,
            heads=args.heads, kv_heads=args.kv_heads, max_position_embeddings=args.max_position_embeddings,
            target_mib=args.target_mib, force=args.force)
    except (ValueError, OSError) as exc:
        print(f"make_model: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
