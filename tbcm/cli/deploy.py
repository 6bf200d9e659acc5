"""`tbcm deploy FOLDER --url URL`: score a candidate student before it goes live, refuse it below the live model's
bar, else hot-swap it in through /admin/swap as `tbcm swap` does.

Both models are scored the same way, by the shapes world's evaluator (tbcm.world.evaluate: one step, FD,
attribute accuracy, precision and recall) at the gate's n and seed on every split (tbcm/service/gate.py holds
the knobs and the comparison). The live model is the one GET /info names: its folder is scored here when it
exists here (or at --live-folder) with the manifest hash the server reports; otherwise the scores its manifest
records stand in, only when they were measured the same way (same n, seed 0, shipped evaluator); otherwise the
deploy is refused, saying why. A folder the shapes evaluator cannot score (not a shapes-world student: a teacher,
a real Sana folder, another image size) is refused unless --no-gate.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tbcm.cli.options import add_config_options, config_from_args
from tbcm.models.card import is_shapes_world
from tbcm.models.pipeline import load_pipeline, resolve_model, shown_path
from tbcm.service.client import ServiceClient, admin_token, error_message
from tbcm.service.gate import GateConfig, Verdict, compare, recorded_scores
from tbcm.service.runtime import folder_manifest_sha256
from tbcm.world.evaluate import EvalConfig, evaluate
from tbcm.world.evaluator import Evaluator
from tbcm.world.sources import SPLITS


class GateError(ValueError):
    """The gate cannot compare the candidate with the live model (not scorable, or no bar to compare with)."""


def register(sub) -> None:
    d = sub.add_parser("deploy", help="hot-swap a student into a running service only if it scores within "
                       "tolerance of the live one (needs TBCM_ADMIN_TOKEN)")
    d.add_argument("folder", help="the candidate pipeline folder, as this machine sees it")
    d.add_argument("--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:3000")
    d.add_argument("--server-path", default=None,
                   help="the candidate folder as the server sees it (default: FOLDER's absolute path)")
    d.add_argument("--live-folder", default=None, help="a copy here of the live model's folder, to score it "
                   "(default: the path /info reports); must have the live manifest's sha256")
    d.add_argument("--no-gate", action="store_true", help="swap without scoring (any model the server can serve)")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server's load + warm-up")
    add_config_options(d, GateConfig)
    d.set_defaults(handler=deploy)


def connect(url: str) -> ServiceClient:
    return ServiceClient(url)


def not_scorable(info: dict, evaluator_size: int) -> str | None:
    """Why the shapes evaluator cannot score a folder, from its tbcm.json (None: it can)."""
    if info.get("kind") != "student":
        return f"it is {'a ' + info['kind'] if info.get('kind') else 'not a tbcm folder (no kind in tbcm.json)'}," \
               f" not a one-step student"
    if not is_shapes_world(info):
        return "it is no shapes-world student (its tbcm.json records no vae_run), so the shapes evaluator says nothing"
    if info.get("image_size") != evaluator_size:
        return f"it renders {info.get('image_size')} px images; the shapes evaluator scores {evaluator_size} px"
    return None


def score(folder: Path, config: GateConfig) -> dict:
    """{split: tbcm eval's result} of a one-step student, at the gate's n and seed."""
    pipe = load_pipeline(folder)
    return {split: evaluate(EvalConfig(model=str(folder), steps=1, prompts=split, n=config.n, seed=config.seed,
                                       evaluator=config.evaluator), pipe) for split in config.split_list()}


def live_scores(live: dict, config: GateConfig, live_folder: str | None) -> tuple[dict, str]:
    """(the live model's scores, where they came from): its folder scored here, else its manifest's records."""
    path, spec = Path(live_folder or live["path"]), live["spec"]
    if path.is_dir():
        local = folder_manifest_sha256(path)
        if local == live["manifest_sha256"]:
            return score(path, config), f"{spec!r} scored here from {shown_path(path)}, n {config.n}, seed " \
                                        f"{config.seed}"
        here = f"{shown_path(path)} here has manifest sha256 {local[:12]}, the live model's is " \
               f"{live['manifest_sha256'][:12]}"
    else:
        here = f"its folder {shown_path(path)} is not on this machine"
    scores, why = recorded_scores(live["manifest"], config)
    if scores is None:
        raise GateError(f"no bar to compare with: the live model {spec!r} cannot be scored here ({here}; "
                        f"--live-folder names a copy) and {why}")
    return scores, f"{spec!r}: {why} ({here})"


def gate(folder: Path, live: dict, config: GateConfig, live_folder: str | None) -> Verdict:
    unknown = sorted(set(config.split_list()) - set(SPLITS))
    if unknown:
        raise GateError(f"splits: {', '.join(unknown)} not among {', '.join(SPLITS)}")
    size = Evaluator.load(Path(config.evaluator)).config["image_size"]
    info = json.loads((folder / "tbcm.json").read_text()) if (folder / "tbcm.json").exists() else {}
    for what, problem in ((f"the candidate {shown_path(folder)}", not_scorable(info, size)),
                          (f"the live model {live['spec']!r}", not_scorable(live["manifest"], size))):
        if problem:
            raise GateError(f"{what} cannot be scored by the shapes world's evaluator ({config.evaluator}): "
                            f"{problem}; --no-gate swaps without scoring")
    bar, source = live_scores(live, config, live_folder)
    return compare(score(folder, config), bar, config, source)


def deploy(args) -> int:
    config = config_from_args(GateConfig, args)
    token = admin_token()  # before scoring: a missing token fails in seconds
    if config.threads:
        torch.set_num_threads(config.threads)
    folder = resolve_model(args.folder)
    client = connect(args.url)
    live = client.live()
    if args.no_gate:
        print(f"tbcm deploy: --no-gate: {shown_path(folder)} is not scored", file=sys.stderr)
    else:
        verdict = gate(folder, live, config, args.live_folder)
        print(verdict.table())
        if not verdict.passed:
            print(f"tbcm deploy: refused {shown_path(folder)}, below the live model {live['spec']!r}'s bar: "
                  f"{verdict.reason(config)}. {live['spec']!r} stays live.", file=sys.stderr)
            return 1
    target = args.server_path or str(folder.resolve())
    response = client.swap(target, token, args.timeout)
    if response.status_code != 200:
        print(f"tbcm deploy: the server refused the swap to {target!r} ({response.status_code}): "
              f"{error_message(response)}", file=sys.stderr)
        return 1
    now, expected = response.json()["live"], folder_manifest_sha256(folder)
    if now["manifest_sha256"] != expected:
        print(f"tbcm deploy: the server loaded {target!r} with manifest sha256 {now['manifest_sha256'][:12]}, not "
              f"the scored folder's {expected[:12]}: check --server-path", file=sys.stderr)
        return 1
    print(f"deployed: {shown_path(now['spec'])} is live (manifest sha256 {expected[:12]}, loaded in "
          f"{now['load_seconds']} s)")
    return 0
