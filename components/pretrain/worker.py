"""One process of a multi-node pretraining TrainJob (components/pretrain/trainjob.py).

Launched by `torchrun -m components.pretrain.worker` on every node; torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE and the master address from the Trainer runtime's PET_* variables, and
Lightning's DDP/FSDP strategy picks them up. The inputs (by URI) are downloaded once per node
into local scratch (the first process downloads, the others reuse it); each process runs the
same pretrain stage as a single-node run (the recipe comes from $REELFORGE_RECIPE_JSON), and
global rank 0 uploads the model directory to `--output`.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

from components import tracking
from components.config import Recipe
from components.pretrain.trainjob import RECIPE_ENV
from components.runner import RunContext, execute
from components.storage import download_dir, upload_dir


def fetch_inputs(pairs: list[str], root: Path) -> dict[str, Path]:
    """Each NAME=URI input, downloaded once per node into `root`.

    The node's processes (one per GPU) share `root`: under a file lock the first one downloads
    and marks each input done; the others find the mark and read the same files.
    """
    root.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, Path] = {}
    with (root / ".lock").open("a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            for pair in pairs:
                name, _, uri = pair.partition("=")
                if not name or not uri:
                    raise SystemExit(f"error: --input {pair!r} is not NAME=URI")
                target, mark = root / name, root / f"{name}.done"
                if mark.is_file() and mark.read_text(encoding="utf-8") == uri:
                    print(f"input {name}: reusing this node's copy of {uri}", flush=True)
                else:
                    shutil.rmtree(target, ignore_errors=True)
                    download_dir(uri, target)
                    mark.write_text(uri, encoding="utf-8")
                    print(f"input {name}: downloaded {uri}", flush=True)
                inputs[name] = target
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return inputs


def main(argv: list[str] | None = None) -> int:
    """Download inputs, train the stage on this process's share, upload the model from rank 0."""
    parser = argparse.ArgumentParser(prog="python -m components.pretrain.worker",
                                     description="One process of a multi-node pretraining TrainJob.")
    parser.add_argument("--stage", required=True, help="pretraining stage name (pretrain.stages[].name)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=URI", help="an input artifact")
    parser.add_argument("--output", required=True, help="URI where rank 0 uploads the model directory")
    parser.add_argument("--pipeline-job-id", default="", help="the KFP run this job belongs to")
    parser.add_argument("--pipeline-name", default="reelforge-training", help="the pipeline of that run")
    args = parser.parse_args(argv)
    if RECIPE_ENV not in os.environ:
        print(f"error: ${RECIPE_ENV} is not set (the TrainJob passes the recipe there)", file=sys.stderr)
        return 2
    recipe = Recipe.from_json(os.environ[RECIPE_ENV])
    scratch = Path(os.environ.get("TMPDIR", tempfile.gettempdir()))
    inputs = fetch_inputs(args.input, scratch / "reelforge-inputs")
    output = scratch / f"reelforge-{os.environ.get('LOCAL_RANK', '0')}" / "model"
    execute("pretrain", recipe, inputs, {"model": output},
            RunContext(pipeline_job_id=args.pipeline_job_id, pipeline_name=args.pipeline_name), stage=args.stage)
    if tracking.is_primary_process():
        count = upload_dir(output, args.output)
        print(f"uploaded {count} files of the model to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
