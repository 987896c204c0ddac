"""``dreamblend attention``: per-word cross-attention heat maps of G, E and DreamBlend.

The same pair sources, ``--base`` (by default the base the subject's subject.json records) and
sampling flags as ``dreamblend generate``; one sampler call per batch
returns the three trajectories' images and maps (docs/attention.md)::

    dreamblend attention --checkpoints outputs/demo/storage --subject-id striped-star \\
        --prompt "a photo of sks star beside a red circle" --seed 0 --alpha 0.5 --out outputs/attention

writes, per (prompt, seed) ``NNNN``: ``NNNN-attention.png`` (rows G / E / DreamBlend, columns the
image then one heat map per word), ``NNNN-attention.json`` (the maps, the words, the E-to-G distance
per step, the file names), ``NNNN-g.png``, ``NNNN-e.png``, ``NNNN-dreamblend.png``; and
``settings.json`` for the whole run.
"""

from __future__ import annotations

import argparse
import logging

from dreamblend_ray import config
from dreamblend_ray.commands import generate
from dreamblend_ray.config import SamplingConfig

logger = logging.getLogger(__name__)

# Every generate flag but --attention-maps, which this command always turns on.
SAMPLING_FLAGS = [name for name in generate.SAMPLING_FLAGS if name != "attention_maps"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    generate.add_arguments(parser, SAMPLING_FLAGS)


def run(args: argparse.Namespace) -> int:
    settings = config.from_args(SamplingConfig, args, SAMPLING_FLAGS, attention_maps=True)
    session = generate.open_session(args)
    records = []
    for start, chunk, result in generate.sample_batches(session, args, settings, "attention"):
        reports = generate.attention_reports_of(session, result, chunk)
        for i, report in enumerate(reports):
            index = start + i
            record = {"index": index, "prompt": report.prompt, "seed": report.seed, "words": report.words,
                      "seconds": result.seconds / len(chunk),
                      **generate.write_attention_files(session.out, f"{index:04d}", report)}
            if report.distance:
                record["mean_attention_distance"] = sum(report.distance) / len(report.distance)
            records.append(record)
    generate.write_sidecar(session, args, settings, "samples", records)
    logger.info("wrote %d heat-map grids and settings.json to %s", len(records), session.out)
    return 0
