"""`dreamblend audit`: the audit trail of a storage root, as JSON lines.

    dreamblend audit --storage-root s3://bucket/dreamblend --since 2026-12-01 --tenant acme
    dreamblend audit --storage-root /data/dreamblend --action quota.refused --limit 50

One event a line, in time order (oldest first, from ``--since`` on): time, action, tenant, key_id,
target, request_id, detail (:mod:`dreamblend_ray.lifecycle.audit` describes them). ``--limit``
keeps the first N, so ``--since`` and ``--limit`` page forward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from dreamblend_ray.runtime import exit_codes


def _day(text: str) -> str:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a UTC day as YYYY-MM-DD, got {text!r}") from None
    if len(text) != 10:
        raise argparse.ArgumentTypeError(f"expected a UTC day as YYYY-MM-DD, got {text!r}")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-root", required=True, help="the service's storage root (a local path or a URI)")
    parser.add_argument("--since", type=_day, help="first UTC day to read (YYYY-MM-DD); default: all")
    parser.add_argument("--tenant", help="only this tenant's events")
    parser.add_argument("--action", help="only this action (subject.create, subject.delete, subject.cancel, "
                                         "job.create, keys.reload, quota.refused, auth.refused)")
    parser.add_argument("--limit", type=_positive, help="print at most this many events (the oldest first)")


def run(args: argparse.Namespace) -> int:
    from dreamblend_ray.lifecycle.audit import read_events  # storage loads pyarrow: keep --help light

    events = read_events(args.storage_root, since=args.since, tenant=args.tenant, action=args.action,
                         limit=args.limit)
    for event in events:
        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()
    return exit_codes.OK
