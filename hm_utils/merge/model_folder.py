"""Facts read from a transformers model folder without loading weights: architecture tensors, tokenizer.

``architecture_tensors`` builds the model class that ``config.json`` names on the meta
device, so it allocates no memory for weights, and returns the tensors a checkpoint of
that configuration stores. ``tokenizer_digest`` reduces the tokenizer files to a hash of
the token-to-id mapping, which is what must agree between merged models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Files that define a tokenizer's vocabulary, in the order they are used.
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
BPE_VOCABULARY = ("vocab.json", "merges.txt")
ADDED_TOKENS = "added_tokens.json"


@dataclasses.dataclass(frozen=True)
class ArchitectureTensors:
    """Tensors of one architecture and configuration, as a checkpoint stores them.

    ``shapes`` maps every stored tensor name to its shape. ``tied_copies`` names tensors
    that share storage with another one (the output head of a model with
    ``tie_word_embeddings: true``): transformers does not save them and ties them again on load.
    """

    architecture: str
    shapes: dict[str, tuple[int, ...]]
    tied_copies: frozenset[str]


def architecture_tensors(folder: Path, model_config: dict[str, Any]) -> ArchitectureTensors | None:
    """Build the architecture of ``folder/config.json`` on the meta device and list its tensors.

    Returns ``None``, with a warning, when transformers has no class of that name or cannot
    build it (for example a model that needs remote code). The inputs are then compared
    with each other only.
    """
    import transformers

    architectures = model_config.get("architectures") or []
    name = architectures[0] if architectures else None
    model_class = getattr(transformers, name, None) if name else None
    if model_class is None:
        logger.warning("transformers has no architecture %r (config.json of %s); tensors are compared between inputs only", name, folder)
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = model_class(config)
    except Exception as error:  # any failure here only disables this check
        logger.warning("cannot build %s from %s (%s: %s); tensors are compared between inputs only", name, folder, type(error).__name__, error)
        return None

    state = model.state_dict()
    # named_parameters and named_buffers list a shared tensor once, under its first name.
    unique = {tensor_name for tensor_name, _ in model.named_parameters()}
    unique |= {tensor_name for tensor_name, _ in model.named_buffers()}
    shapes = {tensor_name: tuple(tensor.shape) for tensor_name, tensor in state.items() if tensor_name in unique}
    return ArchitectureTensors(name, shapes, frozenset(state) - unique)


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()


def tokenizer_digest(folder: Path) -> str | None:
    """Return a sha256 of the tokenizer's token-to-id mapping, or ``None`` when the folder has no tokenizer.

    From ``tokenizer.json`` the ``model`` section (vocabulary, merges) and the added tokens
    count. Truncation, padding and chat templates do not change which embedding row a
    token uses, so they are left out. Without ``tokenizer.json`` the bytes of
    ``tokenizer.model`` or of ``vocab.json`` and ``merges.txt`` count, with ``added_tokens.json``.
    """
    folder = Path(folder)
    added = folder / ADDED_TOKENS
    added_bytes = _canonical_json(json.loads(added.read_text(encoding="utf-8"))) if added.is_file() else b""

    path = folder / TOKENIZER_JSON
    if path.is_file():
        document = json.loads(path.read_text(encoding="utf-8"))
        added_tokens = [(token.get("id"), token.get("content")) for token in document.get("added_tokens") or []]
        return _sha256(b"tokenizer.json", _canonical_json(document.get("model")), _canonical_json(added_tokens), added_bytes)
    path = folder / SENTENCEPIECE_MODEL
    if path.is_file():
        return _sha256(b"tokenizer.model", path.read_bytes(), added_bytes)
    vocabulary, merges = (folder / name for name in BPE_VOCABULARY)
    if vocabulary.is_file():
        merges_bytes = merges.read_bytes() if merges.is_file() else b""
        return _sha256(b"vocab.json", _canonical_json(json.loads(vocabulary.read_text(encoding="utf-8"))), merges_bytes, added_bytes)
    return None


def tokenizer_difference(folder: Path, reference: Path) -> str:
    """Describe how the ``tokenizer.json`` vocabularies of two folders differ, in a few words."""
    try:
        ours = json.loads((Path(folder) / TOKENIZER_JSON).read_text(encoding="utf-8"))
        theirs = json.loads((Path(reference) / TOKENIZER_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "their tokenizer files differ"
    vocabulary = (ours.get("model") or {}).get("vocab")
    reference_vocabulary = (theirs.get("model") or {}).get("vocab")
    if isinstance(vocabulary, dict) and isinstance(reference_vocabulary, dict):
        changed = sum(1 for token, index in vocabulary.items() if reference_vocabulary.get(token) != index)
        changed += len(reference_vocabulary.keys() - vocabulary.keys())
        if changed:
            return f"{changed} vocabulary entries differ ({len(vocabulary)} and {len(reference_vocabulary)} tokens)"
    added = {(token.get("id"), token.get("content")) for token in ours.get("added_tokens") or []}
    reference_added = {(token.get("id"), token.get("content")) for token in theirs.get("added_tokens") or []}
    if added != reference_added:
        return f"added tokens differ: {sorted(added ^ reference_added, key=str)[:3]}"
    return "their merges or tokenizer model settings differ"
