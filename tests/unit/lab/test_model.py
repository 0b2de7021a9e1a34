"""lab/model/make_model.py: the lab's tiny Llama in the Hugging Face layout, byte for byte reproducible."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
from labscripts import REPO, load_script


mm = load_script("lab_make_model", REPO / "lab" / "model" / "make_model.py")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    summary = mm.build_model(tmp_path_factory.mktemp("mirror"))
    return Path(summary["path"]), summary


def read_header(path: Path) -> tuple[dict, int, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), length, raw


def bf16_values(data: bytes) -> list[float]:
    return [struct.unpack("<f", b"\0\0" + data[i:i + 2])[0] for i in range(0, len(data), 2)]


def test_same_seed_gives_identical_bytes(tmp_path):
    a = mm.build_model(tmp_path / "a")
    b = mm.build_model(tmp_path / "b")
    assert a["revision"] == b["revision"]
    for entry in json.loads(Path(a["manifest"]).read_text())["files"]:
        assert (Path(a["path"]) / entry["path"]).read_bytes() == (Path(b["path"]) / entry["path"]).read_bytes()
    assert Path(a["manifest"]).read_bytes() == Path(b["manifest"]).read_bytes()


def test_salt_and_seed_make_other_releases(tmp_path):
    base = mm.build_model(tmp_path)
    salted = mm.build_model(tmp_path, revision_salt="B")
    seeded = mm.build_model(tmp_path, seed=1)
    assert len({base["revision"], salted["revision"], seeded["revision"]}) == 3
    shard = "model-00001-of-00003.safetensors"
    assert (Path(base["path"]) / shard).read_bytes() != (Path(salted["path"]) / shard).read_bytes()
    # Same architecture and tokenizer: only the weights differ.
    assert (Path(base["path"]) / "config.json").read_bytes() == (Path(salted["path"]) / "config.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / mm.DEFAULT_NAME).iterdir() if not p.name.startswith(".")) == \
        sorted([base["revision"], salted["revision"], seeded["revision"]])


def test_manifest_lists_every_file_with_size_and_digest(model):
    path, summary = model
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema"] == 1
    assert manifest["name"] == mm.DEFAULT_NAME
    assert manifest["revision"] == summary["revision"] == path.name
    assert len(manifest["revision"]) == 40 and int(manifest["revision"], 16) >= 0
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {p.name for p in path.iterdir()} - {"manifest.json"}
    for entry in manifest["files"]:
        data = (path / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert mm.revision_of(manifest["files"]) == manifest["revision"]


def test_index_maps_every_tensor_to_the_shard_holding_it(model):
    path, _summary = model
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*.safetensors"))
    assert [s.name for s in shards] == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    seen = {}
    total = 0
    for shard in shards:
        header, _length, _raw = read_header(shard)
        header.pop("__metadata__")
        for name, info in header.items():
            seen[name] = shard.name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total


def test_safetensors_headers_parse_and_match_the_config(model):
    path, _summary = model
    config = json.loads((path / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    expected = {
        "model.embed_tokens.weight": [config["vocab_size"], hidden],
        "lm_head.weight": [config["vocab_size"], hidden],
        "model.layers.1.self_attn.q_proj.weight": [heads * head_dim, hidden],
        "model.layers.1.self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
        "model.layers.0.mlp.down_proj.weight": [hidden, config["intermediate_size"]],
        "model.norm.weight": [hidden],
    }
    found = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        header, length, raw = read_header(shard)
        assert length % 8 == 0
        assert header.pop("__metadata__") == {"format": "pt"}
        spans = sorted(info["data_offsets"] for info in header.values())
        assert spans[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "tensors must be back to back"
        assert 8 + length + spans[-1][1] == len(raw)
        for name, info in header.items():
            assert info["dtype"] == "BF16"
            assert info["data_offsets"][1] - info["data_offsets"][0] == math.prod(info["shape"]) * 2
            found[name] = info["shape"]
    assert len(found) == 2 + 9 * config["num_hidden_layers"] + 1
    for name, shape in expected.items():
        assert found[name] == shape


def test_weights_are_small_finite_bf16_and_norms_are_one(model):
    path, _summary = model
    header, length, raw = read_header(path / "model-00001-of-00003.safetensors")
    base = 8 + length
    q = header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"]
    values = bf16_values(raw[base + q[0]:base + q[1]])
    assert all(math.isfinite(v) and 2**-7 <= abs(v) < 2**-3 for v in values)
    assert len({v > 0 for v in values}) == 2
    norm = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    assert set(bf16_values(raw[base + norm[0]:base + norm[1]])) == {1.0}


def test_tokenizer_is_byte_level_with_the_config_special_tokens(model):
    path, _summary = model
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and tokenizer["model"]["merges"] == []
    assert sorted(tokenizer["model"]["vocab"].values()) == list(range(256))
    assert tokenizer["model"]["vocab"]["A"] == ord("A")
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert added["<s>"] == config["bos_token_id"] and added["</s>"] == config["eos_token_id"]
    assert generation["eos_token_id"] == [added["</s>"], added["<|im_end|>"]]
    assert config["vocab_size"] == 256 + len(added)
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tokenizer["post_processor"]["single"][0] == {"SpecialToken": {"id": "<s>", "type_id": 0}}


def test_repeat_build_is_cached_until_a_file_changes(tmp_path):
    first = mm.build_model(tmp_path)
    assert first["built"] is True
    again = mm.build_model(tmp_path)
    assert again["built"] is False and again["revision"] == first["revision"]
    shard = Path(first["path"]) / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    repaired = mm.build_model(tmp_path)
    assert repaired["built"] is True and repaired["revision"] == first["revision"]
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == next(
        f["sha256"] for f in json.loads(Path(first["manifest"]).read_text())["files"] if f["path"] == shard.name)
    assert mm.build_model(tmp_path, force=True)["built"] is True
    assert not [p for p in (tmp_path / mm.DEFAULT_NAME).iterdir() if p.name.startswith((".staging", ".trash"))]


def test_target_size_widens_the_mlp_and_shards_stay_balanced():
    dims = {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "heads": 4, "kv_heads": 2,
            "max_position_embeddings": 2048}
    wide = mm.widen_for_target(dims, 2048)
    total = sum(mm.nbytes(s) for _name, s in mm.tensor_specs(wide))
    assert 2048 << 20 <= total < (2048 << 20) + 3 * 64 * 2 * 2
    sizes = [sum(mm.nbytes(s) for _name, s in group) for group in mm.plan_shards(mm.tensor_specs(wide), 3)]
    assert max(sizes) / min(sizes) < 1.1


@pytest.mark.parametrize("kwargs, message", [
    ({"shards": 0}, "--shards"),
    ({"shards": 99}, "--shards"),
    ({"heads": 3}, "multiple"),
    ({"name": "a/b"}, "one path component"),
])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mm.build_model(tmp_path, **kwargs)


def test_cli_prints_the_summary(tmp_path, capsys):
    assert mm.main(["--root", str(tmp_path), "--shards", "2", "--revision-salt", "C"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 8 and Path(summary["manifest"]).is_file()
    assert mm.main(["--root", str(tmp_path), "--heads", "5"]) == 1
    assert "multiple" in capsys.readouterr().err
