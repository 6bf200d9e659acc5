"""The docs say what is true now: the numbers tables match the shipped folders and the benchmark JSON,
docs/results/ holds exactly the files the docs cite, and no doc or command names a path of one machine."""
from __future__ import annotations

import re
import subprocess
import sys
from itertools import product
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the docs that may cite docs/results/ files
# a cited path: docs/results/NAME, or results/NAME as docs/*.md link it; NAME may hold {a,b} and CAPS placeholders
CITED = re.compile(r"(?<![\w/])(?:docs/)?results/([\w.{},*-]+)")
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]{2,}\b")  # SPLIT, NAME, ...: stands for any part of a name
# where one machine's absolute paths must not appear: docs and the commands people copy
COMMANDS = [*DOCS, *sorted(RESULTS.glob("*.md")), ROOT / "Makefile", *sorted((ROOT / "benchmarks").glob("*.sh"))]
MACHINE_PATH = re.compile(r"(?<![\w.~$})/-])/(?:work|home|root|Users|tmp|mnt|scratch)/[^\s`'\")\]]*")


def expand(name: str) -> list[str]:
    """`a{b,c}d` -> [`abd`, `acd`] (every brace group, in order)."""
    parts = re.split(r"\{([^{}]*)\}", name)
    literal, groups = parts[0::2], [group.split(",") for group in parts[1::2]]
    return ["".join(x for pair in zip(literal, choice + ("",)) for x in pair) for choice in product(*groups)]


def cited_files() -> dict[str, list[Path]]:
    """Every docs/results/ name the docs cite -> the files it names (a placeholder matches any part)."""
    cited = {}
    for doc in DOCS:
        for match in CITED.finditer(doc.read_text()):
            raw = match.group(1).rstrip(".,")
            for name in expand(raw):
                pattern = PLACEHOLDER.sub("*", name)
                cited[f"{doc.relative_to(ROOT)}: results/{name}"] = sorted(RESULTS.glob(pattern))
    return cited


def test_numbers_tables_are_current():
    """README's and results.md's generated tables equal what tools/docs_table.py makes from the files now."""
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "docs_table.py"), "--check"], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_every_cited_results_file_exists():
    missing = [where for where, files in cited_files().items() if not files]
    assert not missing, f"cited but not in docs/results/: {missing}"


def test_every_results_file_is_cited():
    cited = {path for files in cited_files().values() for path in files}
    orphans = sorted(path.name for path in RESULTS.iterdir() if path.is_file() and path not in cited)
    assert not orphans, f"in docs/results/ but cited by no doc (README.md, docs/*.md): {orphans}"


def machine_paths(paths) -> list[str]:
    """`file:line: text` for each line naming an absolute path of one machine."""
    return [f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}" for path in paths
            for number, line in enumerate(path.read_text().splitlines(), 1) if MACHINE_PATH.search(line)]


def test_no_path_of_one_machine_in_docs_or_commands():
    found = machine_paths(COMMANDS)
    assert not found, "absolute paths of one machine (use repo-relative paths and runs/):\n" + "\n".join(found)


def test_expand_braces():
    assert expand("serving-ab-maxbatch{8,4}.json") == ["serving-ab-maxbatch8.json", "serving-ab-maxbatch4.json"]
    assert expand("a{b,c}-{d,e}") == ["ab-d", "ab-e", "ac-d", "ac-e"]
    assert expand("plain.json") == ["plain.json"]
