"""``emmito segment``: heat/block_{b}.h5 -> seg/block_{b}.h5, the file I/O around ``emmito.decoders``.

It checks the heat file against ``segment.decoder`` (one-line errors that name
the file and the fix), hands ``decoders.decode`` the file's channels by name as
lazy arrays (each is read only when the decoder needs it) with the support set
where the decoder needs one, and writes the labels (block-local ids) with the
heat file's volume frame. The decoders themselves live in ``emmito.decoders``.
Beside the labels it writes their score rows (``contract.SLICE_SCORES``): per
object and slice, the voxels and the sum of the foreground heat over them
(``labels.slice_heat_sums``), from which trace gives each traced object its
mean foreground probability, the score evaluate ranks objects by.

The settings it decodes with (``tuning.resolve_settings``): the schema
defaults, then the settings tuned for the model (``--decoder-settings``: the
decoder.json that ``emmito tune`` wrote beside the checkpoint), then the keys
the user set in the config (``params.explicit``), which win. The log names
each tuned key's value and where it came from.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from emmito import config, contract, decoders, embedding, runtime, tuning
from emmito.decoders import DECODER_CHANNELS, EMBEDDING_DECODERS, HEAT_CHANNEL
from emmito.io import EmmitoError, create_volume, open_volume, write_table
from emmito.labels import slice_heat_sums


@dataclass(frozen=True)
class HeatChannel:
    """Channel ``index`` of an open (channel, z, y, x) heat dataset, read only when indexed (a lazy array)."""

    ds: Any
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ds.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.ds.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.ds[(self.index, *(key if isinstance(key, tuple) else (key,)))]


def _file_channels(attrs: dict[str, Any], shape: tuple[int, ...]) -> list[str]:
    """A heat file's channel names; a one-channel heatmap from elsewhere (no names) is the foreground."""
    names = contract.channel_names(attrs)
    if names is None:
        names = [HEAT_CHANNEL] if shape[0] == 1 else []
    return names


def heat_channel(path: Any, attrs: dict[str, Any], shape: tuple[int, ...], name: str = HEAT_CHANNEL, decoder: str = "heat_watershed") -> int:
    """Index of channel ``name`` in a heat file's (channel, z, y, x) dataset."""
    if len(shape) != 4:
        raise EmmitoError(
            f"{path}: heatmap has shape {shape}, not (channel, z, y, x): rerun emmito merge to rewrite it"
        )
    channels = _file_channels(attrs, shape)
    if name not in channels:
        need = " and ".join(f"'{c}'" for c in DECODER_CHANNELS[decoder])
        raise EmmitoError(
            f"{path}: no '{name}' channel (attr channels = {channels}); segment.decoder {decoder} needs {need}: "
            + ("use segment.decoder heat_watershed or infer with a binary + contour model" if decoder == "bc_watershed"
               else "rerun infer with a model that predicts the foreground")
        )
    return channels.index(name)


def check_heat_file(path: Any, ds: Any, attrs: dict[str, Any], params: dict[str, Any]) -> tuple[str, decoders.SupportSet | None]:
    """(the decoder to run, the support set it needs or None) for an open heat file; EmmitoError where it cannot run.

    ``params``: the validated config (its ``segment`` section, and ``model``
    for the default support set's path).
    """
    section = params["segment"]
    if ds.dtype != np.uint8:
        raise EmmitoError(f"{path}: heatmap is {ds.dtype}, not uint8 0-255: rerun emmito merge to rewrite it")
    decoder, heat_name = decoders.resolve_decoder(section["decoder"], contract.channel_names(attrs))
    support = None
    needed = DECODER_CHANNELS[decoder]
    if decoder in EMBEDDING_DECODERS:
        if ds.ndim != 4:
            raise EmmitoError(
                f"{path}: heatmap has shape {ds.shape}, not (channel, z, y, x): rerun emmito merge to rewrite it"
            )
        names = contract.channel_names(attrs) or []
        if not embedding.embedding_channels(names):
            raise EmmitoError(
                f"{path}: no emb0.. channels (attr channels = {names}); segment.decoder {decoder} needs an "
                "embedding model: infer with model.head embedding, or pick segment.decoder heat_watershed"
            )
        if decoder == "nearest_neighbour":
            support = contract.load_support_set(config.support_set_path(params))
        if decoder == "nearest_neighbour" and section["nnc_candidates"] <= 0:
            needed = ()  # every voxel is a candidate: the foreground channel is not read
    for name in needed:  # skeleton_distance (auto) plays the foreground's part
        heat_channel(path, attrs, ds.shape, heat_name if name == HEAT_CHANNEL else name, decoder)
    return decoder, support


def heat_channels(ds: Any, attrs: dict[str, Any]) -> dict[str, HeatChannel]:
    """Every channel of an open (channel, z, y, x) heat dataset by name, as lazy arrays for ``decoders.decode``."""
    return {name: HeatChannel(ds, index) for index, name in enumerate(_file_channels(attrs, ds.shape))}


def segment_settings(params: dict[str, Any], decoder: str, attrs: dict[str, Any], settings_path: Any = None) -> dict[str, Any]:
    """The ``segment`` section to decode with: defaults < decoder.json (``settings_path``) < the user's keys.

    ``params``: the validated config (a ``config.Validated``, whose ``explicit``
    names the keys the user set; a plain dict counts every segment key as set).
    Prints the tuned keys' values and their sources to stderr (the segment log).
    """
    explicit = getattr(params, "explicit", None)
    if explicit is None:
        explicit = {f"segment.{key}" for key in params["segment"]}
    tuned = contract.load_decoder_settings(settings_path) if settings_path else None
    heat = tuning.heat_kind(contract.channel_names(attrs) or [HEAT_CHANNEL])
    settings, sources = tuning.resolve_settings(params["segment"], explicit, tuned, decoder, heat, str(settings_path))
    print(f"emmito segment: {decoder} with {tuning.describe(settings, sources)}", file=sys.stderr)
    if tuned is not None and tuned.get("decoder") != decoder:
        print(f"emmito segment: {settings_path} was tuned for {tuned.get('decoder')}, not {decoder}: its settings are not used", file=sys.stderr)
    return settings


def block_scores(ds: Any, attrs: dict[str, Any], decoder: str, labels: np.ndarray) -> np.ndarray | None:
    """The object-score rows of a decoded block (``contract.SLICE_SCORES``), or None where the heat has no foreground.

    The heat is the channel that plays the foreground's part for ``decoder``
    (``decoders.resolve_decoder``: ``foreground``, or ``skeleton_distance``
    for such a model under ``auto``), read a slab at a time: each object's
    voxels and heat sum per slice, so that trace can keep the slices a block owns.
    """
    names = _file_channels(attrs, tuple(ds.shape))
    heat_name = decoders.resolve_decoder(decoder, contract.channel_names(attrs))[1]
    if heat_name not in names:
        print(f"emmito segment: no '{heat_name}' channel: the objects get no score", file=sys.stderr)
        return None
    return slice_heat_sums(labels, HeatChannel(ds, names.index(heat_name)))


def write_block(out: Any, labels: np.ndarray, attrs: dict[str, Any], scores: np.ndarray | None) -> None:
    """seg/block_{b}.h5: the labels with the heat file's frame, and their score rows where there are some."""
    with create_volume(
        out, labels.shape, np.uint32, voxel_size=contract.voxel_size(attrs), offset=contract.offset(attrs),
        attrs=contract.frame_attrs(attrs),
    ) as ds:
        ds[...] = labels
        if scores is not None:
            write_table(ds, contract.SLICE_SCORES, scores, contract.SLICE_SCORE_COLUMNS)


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito segment HEAT OUT [--decoder-settings JSON]``: heat/block_{b}.h5 -> seg/block_{b}.h5 (block-local ids)."""
    runtime.keep_freed_memory()
    with open_volume(args.heat) as ds:
        attrs = contract.read_attrs(ds)
        decoder, support = check_heat_file(args.heat, ds, attrs, params)
        section = segment_settings(params, decoder, attrs, getattr(args, "decoder_settings", None))
        embedding_range = float(attrs.get(contract.EMBEDDING_RANGE, embedding.DEFAULT_EMBEDDING_RANGE))
        labels = decoders.decode(
            heat_channels(ds, attrs), section, progress=True, support=support, embedding_range=embedding_range
        )
        scores = block_scores(ds, attrs, params["segment"]["decoder"], labels)
    print(f"emmito segment: {int(labels.max())} objects in {labels.shape[0]} slices ({decoder})", file=sys.stderr)
    write_block(args.out, labels, attrs, scores)
