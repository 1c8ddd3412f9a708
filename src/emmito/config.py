"""Configuration: one JSON schema (``config.schema.yaml``) for the workflow and the CLI.

The schema ships inside the package, so ``emmito <verb>`` fills the same defaults
as the Snakemake workflow and refuses the same typos.

Validation happens once, at the boundary (the CLI's ``stage_config``, the
workflow's ``rules/common.smk``): ``validate`` checks a whole workflow config,
``validate_sections`` a set of stage sections (what ``--params`` carries, no
``volumes`` needed). Both fill the schema's defaults and return a ``Validated``
mapping whose ``explicit`` names the keys the user set, so that later code can
tell a user's value from a default. Code below the boundary takes complete
sections and never validates again.

What reruns: the schema's ``x-stages`` annotations name, per key, the stages
whose output it changes. ``stage_params(config, stage)`` is the part of a
config that changes ``stage``'s output (the workflow's Snakemake params, so a
change reruns exactly what it affects); ``runtime_params(config, stage)`` is
the part the stage reads that changes no output (threads, batch sizes: the
rules pass it as ``--runtime``, outside the params).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from emmito import __version__, contract
from emmito.io import EmmitoError, atomic_path

if TYPE_CHECKING:
    import jsonschema

SCHEMA_FILE = "config.schema.yaml"
STAGES_KEY = "x-stages"  # the schema annotation: the stages whose output a key changes
RUNTIME_KEY = "x-runtime"  # false on an x-stages [] key that no stage reads (the workflow's own)
PARAMS_VERSION = "output_version"  # in a stage's params: contract.OUTPUT_VERSIONS[stage]
PARAMS_EXPLICIT = "explicit"  # in a stage's params (and runtime): the dotted keys in it the user set
# Keys that moved: (section, old key) -> the new dotted path. An old config gets one line.
MOVED_KEYS = {("infer", contract.DOWNSAMPLE_XY): f"model.{contract.DOWNSAMPLE_XY}"}


class Validated(dict):
    """A validated config (or set of config sections) with the schema's defaults filled in.

    A plain dict in every other way (it serialises as JSON, copies and pickles);
    ``explicit`` is the frozenset of dotted key paths the user set
    (``segment.min_size``, ``train.discriminative.support_voxels``), see
    ``explicit_keys``. A key not in it holds the schema's default.
    """

    def __init__(self, data: Mapping[str, Any] = (), explicit: Iterable[str] = ()) -> None:
        super().__init__(data)
        self.explicit: frozenset[str] = frozenset(explicit)

    def is_explicit(self, path: str) -> bool:
        """Whether the user set the dotted key ``path`` (rather than it being a default)."""
        return path in self.explicit


@functools.cache
def schema() -> dict[str, Any]:
    """The parsed config schema (JSON Schema draft 2020-12).

    With libyaml's C loader where PyYAML has it: every cluster job parses the workflow,
    which validates the config, and the pure-Python loader takes ~0.25 s for the schema.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(resources.files("emmito").joinpath(SCHEMA_FILE).read_text(), Loader=loader)  # noqa: S506 (a safe loader)


def explicit_keys(raw: Mapping[str, Any], prefix: str = "") -> frozenset[str]:
    """Every key path in ``raw`` as a dotted string, at every depth, before defaults are filled in.

    ``{"train": {"discriminative": {"support_voxels": 9}}}`` gives ``train``,
    ``train.discriminative`` and ``train.discriminative.support_voxels``. Lists
    are values: their items are not descended into.
    """
    paths: set[str] = set()
    for key, value in raw.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, Mapping):
            paths |= explicit_keys(value, prefix=f"{path}.")
    return frozenset(paths)


def _default_filling_validator() -> type:
    import jsonschema  # here, not at the top: a workflow parse that finds its config validated before never needs it

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


def _check_moved_keys(config: dict[str, Any], source: str) -> None:
    for (section, key), moved_to in MOVED_KEYS.items():
        if isinstance(config.get(section), Mapping) and key in config[section]:
            raise EmmitoError(f"{source}: {section}.{key} is now {moved_to}: move it")


def _check_schema(config: dict[str, Any], source: str) -> None:
    """Check ``config`` against the schema and fill its defaults in place; the first error as one line."""
    _check_moved_keys(config, source)
    validator = _default_filling_validator()(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise EmmitoError(_one_line(errors[0], source))


def validate_sections(
    sections: dict[str, Any], source: str = "config", explicit: Iterable[str] | None = None
) -> Validated:
    """Validate config sections (``{"segment": {...}, "merge": {...}}``) against the schema, filling defaults.

    What the CLI's ``--params`` carries: any top-level keys of a workflow config,
    ``volumes`` not needed. Every section the schema knows is filled in (with
    its defaults where absent); ``sections`` itself is filled in place too.
    ``explicit`` (the key paths the user set) defaults to those in ``sections``
    before filling (``explicit_keys``). Raises EmmitoError with one line naming
    the key and the fix. Rules between keys of one section, which a stage's
    params always carry together, are checked here too (``_check_uncertainty``);
    the cross-section rules of a whole config are ``validate``'s.
    """
    if explicit is None:
        explicit = getattr(sections, "explicit", None)
    explicit = explicit_keys(sections) if explicit is None else frozenset(explicit)
    _check_schema(sections, source)
    _check_uncertainty(sections, source)
    return Validated(sections, explicit)


def _check_uncertainty(config: dict[str, Any], source: str) -> None:
    # infer.uncertainty and infer.tta share their x-stages, so any stage's params hold both or neither.
    infer = config["infer"]
    if infer["uncertainty"] == "tta_std" and infer["tta"] == 1:
        raise EmmitoError(
            f"{source}: infer.uncertainty tta_std needs infer.tta 4, 8 or 16 (the spread across the test-time "
            "variants; no extra forward pass): set infer.tta: 4, or use infer.uncertainty: entropy"
        )


def _check_blocks(config: dict[str, Any], source: str) -> None:
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


# The volume keys that make a volume partly labelled (a proofread crop): label.h5 then holds a valid mask.
PARTIAL_LABEL_KEYS = ("labels_offset", "valid")


def partly_labelled(volume: Mapping[str, Any]) -> bool:
    """Whether a ``volumes.<name>`` entry is labelled only in part (``labels_offset`` or ``valid`` set)."""
    return any(key in volume for key in PARTIAL_LABEL_KEYS)


def _check_volume_names(config: dict[str, Any], source: str) -> None:
    for name, volume in config["volumes"].items():
        if partly_labelled(volume) and "labels" not in volume:
            given = " and ".join(k for k in PARTIAL_LABEL_KEYS if k in volume)
            raise EmmitoError(f"{source}: volumes.{name} sets {given} but has no 'labels': add volumes.{name}.labels or remove {given}")
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
    for name in config["train"]["validation"]:
        if partly_labelled(config["volumes"][name]):
            raise EmmitoError(
                f"{source}: train.validation names volume '{name}', which is labelled only in part "
                f"(volumes.{name}.labels_offset / valid): validate on a fully labelled volume, or move it to train.volumes"
            )
    overlap = set(config["train"]["volumes"]) & set(config["train"]["validation"])
    if overlap:
        raise EmmitoError(f"{source}: volume(s) {sorted(overlap)} are in both train.volumes and train.validation: never validate on training data")


def validate(config: dict[str, Any], source: str = "config", explicit: Iterable[str] | None = None) -> Validated:
    """Validate a whole workflow config against the schema, filling defaults (in place, too).

    Raises EmmitoError with one line naming the key and the fix. Beyond
    ``validate_sections`` it checks the rules a schema cannot express
    (block_slices a multiple of chunk_slices, volume names that exist).
    """
    validated = validate_sections(config, source, explicit)
    _check_blocks(validated, source)
    _check_volume_names(validated, source)
    return validated


def validate_cached(config: dict[str, Any], cache_folder: str | Path, source: str = "config") -> Validated:
    """``validate``, remembered in ``cache_folder`` for the same config, schema and package version.

    Every cluster job parses the workflow, which validates its config; the second
    and later parses of an unchanged config read the filled-in result (and the keys the
    user set) from a small JSON file instead. ``config`` is filled in place, as
    ``validate`` does. A config that JSON cannot hold exactly is validated every time.
    """
    try:
        text = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):
        return validate(config, source)
    schema_text = resources.files("emmito").joinpath(SCHEMA_FILE).read_bytes()
    key = hashlib.sha256(text.encode() + b"\0" + schema_text + b"\0" + __version__.encode()).hexdigest()
    cache = Path(cache_folder) / f"config-{key[:24]}.json"
    try:
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            config.clear()
            config.update(saved["config"])
            return Validated(config, saved["explicit"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    validated = validate(config, source)
    try:
        filled = json.dumps({"key": key, "config": dict(validated), "explicit": sorted(validated.explicit)})
        if json.loads(filled)["config"] == dict(validated):  # only what comes back equal
            with atomic_path(cache) as tmp:
                tmp.write_text(filled)
    except (TypeError, ValueError, EmmitoError):
        pass  # not JSON-exact, or a results folder that cannot be written: validate next time again
    return validated


def load(path: str | Path) -> Validated:
    """Read and validate a YAML config file; ``explicit`` holds the keys the file sets."""
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


# ---- what reruns: the keys that change each stage's output ------------------------------

_ABSENT = object()


def _subset(value: Any, node: dict[str, Any], stages: list[str], keep: Any) -> Any:
    """The part of ``value`` (schema ``node``, its parent's x-stages ``stages``) that ``keep(own, inherited, node)`` keeps, per leaf.

    ``own``: the leaf's x-stages (its own, else inherited); ``inherited``: its parent's.
    """
    own = node.get(STAGES_KEY, stages)
    properties = node.get("properties")
    if properties and isinstance(value, Mapping):
        chosen = {}
        for key, item in value.items():
            if key in properties:
                part = _subset(item, properties[key], own, keep)
                if part is not _ABSENT:
                    chosen[key] = part
        return chosen if chosen else _ABSENT
    return copy.deepcopy(value) if keep(own, stages, node) else _ABSENT


def _known_stage(stage: str) -> None:
    if stage not in contract.OUTPUT_VERSIONS:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(contract.OUTPUT_VERSIONS)}")


def leaf_keys(raw: Mapping[str, Any], prefix: str = "") -> frozenset[str]:
    """The dotted paths of ``raw``'s values that are not mappings (``explicit_keys`` without the sections)."""
    paths: set[str] = set()
    for key, value in raw.items():
        path = f"{prefix}{key}"
        paths |= leaf_keys(value, prefix=f"{path}.") if isinstance(value, Mapping) else {path}
    return frozenset(paths)


def _with_explicit(chosen: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    # Leaves only: a section counts as set whenever any key in it is, so listing it would
    # tie one stage's params to another stage's keys (infer.batch_size would rerun merge).
    explicit = getattr(config, "explicit", frozenset())
    chosen[PARAMS_EXPLICIT] = sorted(explicit & leaf_keys(chosen))
    return chosen


def stage_params(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The nested part of a validated ``config`` that changes ``stage``'s output, as its workflow params.

    Exactly the keys whose ``x-stages`` (their own, else their section's) name
    ``stage``, with their values (defaults included); plus ``output_version``
    (``contract.OUTPUT_VERSIONS[stage]``) and ``explicit``: the sorted dotted
    paths of its values that the user set (``config.explicit``; values, not
    sections), which ``cli.stage_config`` restores. Never the package version.
    """
    _known_stage(stage)
    chosen = _subset(config, schema(), [], lambda own, inherited, node: stage in own)
    chosen = {} if chosen is _ABSENT else chosen
    chosen = _with_explicit(chosen, config)
    chosen[PARAMS_VERSION] = contract.OUTPUT_VERSIONS[stage]
    return chosen


def runtime_params(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The keys ``stage`` reads that change no output (``x-stages: []`` in a section of ``stage``), with ``explicit``.

    Thread counts, ``infer.batch_size``, ``infer.prefetch_batches``: the rules
    pass them as ``--runtime``, outside the params, so that a change reruns nothing.
    """
    _known_stage(stage)

    def keep(own: list[str], inherited: list[str], node: dict[str, Any]) -> bool:
        return not own and stage in inherited and node.get(RUNTIME_KEY, True)

    chosen = _subset(config, schema(), [], keep)
    return _with_explicit({} if chosen is _ABSENT else chosen, config)


def key_stages(path: str) -> list[str]:
    """The stages whose output the dotted config key ``path`` changes (its x-stages, else its section's)."""
    node, stages = schema(), []
    for part in path.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            raise KeyError(f"no config key {path!r}")
        stages = node.get(STAGES_KEY, stages)
    return list(stages)


def stage_explicit(params: Mapping[str, Any]) -> frozenset[str] | None:
    """The ``explicit`` list a stage's params (or runtime) JSON carries, or None where it carries none."""
    listed = params.get(PARAMS_EXPLICIT)
    return None if listed is None else frozenset(listed)


# ---- boundary helpers: one complete section, for tests and benchmarks ----------------


def section_defaults(section: str) -> dict[str, Any]:
    """The default values of one config section (e.g. ``segment``)."""
    return with_defaults(section, None)


def with_defaults(section: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``params`` as config section ``section``, filling its defaults."""
    return validate_sections({section: dict(params or {})}, source=f"--params for {section}")[section]


# ---- where the model lives -------------------------------------------------------------


def model_name(config: dict[str, Any]) -> str:
    return config.get("model", {}).get("name", "model")


def model_dir(config: dict[str, Any]) -> str:
    """Where train writes model.name's checkpoint (and support set): ``contract.Results().model_dir``."""
    return contract.Results().model_dir(model_name(config))


def support_set_path(config: dict[str, Any]) -> str:
    """The support set the nearest_neighbour decoder reads: segment.support_set, else the one beside the checkpoint."""
    return config.get("segment", {}).get("support_set", "") or contract.Results().support_set(model_name(config))
