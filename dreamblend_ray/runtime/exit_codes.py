"""Exit codes of every ``dreamblend`` command and job script: one table, shown in each ``--help``."""

from __future__ import annotations

import argparse
import textwrap

OK = 0
FAILED = 1
USAGE = 2
PARTIAL = 3
INTERRUPTED = 130
TERMINATED = 143

MEANINGS = {
    OK: "success",
    FAILED: "the submitted Ray job did not succeed (its status is logged)",
    USAGE: "bad input: invalid arguments, a missing file, an unusable base model or storage root "
           "(one line on stderr says which)",
    PARTIAL: "some subjects or images failed: the others finished, and every failure is a row of the "
             "results table with its reason (--allow-failures turns this into 0)",
    INTERRUPTED: "interrupted by Ctrl-C (SIGINT), after an orderly shutdown",
    TERMINATED: "stopped by SIGTERM, after an orderly shutdown",
}
COMMON = (OK, USAGE, INTERRUPTED, TERMINATED)


def epilog(*extra: int) -> str:
    """The ``exit codes:`` block of a command's help: the common codes plus ``extra``."""
    lines = [textwrap.fill(MEANINGS[code], width=100, initial_indent=f"  {code:>3}  ",
                           subsequent_indent=" " * 7) for code in sorted(set(COMMON) | set(extra))]
    return "exit codes:\n" + "\n".join(lines)


def document(parser: argparse.ArgumentParser, *extra: int) -> argparse.ArgumentParser:
    """Append the exit-code table to ``parser``'s help (keeping any epilog it already has)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    previous = textwrap.fill(parser.epilog, width=100) if parser.epilog else None
    parser.epilog = "\n\n".join(part for part in (previous, epilog(*extra)) if part)
    return parser
