"""The ``dreamblend`` command.

Each subcommand lives in ``dreamblend_ray/commands/<name>.py`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports stay inside ``run`` so that
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging

from dreamblend_ray.runtime import exit_codes

from dreamblend_ray.runtime import lifecycle

# name -> (module, one-line help)
COMMANDS = {
    "version": ("version", "print the package and key library versions"),
    "generate": ("generate", "DreamBlend images for a subject's checkpoint pair"),
    "attention": ("attention", "per-word cross-attention heat maps of G, E and DreamBlend for a checkpoint pair"),
    "finetune": ("finetune", "DreamBooth fine-tuning of one subject into a checkpoint pair"),
    "submit": ("submit", "submit the fine-tune or generate job to a running Ray cluster"),
    "serve": ("serve", "run the Ray Serve HTTP endpoint locally"),
    "subjects": ("subjects", "create, follow, cancel and delete subjects on a running service (its HTTP API)"),
    "demo": ("demo", "the main job: fine-tune demo subjects, serve, and render a DreamBlend grid"),
    "evaluate": ("evaluate", "CLIP-I / CLIP-T / DINO / diversity evaluation job"),
    "train-embedded": ("train_embedded", "train the embedded shapes-world base model"),
    "keys": ("keys", "make tenant API keys (the keys-file entry, then the key) and check keys files"),
    "audit": ("audit", "print a storage root's audit trail (creates, deletes, reloads, refusals) as JSON lines"),
}


class NotLandedError(RuntimeError):
    """Raised by a subcommand whose issue has not landed yet."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamblend", description="DreamBlend personalized text-to-image generation on Ray.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    exit_codes.document(parser, exit_codes.FAILED, exit_codes.PARTIAL)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"dreamblend_ray.commands.{module_name}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        lifecycle.add_arguments(command_parser)
        exit_codes.document(command_parser, *getattr(module, "EXIT_CODES", ()))
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = args._module
    log_dir = module.log_dir(args) if hasattr(module, "log_dir") else None
    try:
        return lifecycle.main(args.command, args, lambda: module.run(args), log_dir=log_dir)
    except NotLandedError as exc:
        logging.getLogger("dreamblend").error("%s", exc)
        return exit_codes.USAGE
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("dreamblend").error("%s", exc)
        return exit_codes.USAGE
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED


def entry() -> None:
    """The ``dreamblend`` console script: ``main``, then the process ends (storage finalized)."""
    lifecycle.exit_process(main())


if __name__ == "__main__":
    entry()
