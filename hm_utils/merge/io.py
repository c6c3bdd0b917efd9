"""Checkpoint input and output: safetensors (single file or sharded) and PyTorch ``.bin``.

Reading goes through ``TensorReader``, which parses safetensors headers and copies each
tensor's bytes into fresh memory with ``os.pread``. Nothing stays memory-mapped, so the
resident set of a streaming merge is bounded by the tensors currently in use.

Writing goes through ``SafetensorsStreamWriter``, which writes the header first (names,
dtypes and shapes are known in advance) and then each tensor's bytes in order, so a merge
never keeps the whole output in memory. ``atomic_output_dir`` builds an output folder
under a temporary sibling name and renames it into place only after it is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# Files copied from the base model folder next to merged weights.
AUXILIARY_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)

DEFAULT_SHARD_BYTES = 5_000_000_000

_DTYPE_FROM_SAFETENSORS = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_FROM_DTYPE = {dtype: code for code, dtype in _DTYPE_FROM_SAFETENSORS.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Location and layout of one tensor inside a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def all_finite(tensor: torch.Tensor) -> bool:
    """Return whether every element is finite, in one summation pass unless the sum is not finite."""
    # NaN and infinity make the sum non-finite, so a finite sum proves all elements finite.
    # A non-finite sum can also come from overflow, and the elementwise test decides then.
    if torch.isfinite(tensor.sum()):
        return True
    return bool(torch.isfinite(tensor).all())


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """Return the JSON header of a safetensors file and the offset where tensor data starts."""
    path = Path(path)
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file: shorter than 8 bytes")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file: header size {header_size}")
        header = json.loads(handle.read(header_size))
    return header, 8 + header_size


def weight_files(path: str | Path) -> list[Path]:
    """List the weight files of a checkpoint folder (or a single weight file) in shard order.

    Safetensors wins over ``.bin`` when a folder has both. Raises ``FileNotFoundError``
    when the folder contains neither.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")

    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index_path = path / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return [path / name for name in dict.fromkeys(weight_map.values())]
        if (path / single_name).is_file():
            return [path / single_name]

    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(
        f"no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX} in {path}"
    )


def safetensors_index(path: str | Path) -> dict[str, TensorInfo]:
    """Map every tensor name of a safetensors checkpoint to its file, dtype, shape and byte range.

    Reads headers only. Raises ``ValueError`` for ``.bin`` checkpoints, an unknown dtype or
    a tensor name present in two shards.
    """
    index: dict[str, TensorInfo] = {}
    for file in weight_files(path):
        if file.suffix != ".safetensors":
            raise ValueError(f"{file} is not a safetensors file; streaming needs safetensors")
        header, data_start = read_safetensors_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPE_FROM_SAFETENSORS:
                raise ValueError(f"unsupported safetensors dtype {entry['dtype']} for {name} in {file}")
            if name in index:
                raise ValueError(f"tensor {name} appears in both {index[name].file} and {file}")
            start, end = entry["data_offsets"]
            index[name] = TensorInfo(
                file=file,
                dtype=_DTYPE_FROM_SAFETENSORS[entry["dtype"]],
                shape=tuple(entry["shape"]),
                start=data_start + start,
                end=data_start + end,
            )
    return index


class TensorReader:
    """Reads tensors of one safetensors checkpoint by name into fresh (unmapped) memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index = safetensors_index(self.path)
        self._handles: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self.index)

    def read(self, name: str) -> torch.Tensor:
        """Return tensor ``name``; raises ``KeyError`` naming the checkpoint when it is absent."""
        try:
            info = self.index[name]
        except KeyError:
            raise KeyError(f"tensor {name} is missing from {self.path}") from None

        handle = self._handles.get(info.file)
        if handle is None:
            handle = os.open(info.file, os.O_RDONLY)
            self._handles[info.file] = handle

        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < info.nbytes:
            count = os.preadv(handle, [view[done:]], info.start + done)
            if count == 0:
                raise ValueError(f"{info.file} ends before tensor {name} does")
            done += count
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            os.close(handle)
        self._handles.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_state_dict(
    path: str | Path,
    names: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Load the tensors of a checkpoint into memory.

    ``path`` is a model folder (``model.safetensors``, a sharded safetensors index,
    ``pytorch_model.bin`` or a sharded ``.bin`` index) or one weight file. ``names``
    restricts the result to those tensors (missing ones raise ``KeyError``). ``dtype``
    casts floating-point tensors. Tensor names are kept exactly as stored.
    """
    files = weight_files(path)
    wanted = None if names is None else list(names)

    state: dict[str, torch.Tensor] = {}
    if files[0].suffix == ".safetensors":
        with TensorReader(path) as reader:
            for name in wanted if wanted is not None else reader.names():
                state[name] = reader.read(name)
    else:
        for file in files:
            # weights_only: a .bin file is a pickle, and only tensors are expected in it.
            try:
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except RuntimeError:
                # Files in the legacy (non-zip) format cannot be memory-mapped.
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        if wanted is not None:
            missing = [name for name in wanted if name not in state]
            if missing:
                raise KeyError(f"tensors missing from {path}: {missing[:5]}")
            state = {name: state[name] for name in wanted}
        state = {name: tensor.clone() for name, tensor in state.items()}

    if dtype is not None:
        state = {
            name: tensor.to(dtype) if tensor.is_floating_point() else tensor
            for name, tensor in state.items()
        }
    return state


def _plan_shards(
    layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


class SafetensorsStreamWriter:
    """Writes a (possibly sharded) safetensors checkpoint one tensor at a time.

    The caller declares every tensor's name, dtype and shape up front, in write order,
    then calls ``write`` once per tensor in that order and ``close`` at the end.
    ``close`` raises ``ValueError`` if a declared tensor was never written, so a
    truncated output is never mistaken for a complete one.
    """

    def __init__(
        self,
        folder: str | Path,
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        self.folder = Path(folder)
        self.layout = [(name, dtype, tuple(shape)) for name, dtype, shape in layout]
        shards = _plan_shards(self.layout, max_shard_bytes)
        if len(shards) == 1:
            file_names = [SAFETENSORS_SINGLE]
        else:
            file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

        self._queue: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        self._files = []
        self.weight_map: dict[str, str] = {}
        for file_name, shard in zip(file_names, shards):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape in shard:
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {
                    "dtype": _SAFETENSORS_FROM_DTYPE[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
                self.weight_map[name] = file_name
            encoded = json.dumps(header, separators=(",", ":")).encode()
            # Pad with spaces so tensor data starts 8-byte aligned, as the reference writer does.
            encoded += b" " * (-len(encoded) % 8)
            handle = (self.folder / file_name).open("wb")
            self._files.append(handle)
            try:
                handle.write(struct.pack("<Q", len(encoded)))
                handle.write(encoded)
            except BaseException:
                self._close_files()
                raise
            for name, dtype, shape in shard:
                self._queue.append((name, dtype, shape, len(self._files) - 1))
        self._position = 0
        self.total_bytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.layout)

        if len(file_names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name``; raises ``ValueError`` on order, dtype or shape mismatch."""
        if self._position >= len(self._queue):
            raise ValueError(f"tensor {name} was not declared in the layout")
        expected_name, dtype, shape, file_index = self._queue[self._position]
        if name != expected_name:
            raise ValueError(f"expected tensor {expected_name} next, got {name}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._files[file_index].write(memoryview(data))
        self._position += 1

    def _close_files(self) -> None:
        for handle in self._files:
            handle.close()

    def close(self) -> None:
        self._close_files()
        if self._position != len(self._queue):
            missing = [entry[0] for entry in self._queue[self._position :]]
            raise ValueError(f"{len(missing)} declared tensors were not written, first {missing[0]}")

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()


def save_state_dict(state: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``state`` as safetensors into an existing folder (sharded above ``max_shard_bytes``)."""
    layout = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
    with SafetensorsStreamWriter(folder, layout, max_shard_bytes) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)


def copy_auxiliary_files(source: str | Path, target: str | Path, names: Iterable[str] = AUXILIARY_FILES) -> list[str]:
    """Copy config, generation config and tokenizer files (or only ``names``) from ``source`` to ``target``."""
    copied = []
    for name in names:
        file = Path(source) / name
        if file.is_file():
            shutil.copy2(file, Path(target) / name)
            copied.append(name)
    return copied


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove temporary siblings of ``out_dir`` left by a process that was killed; return them.

    ``atomic_output_dir`` puts its process id into their names. A sibling whose process no
    longer runs is removed. NOTE: on a file system shared between machines, a process id
    from another machine can look dead here, so give each machine its own output folders.
    """
    removed = []
    for kind in ("tmp", "old"):
        for sibling in out_dir.parent.glob(f".{out_dir.name}.{kind}-*-*"):
            pid_text = sibling.name[len(f".{out_dir.name}.{kind}-") :].split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
    if removed:
        logger.info("removed folders of interrupted writes to %s: %s", out_dir, [path.name for path in removed])
    return removed


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out_dir`` when the block succeeds.

    On an exception the temporary folder is removed and ``out_dir`` is left as it was.
    Temporary siblings of a killed earlier write are removed first (``remove_stale_staging``).
    An existing ``out_dir`` is replaced only if ``overwrite`` is true, otherwise
    ``FileExistsError`` is raised before anything is written.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True or choose another output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-{os.getpid()}-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-{os.getpid()}-"))
        os.replace(out_dir, old / "previous")
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
