"""`tbcm serve`, `tbcm loadtest`: the BentoML service and load tester (filled in by service/)."""
from __future__ import annotations


def register(sub) -> None:
    return None
