"""One process of a multi-node pretraining TrainJob (components/pretrain/trainjob.py).

Launched by `torchrun -m components.pretrain.worker` on every node; torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE and the master address from the Trainer runtime's PET_* variables, and
Lightning's DDP/FSDP strategy picks them up. Each process downloads the inputs (by URI) into
local scratch, runs the same pretrain stage as a single-node run (the recipe comes from
$REELFORGE_RECIPE_JSON), and global rank 0 uploads the model directory to `--output`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from components import tracking
from components.config import Recipe
from components.pretrain.trainjob import RECIPE_ENV
from components.runner import RunContext, execute
from components.storage import download_dir, upload_dir


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
    scratch = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / f"reelforge-{os.environ.get('LOCAL_RANK', '0')}"
    inputs = {}
    for pair in args.input:
        name, _, uri = pair.partition("=")
        inputs[name] = download_dir(uri, scratch / "inputs" / name)
    output = scratch / "model"
    execute("pretrain", recipe, inputs, {"model": output},
            RunContext(pipeline_job_id=args.pipeline_job_id, pipeline_name=args.pipeline_name), stage=args.stage)
    if tracking.is_primary_process():
        count = upload_dir(output, args.output)
        print(f"uploaded {count} files of the model to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
