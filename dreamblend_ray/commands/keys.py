"""``dreamblend keys``: make tenant API keys and check keys files (docs/operations.md).

- ``dreamblend keys new --tenant T [--key-id ID]`` prints the keys-file entry to add (YAML, with the
  key's SHA-256) and, on its last line, the fresh key itself: shown once, stored nowhere.
- ``dreamblend keys check FILE`` parses a keys file as the service would and lists its tenants
  and key ids (never a digest), so a rotated file can be checked before it is mounted.
"""

from __future__ import annotations

import argparse
import sys
import time

from dreamblend_ray.serving import tenants


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="a fresh key and its keys-file entry (the key is the last line)")
    new.add_argument("--tenant", required=True, help="tenant id ([a-z0-9][a-z0-9-]{0,62})")
    new.add_argument("--key-id", default=None,
                     help="id of the key, shown in logs and audit records (default: TENANT-YYYYMMDD-RANDOM)")
    check = actions.add_parser("check", help="validate a keys file and list its tenants and key ids")
    check.add_argument("path", help="the keys file (YAML or JSON)")


def default_key_id(tenant: str) -> str:
    """``TENANT-YYYYMMDD-xxxxxx``: dated, unique enough, within the 64 characters of a key id."""
    return f"{tenant[:40]}-{time.strftime('%Y%m%d', time.gmtime())}-{tenants.new_key()[4:10].lower()}"


def run_new(args: argparse.Namespace) -> int:
    """Print the entry, then the key on the last line (stdout only; nothing is logged)."""
    key_id = args.key_id or default_key_id(args.tenant)
    key = tenants.new_key()
    entry = tenants.key_entry(args.tenant, key_id, key)
    sys.stdout.write(f"# add to the keys file (merge under `tenants:`); the key, on the last line, is shown once\n"
                     f"{entry}{key}\n")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Parse the file (ValueError, hence exit 2, when malformed) and list what it defines."""
    with open(args.path, encoding="utf-8") as handle:
        table = tenants.parse_keys(handle.read())
    lines = [f"{tenant.id}: priority {tenant.priority}, keys {', '.join(table.key_ids_of(tenant.id))}"
             for tenant in table.tenants.values()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_new(args) if args.action == "new" else run_check(args)
