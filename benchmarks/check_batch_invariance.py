"""Does an image depend on the batch it is computed in? Generates the same images with the one-step generator at
microbatch 1, 2, 4 and 8 and compares each against microbatch 1, byte for byte. Prints a table and writes JSON.

    python -m benchmarks.check_batch_invariance                 # the shipped student
    python -m benchmarks.check_batch_invariance --model PATH --threads 1

The service pads every call to a fixed microbatch because, where this reports differences, a row's pixels change
with the number of rows computed beside it (docs/operators.md, §6).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from tbcm.models.generator import Generator
from tbcm.models.pipeline import load_pipeline, resolve_model

PROMPTS = ("a small red circle on the left", "a large blue square at the top")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="student", help="shipped name or pipeline folder")
    parser.add_argument("--images", type=int, default=8, help="images compared (prompts alternate, seeds 0..)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the service's default on 2 cores)")
    parser.add_argument("--json-out", default="runs/bench/batch_invariance.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_model(args.model))
    prompts, seeds = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)], list(range(args.images))
    images = {rows: Generator(pipe, microbatch=rows).generate(prompts, seeds, steps=1).images for rows in (1, 2, 4, 8)}
    rows_out = []
    for rows, batch in images.items():
        diff = (batch.int() - images[1].int()).abs()
        rows_out.append({"microbatch": rows, "images_differing": int((diff.flatten(1).amax(1) > 0).sum()),
                         "max_abs_uint8_diff": int(diff.max()), "pixels_differing": int((diff > 0).sum())})
    report = {"model": args.model, "images": args.images, "threads": args.threads, "machine": platform.platform(),
              "cpu": platform.processor(), "torch": torch.__version__, "against_microbatch_1": rows_out}
    print("| microbatch | images differing from microbatch 1 | max uint8 diff | pixels differing |\n|---|---|---|---|")
    for row in rows_out:
        print(f"| {row['microbatch']} | {row['images_differing']} / {args.images} | {row['max_abs_uint8_diff']} | "
              f"{row['pixels_differing']} |")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
