#!/usr/bin/env bash
# `make check-latest`: install the newest versions pyproject.toml admits (torch held at the lock's) into a throwaway
# venv, list every package that differs from requirements.lock, then run the fast tests (not marked slow) there.
# Exit status: the tests'. Not in CI: it is how drift is found on purpose, before a fresh clone finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "$(grep -E '^torch==' requirements.lock)"
"${pip[@]}" --upgrade -e ".[test]"
echo "== newest versions that differ from requirements.lock (package: locked -> newest)"
"$venv/bin/python" - <<'PY'
import re, subprocess, sys
from pathlib import Path
from packaging.utils import canonicalize_name as name
locked = dict(re.findall(r"^([A-Za-z0-9._-]+)==([^\s;]+)", Path("requirements.lock").read_text(), re.M))
locked = {name(k): v for k, v in locked.items()}
frozen = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                        capture_output=True, text=True, check=True).stdout
# a local build's label (torch 2.13.0+cpu) is the same release as the lock's plain version
newest = {name(k): v.split("+")[0] for k, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", frozen, re.M)}
rows = [f"{k}: {locked.get(k, 'not locked')} -> {v}" for k, v in sorted(newest.items())
        if locked.get(k) != v and k not in ("pip", "setuptools", "wheel")]
rows += [f"{k}: {v} -> not installed" for k, v in sorted(locked.items()) if k not in newest]
print("\n".join(rows) or "none: the lock is the newest")
PY
echo "== fast tests against the newest versions"
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" || status=$?
if [ "$status" -ne 0 ]; then
    echo "check-latest: the newest versions above break the test named there; keep the lock, and bound the range" \
         "in pyproject.toml if the break is theirs" >&2
fi
exit "$status"
