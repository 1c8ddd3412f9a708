"""Configuration: one JSON schema (``config.schema.yaml``) for the workflow and the CLI.

The schema ships inside the package, so ``emmito <verb>`` fills the same defaults
as the Snakemake workflow and refuses the same typos.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from emmito.io import EmmitoError

SCHEMA_FILE = "config.schema.yaml"


@functools.cache
def schema() -> dict[str, Any]:
    """The parsed config schema (JSON Schema draft 2020-12)."""
    return yaml.safe_load(resources.files("emmito").joinpath(SCHEMA_FILE).read_text())


def _default_filling_validator() -> type:
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, sub_schema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop and name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])
        yield from validate_properties(validator, properties, instance, sub_schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _one_line(error: jsonschema.ValidationError, source: str) -> str:
    key = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        where = f"'{key}'" if key != "<top level>" else "the top level"
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{source}: unknown key {', '.join(repr(e) for e in extra)} in {where}: check the spelling{hint}"
    if error.validator == "enum":
        return f"{source}: key '{key}' is {error.instance!r}: use one of {', '.join(map(repr, error.validator_value))}"
    if error.validator == "type":
        return f"{source}: key '{key}' is {error.instance!r}, not of type {error.validator_value}: fix its value"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[error.validator]
        return f"{source}: key '{key}' is {error.instance!r}, out of range: it must be {word} {error.validator_value}"
    if error.validator == "required":
        return f"{source}: {error.message} in '{key}': add it"
    return f"{source}: key '{key}': {error.message}"


def _check_schema(config: dict[str, Any], source: str) -> None:
    validator = _default_filling_validator()(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise EmmitoError(_one_line(errors[0], source))


def validate(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` in place against the schema, filling defaults.

    Raises EmmitoError with one line naming the key and the fix. Also checks
    the rules a schema cannot express (block_slices a multiple of chunk_slices,
    volume names that exist).
    """
    _check_schema(config, source)
    chunk = config["infer"]["chunk_slices"]
    block = config["merge"]["block_slices"]
    if block % chunk:
        raise EmmitoError(
            f"{source}: merge.block_slices ({block}) is not a multiple of infer.chunk_slices ({chunk}): "
            f"a block must hold a whole number of chunks, e.g. block_slices: {max(chunk, block // chunk * chunk)}"
        )
    if config["merge"]["block_overlap"] > block:
        raise EmmitoError(
            f"{source}: merge.block_overlap ({config['merge']['block_overlap']}) is larger than merge.block_slices ({block}): use a few slices"
        )
    for section, key in (("train", "volumes"), ("train", "validation"), ("infer", "volumes")):
        for name in config[section][key]:
            if name not in config["volumes"]:
                raise EmmitoError(
                    f"{source}: {section}.{key} names volume '{name}', which is not under 'volumes': "
                    f"add it there or use one of {', '.join(sorted(config['volumes']))}"
                )
    for name in config["train"]["volumes"] + config["train"]["validation"]:
        if "labels" not in config["volumes"][name]:
            raise EmmitoError(f"{source}: volume '{name}' is used for training but has no 'labels': add volumes.{name}.labels")
    overlap = set(config["train"]["volumes"]) & set(config["train"]["validation"])
    if overlap:
        raise EmmitoError(f"{source}: volume(s) {sorted(overlap)} are in both train.volumes and train.validation: never validate on training data")
    return config


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: config file not found: copy config.yaml and edit it")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise EmmitoError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)}): fix the syntax") from None
    if not isinstance(config, dict):
        raise EmmitoError(f"{path}: the config must be a mapping of keys to values")
    return validate(config, source=str(path))


def section_defaults(section: str) -> dict[str, Any]:
    """The default values of one config section (e.g. ``segment``)."""
    return with_defaults(section, None)


def with_defaults(section: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``params`` as config section ``section``, filling its defaults."""
    config: dict[str, Any] = {"volumes": {"x": {"images": "x"}}, section: dict(params or {})}
    _check_schema(config, source=f"--params for {section}")
    return config[section]


def model_dir(config: dict[str, Any]) -> str:
    """Where train writes model.name's checkpoint (and support set): results/model/<model.name>."""
    return f"results/model/{config.get('model', {}).get('name', 'model')}"


def support_set_path(config: dict[str, Any]) -> str:
    """The support set the nearest_neighbour decoder reads: segment.support_set, else the one beside the checkpoint."""
    return config.get("segment", {}).get("support_set", "") or f"{model_dir(config)}/support.npz"
