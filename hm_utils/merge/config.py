"""Merge configurations: one ``MergeConfig`` describes a merge and serialises to mergekit YAML.

The YAML is mergekit 0.1.5's ``models:`` form::

    merge_method: ties
    base_model: /abs/path/base
    models:
      - model: /abs/path/specialist_a
        parameters: {weight: 1.0, density: [0.5, 0.3]}
    parameters: {normalize: false}
    dtype: float32

Model paths are written absolute, because mergekit reads a relative path with one ``/``
as a hub id. ``linear`` has no base model in the YAML, because mergekit would add the
base as an input that then needs a weight. To average the base in, list it among ``models``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hm_utils.files import write_text_atomic
from hm_utils.merge.methods import check_parameter_names, did_you_mean, method_spec
from hm_utils.merge.params import Setting, per_model_settings

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "mergekit_config.yml"
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def model_reference(reference: str | Path) -> str:
    """Return an absolute path for an existing local model (or an embedded name's folder), else the hub id."""
    from hm_utils.models import resolve_model

    return resolve_model(reference)


def _absolute_if_local(reference: str) -> str:
    """Return the absolute path of an existing local folder, else ``reference`` unchanged.

    A relative path in a YAML config is read from the current folder, as mergekit does.
    Making it absolute keeps ``models/base`` a local folder when the config is saved with
    the output or run from elsewhere.
    """
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.is_dir() else reference


@dataclasses.dataclass
class ModelEntry:
    """One input model and its per-model parameters (mergekit settings)."""

    model: str
    parameters: dict[str, Setting] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MergeConfig:
    """A merge: method, base model, input models with per-model parameters, shared parameters, dtypes.

    ``parameters`` contains settings shared by all models (and defaults for per-model
    ones); per-model settings in ``models[i].parameters`` take precedence. ``dtype`` is
    the computation dtype, ``out_dtype`` the dtype written (``None``: the computation
    dtype).
    """

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Setting] = dataclasses.field(default_factory=dict)
    dtype: str | None = "float32"
    out_dtype: str | None = None

    def __post_init__(self) -> None:
        self.models = [entry if isinstance(entry, ModelEntry) else ModelEntry(**entry) for entry in self.models]
        self.validate()

    def validate(self) -> None:
        """Check names and structure (no file access); raises ``ValueError`` with the fix."""
        spec = method_spec(self.merge_method)
        if not self.models:
            raise ValueError("a merge needs at least one input model under 'models'")
        if spec.uses_base and self.base_model is None:
            raise ValueError(f"merge method {self.merge_method!r} needs base_model")
        if not spec.uses_base and self.base_model is not None:
            raise ValueError(
                f"merge method {self.merge_method!r} averages the listed models and takes no base_model;"
                " remove base_model or list it among the models"
            )
        check_parameter_names(self.merge_method, list(self.parameters), where="global parameters")
        for entry in self.models:
            check_parameter_names(self.merge_method, list(entry.parameters), where=f"parameters of {entry.model}")
            shared = [name for name in entry.parameters if name in spec.shared_parameters]
            if shared:
                raise ValueError(
                    f"parameters {shared} of {entry.model} are shared by all models; move them to the global parameters"
                )
        references = [entry.model for entry in self.models]
        if len(set(references)) != len(references):
            raise ValueError(f"an input model is listed twice: {references}")
        if self.base_model is not None and self.base_model in references:
            raise ValueError(f"base model {self.base_model} is also listed under models; list it only as base_model")
        for name, value in (("dtype", self.dtype), ("out_dtype", self.out_dtype)):
            if value is not None and value not in _FLOAT_DTYPES:
                raise ValueError(f"{name} {value!r} is not one of {_FLOAT_DTYPES}")

    @property
    def model_paths(self) -> list[str]:
        return [entry.model for entry in self.models]

    @classmethod
    def from_arguments(
        cls,
        method: str,
        base_model: str | Path | None,
        models: Sequence[str | Path],
        weights: Any = 1.0,
        densities: Any = None,
        dtype: str | None = "float32",
        out_dtype: str | None = None,
        **options: Any,
    ) -> MergeConfig:
        """Build a config from the same arguments as ``merge_deltas``.

        ``weights``, ``densities``, ``gamma`` and ``epsilon`` take the ``merge_deltas``
        forms: one setting for all, one per model, or a mapping from model path. The
        other options (``normalize``, ``rescale``, ``lambda``, ``int8_mask``) become
        global parameters. Model references are made absolute.
        """
        references = [model_reference(model) for model in models]
        raw_names = [str(model) for model in models]
        options = dict(options)
        if "lambda_" in options:
            options["lambda"] = options.pop("lambda_")

        def expand(value: Any, parameter: str) -> list[Setting]:
            if isinstance(value, Mapping):
                value = {model_reference(key) if key in raw_names else key: item for key, item in value.items()}
            return per_model_settings(value, references, parameter)

        spec = method_spec(method)
        per_model: dict[str, list[Setting]] = {"weight": expand(weights, "weights")}
        if densities is not None:
            if "density" not in spec.model_parameters:
                raise ValueError(f"merge method {method!r} takes no density; pass densities=None")
            per_model["density"] = expand(densities, "densities")
        for parameter in ("gamma", "epsilon"):
            if parameter in options:
                per_model[parameter] = expand(options.pop(parameter), parameter)

        entries = [
            ModelEntry(reference, {parameter: values[i] for parameter, values in per_model.items()})
            for i, reference in enumerate(references)
        ]
        return cls(
            merge_method=method,
            models=entries,
            base_model=None if base_model is None else model_reference(base_model),
            parameters=options,
            dtype=dtype,
            out_dtype=out_dtype,
        )

    def to_mergekit(self) -> dict[str, Any]:
        """Return the mergekit YAML mapping."""
        document: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            document["base_model"] = self.base_model
        document["models"] = [
            {"model": entry.model, **({"parameters": _plain(entry.parameters)} if entry.parameters else {})}
            for entry in self.models
        ]
        if self.parameters:
            document["parameters"] = _plain(self.parameters)
        if self.dtype is not None:
            document["dtype"] = self.dtype
        if self.out_dtype is not None:
            document["out_dtype"] = self.out_dtype
        return document

    @classmethod
    def from_mergekit(cls, document: Mapping[str, Any]) -> MergeConfig:
        """Read the ``models:`` form of a mergekit YAML mapping; other forms raise ``ValueError``.

        Model references that are existing local folders become absolute paths.
        """
        keys = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
        unsupported = sorted(set(document) - set(keys))
        if unsupported:
            raise ValueError(
                f"config keys {unsupported} are not supported here{did_you_mean(unsupported[0], keys)}; use {', '.join(keys)}"
            )
        if "merge_method" not in document or "models" not in document:
            raise ValueError("a merge config needs 'merge_method' and 'models'")
        base_model = document.get("base_model")
        base_model = None if base_model is None else _absolute_if_local(str(base_model))
        models = []
        for entry in document["models"]:
            if not isinstance(entry, Mapping) or "model" not in entry:
                raise ValueError(f"invalid models entry {entry!r}; expected {{model: PATH, parameters: {{...}}}}")
            unknown = sorted(set(entry) - {"model", "parameters"})
            if unknown:
                raise ValueError(
                    f"models entry {entry['model']!r} has unknown keys {unknown}"
                    f"{did_you_mean(unknown[0], ('model', 'parameters'))}; use model and parameters"
                )
            model = _absolute_if_local(str(entry["model"]))
            if base_model is not None and model == base_model and not entry.get("parameters"):
                # mergekit examples list the base among the models without parameters; it adds nothing.
                continue
            models.append(ModelEntry(model, dict(entry.get("parameters") or {})))
        return cls(
            merge_method=document["merge_method"],
            models=models,
            base_model=base_model,
            parameters=dict(document.get("parameters") or {}),
            dtype=document.get("dtype"),
            out_dtype=document.get("out_dtype"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        with Path(path).open(encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
        if not isinstance(document, Mapping):
            raise ValueError(f"{path} does not contain a YAML mapping")
        return cls.from_mergekit(document)


def _plain(value: Any) -> Any:
    """Convert tuples and numpy-like numbers to plain YAML-safe Python values."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    return float(value)


class _FlowListDumper(yaml.SafeDumper):
    """Writes lists of numbers on one line, as mergekit's own dumper does."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def mergekit_yaml(config: MergeConfig) -> str:
    """Return the mergekit YAML text of a config."""
    return yaml.dump(config.to_mergekit(), Dumper=_FlowListDumper, sort_keys=False, allow_unicode=True)


def write_mergekit_config(config: MergeConfig, path: str | Path) -> Path:
    """Write ``config`` as mergekit YAML to ``path`` atomically and return the path.

    A folder ``path`` gets ``mergekit_config.yml`` inside it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE_NAME
    return write_text_atomic(path, mergekit_yaml(config))


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One baseline merge: a method with one weight and density setting for all specialists."""

    name: str
    method: str
    weights: Any = 1.0
    densities: Any = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config(self, base_model: str | Path, specialists: Sequence[str | Path], dtype: str | None = "float32") -> MergeConfig:
        """Return the ``MergeConfig`` of this baseline for a base and its specialists."""
        base = None if not method_spec(self.method).uses_base else base_model
        return MergeConfig.from_arguments(
            self.method, base, specialists, weights=self.weights, densities=self.densities, dtype=dtype, **self.parameters
        )


def default_baselines_path() -> Path:
    """Return ``configs/baselines.yaml`` of the repository."""
    return Path(__file__).resolve().parents[2] / "configs" / "baselines.yaml"


def load_baselines(path: str | Path | None = None) -> tuple[dict[str, Baseline], dict[str, Any]]:
    """Read a baselines file; return the baselines by name and the file's other settings (dtype, seed).

    Raises ``ValueError`` for an unknown method or parameter in any entry.
    """
    path = Path(path) if path is not None else default_baselines_path()
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = document.get("baselines") or {}
    baselines = {}
    for name, entry in entries.items():
        unknown = sorted(set(entry) - {"method", "weights", "densities", "parameters"})
        if unknown:
            raise ValueError(f"baseline {name} in {path} has unknown keys {unknown}; use method, weights, densities, parameters")
        baseline = Baseline(name=name, **entry)
        check_parameter_names(baseline.method, list(baseline.parameters), where=f"parameters of baseline {name}")
        baselines[name] = baseline
    settings = {key: value for key, value in document.items() if key != "baselines"}
    return baselines, settings
