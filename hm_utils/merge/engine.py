"""Streaming merge of checkpoints on disk: read, merge and write one tensor at a time.

Peak memory is at most about (number of inputs + 3) times the largest tensor, plus the
interpreter, because only the tensors of the current output are ever in memory (see
``hm_utils.merge.io``) and the merge overwrites its input buffers. That holds when freed
tensors go back to the system, which ``python -m hm_utils.merge`` ensures on glibc
(``fix_malloc_mmap_threshold``). ``bench/merge_memory.py`` measures it.

Results equal mergekit 0.1.5's for the same YAML config, up to the tie-breaking described
in ``hm_utils.merge.sparsify`` and the random draws of DARE and DELLA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hm_utils.files import explain_disk_full
from hm_utils.merge.checks import DEFAULT_MAX_RELATIVE_DELTA, InputSummary, check_merge_inputs, check_same_base, verify_output
from hm_utils.merge.config import CONFIG_FILE_NAME, MergeConfig, write_mergekit_config
from hm_utils.merge.io import (
    TOKENIZER_FILES,
    SafetensorsStreamWriter,
    TensorReader,
    all_finite,
    atomic_output_dir,
    copy_auxiliary_files,
)
from hm_utils.merge.methods import linear_merge_full, merge_tensor, method_spec, torch_threads
from hm_utils.merge.plan import TensorPlan, plan_merge

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _load_config(config: MergeConfig | str | Path) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else MergeConfig.from_yaml(config)


def _read_checked(reader: TensorReader, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = reader.read(name)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if not all_finite(tensor):
        raise ValueError(f"tensor {name} of {reader.path} contains NaN or infinity; fix or replace that checkpoint")
    return tensor


def _check_merged(name: str, merged: torch.Tensor) -> None:
    if all_finite(merged):
        return
    if merged.dtype == torch.float16:
        raise ValueError(
            f"merged tensor {name} contains NaN or infinity: it overflows float16 (largest finite value 65504);"
            " set out_dtype (and dtype) to float32 or bfloat16, or lower the weights and lambda"
        )
    raise ValueError(f"merged tensor {name} contains NaN or infinity; check weights and lambda")


def copy_output_files(summary: InputSummary, staging: Path) -> None:
    """Copy config.json and generation config of the reference, and the tokenizer that ``check_merge_inputs`` chose."""
    copy_auxiliary_files(summary.reference, staging)
    if summary.tokenizer is not None and summary.tokenizer != summary.reference:
        copy_auxiliary_files(summary.tokenizer, staging, TOKENIZER_FILES)


def merge_one(
    config: MergeConfig,
    item: TensorPlan,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the merged tensor for one output from the base tensor and the input tensors.

    To bound memory, the merge overwrites ``base`` and the input tensors (fresh buffers
    from ``TensorReader``) and empties ``inputs``.
    """
    spec = method_spec(config.merge_method)
    if not spec.uses_base:
        return linear_merge_full(inputs, item.weights, item.normalize)

    # The inputs are fresh buffers from TensorReader, so the deltas reuse them, the merge
    # overwrites them and the sum overwrites the base.
    deltas = [tensor.sub_(base) for tensor in inputs]
    inputs.clear()
    merged_delta = merge_tensor(
        deltas,
        config.merge_method,
        item.weights,
        item.densities,
        normalize=item.normalize,
        rescale=item.rescale,
        scale=item.scale,
        gammas=item.gammas,
        epsilons=item.epsilons,
        generator=generator,
        inplace=True,
    )
    deltas.clear()
    if merged_delta.dtype != base.dtype:
        return (base + merged_delta).to(base.dtype)
    return base.add_(merged_delta)


def merge_checkpoints(
    config: MergeConfig | str | Path,
    out_dir: str | Path,
    *,
    generator: torch.Generator | None = None,
    overwrite: bool = True,
    progress: bool = True,
    summary: InputSummary | None = None,
    threads: int | None = 1,
    max_relative_delta: float | None = DEFAULT_MAX_RELATIVE_DELTA,
) -> Path:
    """Merge the checkpoints a config names into ``out_dir`` (safetensors, config, tokenizer).

    Inputs are checked before any weights load (``check_merge_inputs``), then a sample of
    decoder layers is read to reject a model fine-tuned from another base
    (``check_same_base`` with ``max_relative_delta``; ``None`` skips it). Each input and
    output tensor is checked for NaN and infinity as it streams, and the finished folder
    against the tensors of the inputs and the architecture (``verify_output``). The output
    folder is built under a temporary sibling name and renamed into place when complete,
    with the config saved as ``mergekit_config.yml``, the config.json of the base model
    (or the first model for ``linear``) and the tokenizer files ``check_merge_inputs``
    chose. A failed merge leaves ``out_dir`` as it was. A full disk raises a one-line
    ``OSError`` naming ``out_dir``. Random methods draw from ``generator`` (the global
    torch RNG when ``None``).

    ``threads`` sets torch's CPU threads for the merge (``None`` keeps the current
    setting). The work is many short memory-bound tensor operations, which gain little
    from intra-op threads and lose much when other jobs share the cores. On a 2-core
    machine under load, ``bench/merge_vs_mergekit.py`` measured 11 s with one thread and
    90 s with two for a three-model TIES merge of SmolLM2-135M.
    """
    config = _load_config(config)
    summary = summary or check_merge_inputs(config)
    plan = plan_merge(config, summary)
    with torch_threads(threads):
        check_same_base(summary, max_relative_delta)

    compute_dtype = _DTYPES[config.dtype] if config.dtype else None
    out_dtype = _DTYPES[config.out_dtype] if config.out_dtype else None
    layout = []
    for item in plan:
        stored = summary.tensors[item.name].dtype
        layout.append((item.name, out_dtype or compute_dtype or stored, summary.tensors[item.name].shape))

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(explain_disk_full(out_dir))
        stack.enter_context(torch_threads(threads))
        base_reader = stack.enter_context(TensorReader(summary.base)) if summary.base is not None else None
        readers = [stack.enter_context(TensorReader(folder)) for folder in summary.models]
        staging = stack.enter_context(atomic_output_dir(out_dir, overwrite=overwrite))
        with SafetensorsStreamWriter(staging, layout) as writer:
            for item, (name, dtype, _) in zip(tqdm(plan, desc=f"merge {config.merge_method}", disable=not progress), layout):
                base = _read_checked(base_reader, name, compute_dtype) if base_reader is not None else None
                inputs = [_read_checked(reader, name, compute_dtype) for reader in readers]
                merged = merge_one(config, item, base, inputs, generator).to(dtype)
                _check_merged(name, merged)
                writer.write(name, merged)
                del base, inputs, merged

        copy_output_files(summary, staging)
        if out_dtype is not None or compute_dtype is not None:
            config_path = staging / "config.json"
            model_config = json.loads(config_path.read_text(encoding="utf-8"))
            model_config["dtype"] = config.out_dtype or config.dtype
            model_config.pop("torch_dtype", None)
            config_path.write_text(json.dumps(model_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_mergekit_config(config, staging / CONFIG_FILE_NAME)
        verify_output(staging, summary, check_values=False)

    logger.info("%s merge of %d models written to %s in %.1f s", config.merge_method, len(readers), out_dir, time.perf_counter() - start)
    return Path(out_dir)
