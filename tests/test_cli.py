import subprocess
import sys

import pytest

from dreamblend_ray.cli import COMMANDS, main


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("dreamblend-ray ")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: dreamblend" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dreamblend_ray.cli", "version"],
                         capture_output=True, text=True, check=True).stdout
    assert "dreamblend-ray" in out


def _exit_codes_listed(help_text: str) -> set[int]:
    import re

    block = help_text.split("exit codes:", 1)[1]
    return {int(code) for code in re.findall(r"^\s+(\d+)\s", block, flags=re.MULTILINE)}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_lists_its_exit_codes(command, capsys):
    from dreamblend_ray.runtime import exit_codes

    with pytest.raises(SystemExit):
        main([command, "--help"])
    listed = _exit_codes_listed(capsys.readouterr().out)
    assert set(exit_codes.COMMON) <= listed
    if command == "submit":
        assert exit_codes.FAILED in listed


@pytest.mark.parametrize("script, partial", [("jobs/finetune_subjects.py", True),
                                             ("jobs/generate_batch.py", True),
                                             ("jobs/evaluate.py", False)])
def test_every_job_script_lists_its_exit_codes(script, partial):
    from pathlib import Path

    from dreamblend_ray.runtime import exit_codes

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True,
                         check=True, cwd=root).stdout
    listed = _exit_codes_listed(out)
    assert set(exit_codes.COMMON) <= listed
    assert (exit_codes.PARTIAL in listed) == partial



# ------------------------------------------------------------------ one flag per setting (issue 17)

def _parsers() -> dict:
    """Every `dreamblend` subcommand's parser and every job script's, by where users meet it."""
    import argparse

    import dreamblend_ray.embedded.scorer  # noqa: F401 - as jobs/finetune_subjects.py: --choose-pair embedded
    from dreamblend_ray import cli
    from dreamblend_ray.commands import evaluate
    from dreamblend_ray.jobs import cli as job_cli

    parsers = {f"dreamblend {name}": sub for action in cli.build_parser()._actions
               if isinstance(action, argparse._SubParsersAction) for name, sub in action.choices.items()}
    parsers["jobs/finetune_subjects.py"] = job_cli.finetune_parser()
    parsers["jobs/generate_batch.py"] = job_cli.generate_parser()
    parsers["jobs/evaluate.py"] = evaluate.build_parser()
    return parsers


def _shown_default(cls, name: str) -> str:
    from dataclasses import MISSING, fields

    field = {f.name: f for f in fields(cls)}[name]
    value = field.default if field.default is not MISSING else field.default_factory()
    if value == ():
        return "none"
    return "auto" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _exposed() -> dict:
    """The config class each parser takes settings of, and the fields it leaves out (and why)."""
    from dreamblend_ray.config import FinetuneConfig, SamplingConfig

    evaluate = (SamplingConfig, {"layers", "alpha", "return_reference"})  # alpha per method: --alphas
    return {"dreamblend finetune": (FinetuneConfig, set()),
            "jobs/finetune_subjects.py": (FinetuneConfig, {"device"}),  # actors pick theirs
            "dreamblend generate": (SamplingConfig, {"layers"}),  # nested: JSON only
            "jobs/generate_batch.py": (SamplingConfig, {"layers", "return_reference"}),  # --settings-json
            "dreamblend evaluate": evaluate, "jobs/evaluate.py": evaluate}


@pytest.mark.parametrize("where", list(_exposed()))
def test_every_setting_has_one_flag_named_after_its_field(where):
    from dreamblend_ray import config

    cls, left_out = _exposed()[where]
    parser = _parsers()[where]
    fields = set(config.settings_of(cls))
    by_dest: dict[str, list] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
        for flag in action.option_strings:
            name = flag.removeprefix("--").replace("-", "_")
            if name in fields:  # no hand-written flag spells a setting under another dest
                assert action.dest == name, (where, flag, action.dest)
    assert fields & set(by_dest) == fields - left_out, where
    for name in fields - left_out:
        (action,) = by_dest[name]
        assert action.option_strings[0] == config.flag_name(name), (where, action.option_strings)
        assert action.default is None, (where, name)
        assert f"(default: {_shown_default(cls, name)})" in action.help, (where, name, action.help)


def test_shared_job_flags_have_one_spelling():
    """--base, --address and the actor pool: one flag name per job and command (older spellings as aliases)."""
    parsers = _parsers()
    for where in ("jobs/finetune_subjects.py", "jobs/generate_batch.py", "jobs/evaluate.py", "dreamblend evaluate"):
        flags = {flag for action in parsers[where]._actions for flag in action.option_strings}
        assert {"--base", "--address", "--num-actors", "--gpus-per-actor"} <= flags, where
    args = parsers["jobs/evaluate.py"].parse_args(["--subjects", "s", "--checkpoints", "c", "--output", "o",
                                                   "--actors", "3"])
    assert args.num_actors == 3 and args.gpus_per_actor is None
    for where in ("dreamblend finetune", "dreamblend evaluate", "jobs/finetune_subjects.py",
                  "jobs/generate_batch.py"):
        (base,) = [a for a in parsers[where]._actions if "--base" in a.option_strings]
        assert base.default == "embedded", where
    (base,) = [a for a in parsers["dreamblend generate"]._actions if "--base" in a.option_strings]
    assert base.default is None  # the base the subject's subject.json records


def test_older_spellings_build_the_same_config():
    from dreamblend_ray.commands.finetune import config_from_args
    from dreamblend_ray.config import FinetuneConfig
    from dreamblend_ray.jobs.cli import finetune_config_from_args

    parsers = _parsers()
    common = ["--images", "x", "--class-noun", "dog", "--subject-id", "rex", "--output", "o"]
    old = parsers["dreamblend finetune"].parse_args(common + [
        "--lr", "0.001", "--grad-accum", "2", "--full", "--prior-images", "0", "--checkpoint-steps", "100,200,400"])
    new = parsers["dreamblend finetune"].parse_args(common + [
        "--learning-rate", "0.001", "--gradient-accumulation-steps", "2", "--method", "full",
        "--num-class-images", "0", "--prior-preservation", "false", "--checkpoint-steps", "100", "200", "400"])
    expected = FinetuneConfig(learning_rate=0.001, gradient_accumulation_steps=2, method="full", num_class_images=0,
                              prior_preservation=False, checkpoint_steps=(100, 200, 400))
    assert config_from_args(old) == config_from_args(new) == expected
    job = parsers["jobs/finetune_subjects.py"].parse_args([
        "--subjects", "s", "--output", "o", "--steps", "4", "--checkpoint-steps", "2,4", "--no-prior-preservation",
        "--config-json", '{"rank": 2, "steps": 9}'])
    assert finetune_config_from_args(job) == FinetuneConfig(steps=4, checkpoint_steps=(2, 4), prior_preservation=False,
                                                            rank=2)  # the flags win over --config-json
