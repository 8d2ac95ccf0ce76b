"""Smoke test of benchmarks/curation.py --quick: it runs end to end and prints its ratios and summary.

No timing is asserted: the machine is shared, so the benchmark's PASS/FAIL verdicts are for
a person reading its output, not for CI. What a user would notice breaking is asserted: the
script crashing, a part silently missing, or numbers that are not numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "curation.py"
TUXPAINT = Path("/usr/share/tuxpaint/stamps")


@pytest.mark.slow  # ~45 s: most of it is the scorers' model loading on one thread
def test_curation_benchmark_quick_prints_ratios_and_writes_json(tmp_path: Path) -> None:
    """`--quick` exits 0, prints every part's ratio line and the summary, and writes the same numbers as JSON."""
    out = tmp_path / "curation.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    stdout = done.stdout

    # (1) and (3): a ratio against the baseline measured in the same run, as a number.
    ours_vs_naive = re.search(r"\(1\) ratio decode\+resize\+pHash ours/naive: (\d+\.\d+)x", stdout)
    assert ours_vs_naive, stdout
    dvc_vs_md5 = re.search(r"\(3\) ratio dvc add/md5sum, default cache, [^:]+: (\d+\.\d+)x", stdout)
    assert dvc_vs_md5, stdout
    assert re.search(r"\(3\) ratio dvc add/md5sum, cache.type hardlink: \d+\.\d+x", stdout), stdout
    # (2): recall and growth of the dedup at the largest quick size.
    assert re.search(r"\(2\) recall at 100,000: perceptual \d\.\d{4}, semantic \d\.\d{4}", stdout), stdout
    # (4): the per-stage table names the slowest stage.
    assert "slowest stage: " in stdout and "<- slowest" in stdout, stdout
    assert "\nsummary\n" in stdout

    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert math.isclose(results["hash"]["speedup"], float(ours_vs_naive.group(1)), rel_tol=0.01)
    assert math.isclose(results["dvc"]["ratio_default"], float(dvc_vs_md5.group(1)), rel_tol=0.01)
    assert results["dvc"]["bytes"] >= 20 * 2**20  # really hashed the quick-sized shards
    assert [row["n"] for row in results["dedup"]["scale"]] == [10_000, 100_000]
    stack = results["stack"]
    assert stack["images"] == min(64, len(list(TUXPAINT.rglob("*.png"))))
    assert stack["slowest"] in stack["images_per_s"]
    assert all(v > 0 and math.isfinite(v) for v in stack["images_per_s"].values()), stack["images_per_s"]
    # Every scorer of the default config has its own row, so the slowest filter is visible.
    assert {f"scorer: {name}" for name in ("technical", "brisque", "ocr", "safety", "features", "aesthetic")} <= set(
        stack["images_per_s"]
    )
    assert {row["status"] for row in results["summary"]} <= {"PASS", "FAIL", "SKIP", "INFO"}


TRAIN_SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


@pytest.mark.slow  # ~30-60 s: two fresh worker processes import torch, Lightning and MLflow
def test_train_throughput_benchmark_quick_compares_both_loops_and_plans_30b(tmp_path: Path) -> None:
    """`--quick` runs our stack and the plain loop, logs to MLflow, prints the ratio, FLOP fraction and 30B plan."""
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    stdout = done.stdout
    ratio = re.search(r"ratio images/s ours/plain, tiny @4: (\d+\.\d+)", stdout)
    assert ratio, stdout
    assert re.search(r"model FLOP/s of ours, tiny @4: \d+ GFLOP/s = \d+\.\d% of the measured bf16 matmul rate", stdout)
    assert "29,378,365,504 (29.38B)" in stdout and "73,728" in stdout, stdout  # the 30B plan at Movie Gen's context

    results = json.loads(out.read_text())
    (case,) = results["cases"]
    assert (case["preset"], case["batch"]) == ("tiny", 4)
    assert math.isclose(case["ratio"], float(ratio.group(1)), rel_tol=0.01)
    for variant in ("ours", "plain"):
        (run,) = case["runs"][variant]
        assert run["steps"] == 3 and run["images_per_s"] > 0 and math.isfinite(run["images_per_s"]), run
        assert run["peak_rss"] >= run["rss_after_imports"] > 0, run  # each run measured in its own process
        assert run["threads"] == case["runs"]["ours"][0]["threads"], "A and B must use the same thread count"
    # A really went through the stage's MLflow logging: train/loss points are in the store.
    assert case["metrics_logged"] >= 1
    assert case["runs"]["ours"][0]["precision"] == case["runs"]["plain"][0]["precision"] == results["precision"]
    assert case["model_flops_per_s"]["ours"] > 0 and results["matmul_gflops"]["ceiling"]["bf16"] > 0
    big = results["moviegen_30b"]
    assert big["params"] == 29_378_365_504 and big["tokens"] == 73_728
    assert big["step_seconds"]["512x512"] == pytest.approx(big["gpu_seconds_per_sample"])


SERVING_SCRIPT = ROOT / "benchmarks" / "serving.py"


@pytest.mark.slow  # ~60 s: two real `reelforge serve` processes load an untrained demo-latent model
def test_serving_benchmark_quick_measures_both_servers_and_prints_the_ratio(tmp_path: Path) -> None:
    """`--quick` drives a max_batch 8 and a max_batch 1 server at 1 and 8 clients and prints the throughput ratio."""
    out = tmp_path / "serving.json"
    done = subprocess.run([sys.executable, str(SERVING_SCRIPT), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    ratio = re.search(r"ratio throughput max_batch 8 / max_batch 1 at 8 clients: (\d+\.\d+)x", done.stdout)
    assert ratio, done.stdout
    assert re.search(r"^(PASS|FAIL): micro-batching at 8 clients", done.stdout, re.M), done.stdout
    results = json.loads(out.read_text())
    for key in ("batch8@1", "batch8@8", "batch1@1", "batch1@8"):
        row = results["summary"][key]
        assert row["errors"] == 0 and row["throughput"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0, (key, row)
    assert math.isclose(results["ratios"]["8"], float(ratio.group(1)), rel_tol=0.01)
