"""The CLI fails early and clearly on bad recipes, and every verb has help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import STAGE_VERBS, build_parser, main


def test_misspelled_recipe_key_fails_before_any_work(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: typo\npretrain:\n  stpes: 10\n")
    workdir = tmp_path / "work"
    code = main(["run", "--recipe", str(recipe), "--workdir", str(workdir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "pretrain.stpes: unknown key (did you mean 'pretrain.steps'?)" in err
    assert not workdir.exists(), "nothing may be created before the recipe is valid"


def test_bad_override_is_reported(capsys) -> None:
    assert main(["run", "--recipe", "tiny", "--set", "pretrain.steps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["run", "compile", "recipes", *STAGE_VERBS])
def test_every_verb_has_help(verb: str) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([verb, "--help"])
    assert exit_info.value.code == 0


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("reelforge")
    result = subprocess.run([str(script), "recipes"], capture_output=True, text=True, check=True)
    assert {"demo", "tiny"} <= set(result.stdout.split())
