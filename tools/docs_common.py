"""What the docs_table blocks share: the repo's files, the shipped folders' fingerprints and the cells of a
one-step row against the teacher's (tools/docs_table.py)."""
from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "docs/results"
STALE = "measured on an earlier student: to be re-measured"
BARS = {"fd": 1.3, "accuracy": 0.95}  # one-step bars: FD at most 1.3x the teacher's, accuracy at least 0.95x
DRAWS = (("train", "train, seed 0"), ("heldout", "held out, seed 0"), ("heldout-seed1", "held out, `--seed 1`"))
def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


@lru_cache(maxsize=None)
def sha256(path: str) -> str:
    return hashlib.sha256((ROOT / path).read_bytes()).hexdigest()


def transformer_sha(folder: str) -> str:
    return sha256(f"{folder}/transformer/diffusion_pytorch_model.safetensors")


def student_manifest() -> dict:
    return load("weights/student/tbcm.json")["manifest"]


def on_shipped_student(record: dict | None) -> bool:
    """Whether a benchmark's model record names the shipped student: by transformer sha256, else by its training
    manifest (what `tbcm.json` -> manifest holds: config, counters, eval of the run that made it)."""
    if not record:
        return False
    if record.get("transformer_sha256"):
        return record["transformer_sha256"] == transformer_sha("weights/student")
    manifest = record.get("manifest") or {}
    manifest = manifest.get("manifest", manifest)  # a whole tbcm.json, or its manifest
    return bool(manifest) and manifest == student_manifest()


def fa(row: dict) -> str:
    return f"{row['fd']:.1f} / {row['accuracy']:.3f}"


def ratio(student: dict, teacher: dict, key: str) -> str:
    return f"{student[key] / teacher[key]:.{2 if key == 'fd' else 3}f}x"


def bars_met(student: dict, teacher: dict) -> str:
    """Whether a one-step row meets both of Table 1's bars against the teacher's row."""
    met = student["fd"] / teacher["fd"] <= BARS["fd"] and student["accuracy"] / teacher["accuracy"] >= BARS["accuracy"]
    return "yes" if met else "**no**"


def se(a: float, b: float, n: int) -> float:
    return math.sqrt(a * (1 - a) / n + b * (1 - b) / n)


def table1_current() -> tuple[dict, bool]:
    table = load(f"{RESULTS}/table1.json")
    current = (table["student_transformer_sha256"] == transformer_sha("weights/student")
               and table["teacher_transformer_sha256"] == transformer_sha("weights/teacher"))
    return table, current


def steps_header(first: str) -> str:
    return (f"| {first} | train: FD / accuracy | train: precision / recall | held out: FD / accuracy "
            "| held out: precision / recall |\n|---|---|---|---|---|")


def steps_row(label: str, train: dict, heldout: dict) -> str:
    return f"| {label} | " + " | ".join(f"{fa(r)} | {r['precision']:.3f} / {r['recall']:.3f}"
                                        for r in (train, heldout)) + " |"
