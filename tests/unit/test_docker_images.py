"""Static checks of the component image's Dockerfile (no Docker engine here: what can be read is checked)."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "infra/docker/Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _args() -> dict[str, str]:
    return dict(value.split("=", 1) for op, value in _instructions() if op == "ARG" and "=" in value)


def test_every_base_image_is_pinned_by_digest() -> None:
    args = _args()
    froms = [value.split()[0] for op, value in _instructions() if op == "FROM"]
    assert froms
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.search(r"@sha256:[0-9a-f]{64}$", resolved), f"FROM {image} ({resolved}) is not pinned by digest"


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    users = [value for op, value in _instructions() if op == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0
    assert int(users[-1]) == 10001  # the UID the Kubernetes manifests run as (components/deploy/k8s.py)


def test_installs_are_pinned_and_nothing_is_fetched_by_url_or_at_run_time() -> None:
    for op, value in _instructions():
        if op == "RUN" and "pip install" in value:
            for command in value.split("&&"):
                if "pip install" not in command:
                    continue
                assert "torch==" in command or "-c requirements/constraints.txt" in command, command
                for spec in re.findall(r'"([A-Za-z0-9_.\[\]-]+)(==|>=|<)?([^"]*)"', command):
                    assert spec[1] == "==", f"unpinned {spec[0]} in: {command}"
        assert not (op == "ADD" and re.search(r"https?://", value)), value
        if op in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*=", value, re.I), value
    entry = [value for op, value in _instructions() if op in ("CMD", "ENTRYPOINT")]
    assert not any("pip" in value for value in entry)
