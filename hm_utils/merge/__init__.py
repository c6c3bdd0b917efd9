"""Merging of models fine-tuned from one base: an in-memory engine and mergekit baselines.

For base weights ``θ_F`` and specialists ``θ_m``, a merge combines the task vectors
``δ_m = θ_m − θ_F`` tensor by tensor into ``Δ`` and returns ``θ_G = θ_F + Δ``. The methods
and every parameter follow mergekit 0.1.5: ``linear``, ``task_arithmetic``, ``ties``,
``dare_ties``, ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della`` and
``della_linear``. The formulas are in ``hm_utils.merge.methods`` and
``hm_utils.merge.sparsify``, the gradient and filter semantics of per-layer settings in
``hm_utils.merge.params``.

Three entry points:

- in memory, for sweeps: ``TaskVectors`` -> ``merge_deltas`` -> ``apply_delta_`` on a
  loaded model (whole model or chosen decoder layers, no reload);
- on disk: ``merge_checkpoints(config, out_dir)`` streams tensor by tensor;
- mergekit itself: ``run_mergekit(config_path, out_dir)``.

Every merge on disk is described by a ``MergeConfig`` saved as mergekit YAML
(``mergekit_config.yml``) in its output folder. ``python -m hm_utils.merge CONFIG.yaml
--dry-run`` prints the resolved weight and density per model per decoder layer.
"""

from hm_utils.merge.checks import InputSummary, check_merge_inputs, check_same_base, verify_output
from hm_utils.merge.config import (
    CONFIG_FILE_NAME,
    Baseline,
    MergeConfig,
    ModelEntry,
    load_baselines,
    mergekit_yaml,
    write_mergekit_config,
)
from hm_utils.merge.engine import merge_checkpoints
from hm_utils.merge.io import TensorReader, load_state_dict, save_state_dict
from hm_utils.merge.mergekit_runner import merge_with_mergekit_once, run_mergekit
from hm_utils.merge.methods import METHODS, merge_tensor
from hm_utils.merge.params import decoder_layer_of
from hm_utils.merge.plan import describe_plan, plan_merge
from hm_utils.merge.task_vectors import TaskVectors, apply_delta_, merge_deltas

__all__ = [
    "Baseline",
    "CONFIG_FILE_NAME",
    "METHODS",
    "InputSummary",
    "MergeConfig",
    "ModelEntry",
    "TaskVectors",
    "TensorReader",
    "apply_delta_",
    "check_merge_inputs",
    "check_same_base",
    "decoder_layer_of",
    "describe_plan",
    "load_baselines",
    "load_state_dict",
    "merge_checkpoints",
    "merge_deltas",
    "merge_tensor",
    "merge_with_mergekit_once",
    "mergekit_yaml",
    "plan_merge",
    "run_mergekit",
    "save_state_dict",
    "verify_output",
    "write_mergekit_config",
]
