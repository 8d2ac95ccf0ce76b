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
