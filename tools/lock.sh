#!/usr/bin/env bash
# `make lock`: re-resolve requirements.lock (every extra) and requirements-serve.lock (serving's share, at the same
# versions) from pyproject.toml's ranges, with torch held at the version given as $1 (the Makefile's TORCH).
# The lock is for CPython 3.11 on x86-64 Linux. uv looks only where it is told, so the local folder of wheels that
# pip is configured with (PIP_FIND_LINKS or pip's find-links setting), where the local torch build lies, is passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
torch=$1
uv=.venv/bin/uv
links=${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}
compile=("$uv" pip compile --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --quiet --upgrade
         --custom-compile-command "make lock" ${links:+--find-links "$links"})
echo "$torch" | "${compile[@]}" pyproject.toml - --all-extras -o requirements.lock
echo "$torch" | "${compile[@]}" pyproject.toml - --extra serve -c requirements.lock -o requirements-serve.lock
# a local build's label (2.13.0+cpu) would tie the lock to it: the plain version is met by the CPU and CUDA builds
sed -i 's/^torch==\([0-9.]*\)+[a-z0-9.]*$/torch==\1/' requirements.lock requirements-serve.lock
