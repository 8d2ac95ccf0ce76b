"""Distilled student vs its teacher: sampling speed and quality on the same prompts, in one run.

What is measured:

  speed    The teacher samples at --teacher-steps (default 50, Movie Gen's ~50 with the
           linear-quadratic schedule) with classifier-free guidance (cond + uncond in one batched
           forward per step); the student at its own steps (config.json "sampling") with the
           guidance scale as an input (one forward per step). Same batch of --batch prompts,
           same seed, same guidance scale. One warm-up call each, then --repeats timed calls
           alternating A B B A ... (so drift in machine load hits both), medians of wall time
           per batch. Speedup = teacher median / student median, end to end (prompt strings in:
           text encoder + sampler + decoder, what a request costs; the target's figure) and for
           the sampler + decoder alone (prompts embedded beforehand).
  quality  Both generate one image per prompt of the recipe's evaluation prompt set (seed =
           evaluate.sampling.seed + prompt index, as the evaluate stage does), scored with the
           evaluate stage's own code (components.evaluate.stage.score_images against the curated
           dataset's reference features, _reference): text-image alignment (kNN caption
           alignment, higher is better) and FID (EfficientNet-Lite0 features against the val
           split, lower is better; not comparable with published Inception FIDs).

Targets (issue 5): speedup >= 10x, student alignment >= 90% of the teacher's, student FID
<= 110% of the teacher's. Printed as PASS / FAIL; the script exits 0 either way (a shared
machine is not a CI gate) unless --strict.

Usage:
    .venv/bin/python benchmarks/distill_sampling.py --teacher work/out/quality_tune --student work/out/distill \
        --dataset work/out/curate --recipe demo
    .venv/bin/python benchmarks/distill_sampling.py --quick     # builds its own tiny teacher + student, ~1-2 min
    .venv/bin/python benchmarks/distill_sampling.py --quick --json out.json

--quick curates a few synthetic images, takes an UNTRAINED tiny teacher (random weights) and
distils it for a handful of steps: a smoke test of the whole path whose quality figures say
nothing about distillation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

SPEEDUP_TARGET = 10.0
QUALITY_TOLERANCE = 0.10  # student alignment >= 90% of the teacher's, FID <= 110%

QUICK_DISTILL = {
    "distill.teachers": [{"source": "tuned"}],
    "distill.steps": 8, "distill.round_steps": 4, "distill.batch_size": 8, "distill.warmup_steps": 1,
    "distill.teacher_steps": 16, "distill.student_steps": 4, "distill.checkpoint_every": 0,
    "distill.precision": "32-true", "evaluate.grid_prompts": 4, "evaluate.max_prompts": 12,
}


def build_quick(workdir: Path) -> tuple[Path, Path, Path, Any]:
    """(teacher, student, dataset, recipe) for --quick: curated synthetic discs, an untrained tiny teacher,
    and a student distilled from it by the distill stage in a few steps."""
    from components import tracking
    from components.config import load_recipe
    from components.distill.stage import run as distill
    from tests.conftest import curated_discs, write_model_dir

    os.environ.setdefault("REELFORGE_CACHE_DIR", str(workdir / "cache"))
    dataset = curated_discs(workdir)
    teacher = write_model_dir(workdir / "teacher", seed=0)
    recipe = load_recipe("tiny", QUICK_DISTILL)
    distill(recipe, dataset, {"tuned": teacher}, workdir / "student", tracking.NullTracker())
    return teacher, workdir / "student", dataset, recipe


def time_sampling(teacher: Any, student: Any, prompts: Any, teacher_steps: int, guidance: float, seed: int,
                  repeats: int) -> dict[str, Any]:
    """Median seconds per batch of the teacher (CFG, `teacher_steps`) and the student (its steps), alternated.

    `prompts` are strings (end to end: text encoding + sampling + decoding, what a request costs)
    or precomputed TextEmbeddings (sampling + decoding only).
    """
    size = len(prompts)
    calls = {
        "teacher": lambda: teacher.generate_tensor(prompts, steps=teacher_steps, guidance=guidance, seed=seed,
                                                   batch_size=size),
        "student": lambda: student.generate_tensor(prompts, guidance=guidance, seed=seed, batch_size=size),
    }
    for call in calls.values():  # warm-up: allocations, kernel selection, lazy init
        call()
    seconds: dict[str, list[float]] = {"teacher": [], "student": []}
    for index in range(repeats):
        order = ("teacher", "student") if index % 2 == 0 else ("student", "teacher")
        for name in order:
            started = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {"seconds": seconds, "median_s": medians, "speedup": medians["teacher"] / medians["student"]}


def score(generator: Any, prompts: list[Any], steps: int | None, guidance: float, seed: int, context: dict) -> dict:
    """Alignment and FID of one model's images for the prompt set (the evaluate stage's scoring)."""
    from components.evaluate.stage import score_images

    images = generator.generate_tensor([p.text for p in prompts], steps=steps, guidance=guidance,
                                       seed=[seed + i for i in range(len(prompts))])
    scored = score_images(images, prompts, context["pooled"], context["reference"], context["extractor"],
                          context["knn"])
    return {k: float(v) for k, v in scored.metrics.items()}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the table and verdicts (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help="teacher model directory (e.g. the quality_tune output)")
    parser.add_argument("--student", type=Path, help="distilled student model directory (the distill output)")
    parser.add_argument("--dataset", type=Path, help="curated dataset the reference features come from")
    parser.add_argument("--recipe", default="demo", help="recipe whose evaluate section gives prompts, guidance, "
                        "seed, knn and feature size (default: demo; --quick: tiny)")
    parser.add_argument("--teacher-steps", type=int, default=50, help="teacher sampling steps (default: 50)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per timed batch (default: 8)")
    parser.add_argument("--repeats", type=int, default=6, help="timed calls per model (default: 6)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--quick", action="store_true", help="build a tiny untrained teacher + student (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import torch

    from components.config import load_recipe
    from components.evaluate.prompts import load_prompts
    from components.evaluate.stage import _reference
    from components.training import configure_torch
    from models.generate import TextToImage
    from models.text_encoder import TextEncoder
    from models.vision_features import ImageFeatureExtractor

    configure_torch(args.threads)
    scratch = None
    if args.quick:
        scratch = tempfile.TemporaryDirectory(prefix="reelforge-distill-bench-")
        args.teacher, args.student, args.dataset, recipe = build_quick(Path(scratch.name))
        args.repeats = min(args.repeats, 3)
    else:
        missing = [flag for flag, value in (("--teacher", args.teacher), ("--student", args.student),
                                            ("--dataset", args.dataset)) if value is None]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --quick)")
        recipe = load_recipe(args.recipe)
    config = recipe.evaluate
    teacher_config = json.loads((args.teacher / "config.json").read_text(encoding="utf-8"))
    encoder = TextEncoder(model_path=teacher_config["text"].get("model_path"),
                          max_tokens=int(teacher_config["text"]["max_tokens"]))
    teacher = TextToImage.from_dir(args.teacher, text_encoder=encoder)
    student = TextToImage.from_dir(args.student, text_encoder=encoder)
    if not student.distilled:
        parser.error(f"--student {args.student} is not a distilled model (no guidance_embed)")
    guidance, seed = float(config.sampling.guidance), int(config.sampling.seed)
    student_steps = student.default_steps

    prompts = load_prompts(config.prompts, config.max_prompts)
    batch_prompts = [p.text for p in prompts[: args.batch]]
    print(f"device: CPU, {torch.get_num_threads()} threads (timings are wall clock on a possibly shared machine)")
    print(f"teacher: {args.teacher} ({sum(p.numel() for p in teacher.model.parameters()):,} parameters, "
          f"depth {teacher.model.config.depth}), {args.teacher_steps} steps, CFG {guidance} (2 forwards/step)")
    print(f"student: {args.student} ({sum(p.numel() for p in student.model.parameters()):,} parameters, "
          f"depth {student.model.config.depth}), {student_steps} steps, guidance input {guidance} (1 forward/step)")
    timing = {}
    with torch.inference_mode():
        timing["end_to_end"] = time_sampling(teacher, student, batch_prompts, args.teacher_steps, guidance, seed,
                                             args.repeats)
        timing["sampler"] = time_sampling(teacher, student, encoder.encode(batch_prompts), args.teacher_steps,
                                          guidance, seed, args.repeats)
    for kind, what in (("end_to_end", "end to end (text encoder + sampler + decoder)"),
                       ("sampler", "sampler + decoder (prompts embedded beforehand)")):
        print(f"\nspeed, {what}, batch of {len(batch_prompts)}, median of {args.repeats} alternated calls:")
        for name in ("teacher", "student"):
            median = timing[kind]["median_s"][name]
            print(f"  {name:8s} {median * 1000:9.1f} ms/batch  {median * 1000 / len(batch_prompts):8.2f} ms/image")
        print(f"  speedup student vs teacher@{args.teacher_steps}, {kind.replace('_', ' ')}: "
              f"{timing[kind]['speedup']:.1f}x")

    extractor = ImageFeatureExtractor(input_size=config.feature_resolution)
    reference, _ = _reference(args.dataset, encoder, extractor)
    context = {"pooled": encoder.encode([p.text for p in prompts]).pooled.numpy(), "reference": reference,
               "extractor": extractor, "knn": config.knn}
    quality = {"teacher": score(teacher, prompts, args.teacher_steps, guidance, seed, context),
               "student": score(student, prompts, None, guidance, seed, context)}
    print(f"\nquality on {len(prompts)} prompts of '{config.prompts}' (evaluate stage scoring):")
    print(f"  {'':8s} {'alignment':>10s} {'fid':>10s}")
    for name in ("teacher", "student"):
        print(f"  {name:8s} {quality[name]['alignment']:10.4f} {quality[name]['fid']:10.2f}")
    alignment_ratio = quality["student"]["alignment"] / quality["teacher"]["alignment"] \
        if quality["teacher"]["alignment"] else float("nan")
    fid_ratio = quality["student"]["fid"] / quality["teacher"]["fid"] if quality["teacher"]["fid"] else float("nan")
    print(f"  ratio student/teacher: alignment {alignment_ratio:.3f}, fid {fid_ratio:.3f}")

    verdicts = {
        f"speedup >= {SPEEDUP_TARGET:.0f}x (end to end)": timing["end_to_end"]["speedup"] >= SPEEDUP_TARGET,
        f"alignment >= {1 - QUALITY_TOLERANCE:.0%} of teacher": alignment_ratio >= 1 - QUALITY_TOLERANCE,
        f"fid <= {1 + QUALITY_TOLERANCE:.0%} of teacher": fid_ratio <= 1 + QUALITY_TOLERANCE,
    }
    print("\nsummary" + (" (--quick: untrained teacher, smoke test only)" if args.quick else "") + ":")
    for name, passed in verdicts.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(json.dumps({
            "teacher": str(args.teacher), "student": str(args.student), "teacher_steps": args.teacher_steps,
            "student_steps": student_steps, "batch": len(batch_prompts), "timing": timing, "quality": quality,
            "alignment_ratio": alignment_ratio, "fid_ratio": fid_ratio, "verdicts": verdicts, "quick": args.quick,
        }, indent=2, default=float) + "\n", encoding="utf-8")
    if scratch is not None:
        scratch.cleanup()
    return 1 if args.strict and not all(verdicts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
