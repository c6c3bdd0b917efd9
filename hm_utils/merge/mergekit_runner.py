"""Running mergekit 0.1.5 itself on a config file, offline, with an atomic output folder."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hm_utils.files import explain_disk_full, write_text_atomic
from hm_utils.merge.checks import DEFAULT_MAX_RELATIVE_DELTA, InputSummary, check_merge_inputs, check_same_base, verify_output
from hm_utils.merge.config import CONFIG_FILE_NAME, MergeConfig, mergekit_yaml, write_mergekit_config
from hm_utils.merge.io import TOKENIZER_FILES, atomic_output_dir, copy_auxiliary_files, weight_files
from hm_utils.merge.plan import plan_merge

logger = logging.getLogger(__name__)


def run_mergekit(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    random_seed: int | None = None,
    overwrite: bool = True,
    verify: bool = True,
    max_relative_delta: float | None = DEFAULT_MAX_RELATIVE_DELTA,
) -> Path:
    """Merge with mergekit's ``run_merge`` as described by a YAML config; return ``out_dir``.

    The config is checked first (``check_merge_inputs``: architectures, layer counts,
    embedding sizes, tied heads, tensor names, tokenizers, quantisation, parameters),
    before any weights load, and then a sample of decoder layers (``check_same_base`` with
    ``max_relative_delta``; ``None`` skips it). ``HF_HUB_OFFLINE=1`` is set for the run.
    mergekit writes into a temporary sibling folder that replaces ``out_dir`` only after
    the output has been verified (every tensor of the inputs and the architecture present,
    right shape, finite), so a failed merge leaves no partial model and an older output
    stays. A full disk raises a one-line ``OSError`` naming ``out_dir``. The config is
    saved as ``mergekit_config.yml`` in the output. ``random_seed`` seeds DARE and DELLA
    draws (mergekit's ``--random-seed``).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ["HF_HUB_OFFLINE"] = "1"
    config = MergeConfig.from_yaml(config_path)
    summary = check_merge_inputs(config)
    # Weight sums, densities and epsilons per tensor, as the engine resolves them.
    plan_merge(config, summary)
    check_same_base(summary, max_relative_delta)
    # mergekit validates the YAML again with its own schema.
    merge_configuration = MergeConfiguration.model_validate(config.to_mergekit())

    start = time.perf_counter()
    with explain_disk_full(out_dir), atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        # run_merge creates its output folder itself.
        staging.rmdir()
        options = MergeOptions(copy_tokenizer=True, random_seed=random_seed, lazy_unpickle=False, quiet=True)
        _clear_loader_cache()
        try:
            run_merge(merge_configuration, out_path=str(staging), options=options)
        finally:
            _clear_loader_cache()
        _add_tokenizer(summary, staging)
        write_mergekit_config(config, staging / CONFIG_FILE_NAME)
        if verify:
            verify_output(staging, summary)
    logger.info("mergekit %s merge written to %s in %.1f s", config.merge_method, out_dir, time.perf_counter() - start)
    return Path(out_dir)


def _clear_loader_cache() -> None:
    """Close and forget the tensor loaders that mergekit keeps between ``run_merge`` calls.

    mergekit 0.1.5's ``LoaderCache`` is a per-thread singleton keyed by model path, so a
    later merge in the same process would read a model rewritten at the same path from
    the old file.
    """
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.flush_all()
    cache.loaders.clear()


def _add_tokenizer(summary: InputSummary, staging: Path) -> None:
    """Copy the tokenizer ``check_merge_inputs`` chose when mergekit found none in the base model."""
    has_tokenizer = any((staging / name).is_file() for name in TOKENIZER_FILES)
    if summary.tokenizer is not None and not has_tokenizer:
        copy_auxiliary_files(summary.tokenizer, staging, TOKENIZER_FILES)


RUN_RECORD_FILE = "hm_merge_run.json"


def input_fingerprints(config: MergeConfig) -> dict[str, list[list[Any]]]:
    """Return name, size and modification time of every weight file of every input model, by model reference.

    A finished merge is reused only while these stay the same, so a specialist trained
    again at the same path is merged again.
    """
    from hm_utils.merge.checks import local_model_dir

    references = ([config.base_model] if config.base_model is not None else []) + config.model_paths
    fingerprints = {}
    for reference in references:
        files = []
        for file in weight_files(local_model_dir(reference)):
            status = file.stat()
            files.append([file.name, status.st_size, status.st_mtime_ns])
        fingerprints[reference] = files
    return fingerprints


def merge_with_mergekit_once(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    random_seed: int | None = None,
    max_relative_delta: float | None = DEFAULT_MAX_RELATIVE_DELTA,
) -> Path:
    """Run ``run_mergekit`` for ``config`` unless ``out_dir`` already contains the same finished merge.

    A merge counts as finished when ``out_dir`` contains the same ``mergekit_config.yml`` text
    and a run record with the same ``random_seed`` and the same input weight files (name,
    size, modification time). ``run_mergekit`` only ever renames a verified, complete
    folder into place, and the record is written after that, so a merge killed at any
    point is run again on the next call.
    """
    out_dir = Path(out_dir)
    expected = mergekit_yaml(config)
    inputs = input_fingerprints(config)
    config_file, record_file = out_dir / CONFIG_FILE_NAME, out_dir / RUN_RECORD_FILE
    if config_file.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        same_config = config_file.read_text(encoding="utf-8") == expected
        same_seed = record.get("random_seed") == random_seed
        same_inputs = record.get("inputs") == inputs
        if same_config and same_seed and same_inputs:
            logger.info("reusing finished merge %s", out_dir)
            return out_dir
        if same_config and same_seed:
            logger.info("input weights of %s changed since it was merged; merging again", out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = write_mergekit_config(config, out_dir.parent / f".{out_dir.name}.{CONFIG_FILE_NAME}")
    try:
        run_mergekit(config_path, out_dir, random_seed=random_seed, max_relative_delta=max_relative_delta)
    finally:
        config_path.unlink(missing_ok=True)
    with explain_disk_full(out_dir):
        write_text_atomic(record_file, json.dumps({"random_seed": random_seed, "inputs": inputs}) + "\n")
    return out_dir
