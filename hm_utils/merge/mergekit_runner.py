"""Running mergekit 0.1.5 itself on a config file, offline, with an atomic output folder."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hm_utils.merge.checks import check_merge_inputs, verify_output
from hm_utils.merge.config import CONFIG_FILE_NAME, MergeConfig, write_mergekit_config
from hm_utils.merge.io import atomic_output_dir

logger = logging.getLogger(__name__)


def run_mergekit(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    random_seed: int | None = None,
    overwrite: bool = True,
    verify: bool = True,
) -> Path:
    """Merge with mergekit's ``run_merge`` as described by a YAML config; return ``out_dir``.

    The config is checked first (``check_merge_inputs``: architectures, layer counts,
    embedding sizes, tied heads, tensor names, quantisation, parameters), before any
    weights load. ``HF_HUB_OFFLINE=1`` is set for the run. mergekit writes into a
    temporary sibling folder that replaces ``out_dir`` only after the output has been
    verified (every expected tensor present, right shape, finite), so a failed merge
    leaves no partial model. The config is saved as ``mergekit_config.yml`` in the output.
    ``random_seed`` seeds DARE and DELLA draws (mergekit's ``--random-seed``).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ["HF_HUB_OFFLINE"] = "1"
    config = MergeConfig.from_yaml(config_path)
    summary = check_merge_inputs(config)
    # mergekit validates the YAML again with its own schema.
    merge_configuration = MergeConfiguration.model_validate(config.to_mergekit())

    start = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        # run_merge creates its output folder itself.
        staging.rmdir()
        options = MergeOptions(copy_tokenizer=True, random_seed=random_seed, lazy_unpickle=False, quiet=True)
        run_merge(merge_configuration, out_path=str(staging), options=options)
        write_mergekit_config(config, staging / CONFIG_FILE_NAME)
        if verify:
            verify_output(staging, summary)
    logger.info("mergekit %s merge written to %s in %.1f s", config.merge_method, out_dir, time.perf_counter() - start)
    return Path(out_dir)


RUN_RECORD_FILE = "hm_merge_run.json"


def merge_with_mergekit_once(config: MergeConfig, out_dir: str | Path, *, random_seed: int | None = None) -> Path:
    """Run ``run_mergekit`` for ``config`` unless ``out_dir`` already contains the same finished merge.

    A merge counts as finished when ``out_dir`` contains the same ``mergekit_config.yml`` text
    and a run record with the same ``random_seed``. ``run_mergekit`` only ever renames a
    verified, complete folder into place, and the record is written after that, so a merge
    killed at any point is run again on the next call.
    """
    import json

    from hm_utils.merge.config import mergekit_yaml

    out_dir = Path(out_dir)
    expected = mergekit_yaml(config)
    config_file, record_file = out_dir / CONFIG_FILE_NAME, out_dir / RUN_RECORD_FILE
    if config_file.is_file() and record_file.is_file():
        same_config = config_file.read_text(encoding="utf-8") == expected
        same_seed = json.loads(record_file.read_text(encoding="utf-8")).get("random_seed") == random_seed
        if same_config and same_seed:
            logger.info("reusing finished merge %s", out_dir)
            return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = write_mergekit_config(config, out_dir.parent / f".{out_dir.name}.{CONFIG_FILE_NAME}")
    try:
        run_mergekit(config_path, out_dir, random_seed=random_seed)
    finally:
        config_path.unlink(missing_ok=True)
    record_file.write_text(json.dumps({"random_seed": random_seed}) + "\n", encoding="utf-8")
    return out_dir
