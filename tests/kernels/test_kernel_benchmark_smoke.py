"""benchmarks/bench_kernels.py runs its smoke version (every section, tiny shapes) and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the benchmark runs in full from gpu_check.sh")
def test_smoke_run_writes_every_section(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--json", str(tmp_path / "bench.json")]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["smoke"] and not report["cuda"] and report["device"] == "cpu"
    assert {"torch", "triton", "diffusers"} <= report.keys()
    sections = {row["section"] for row in report["results"]}
    assert sections == {"forward", "fwd+bwd", "jvp", "training", "generator"}
    failures = [row for row in report["results"] if "baseline_error" in row or "candidate_error" in row]
    assert failures == []
    assert "No CUDA device" in capsys.readouterr().out
