"""`tbcm deploy FOLDER --url URL`: score a candidate student before it goes live, refuse it below the live model's
bar, else hot-swap it in through /admin/swap as `tbcm swap` does.

Both models are scored the same way (tbcm/service/gate.py holds the knobs and the comparison). Two shapes-world
students: by the shapes world's evaluator (tbcm.world.evaluate: one step, FD, attribute accuracy, precision and
recall) at the gate's n and seed on every split. Any other two students (of a real Sana teacher, say): by their
teacher agreement (tbcm.distill.agreement: PSNR against the teacher's images, and latent MSE, at 1, 2 and 4
steps) on the same agreement_n images of one teacher, the one the candidate's manifest records (or --teacher),
which must be the live student's teacher too (same transformer sha256), with the prompts of the candidate's
distillation (or --prompts). The live model is the one GET /info names: its folder is scored here when it exists
here (or at --live-folder) with the manifest hash the server reports; otherwise, for the shapes evaluator only,
the scores its manifest records stand in when they were measured the same way (same n, seed 0, shipped
evaluator); otherwise the deploy is refused, saying why. A teacher is never gated: refused unless --no-gate.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tbcm.cli.options import add_config_options, config_from_args
from tbcm.distill.agreement import teacher_agreement, teacher_reference
from tbcm.distill.sources import read_prompt_file
from tbcm.distill.teacher import teacher_fingerprint
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
    d.add_argument("--teacher", default=None, help="teacher agreement: the common teacher's folder (default: the "
                   "one the candidate's manifest records)")
    d.add_argument("--prompts", default=None, help="teacher agreement: a prompt file (default: the candidate's "
                   "distillation prompts, as its manifest records them)")
    d.add_argument("--no-gate", action="store_true", help="swap without scoring (any model the server can serve)")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server's load + warm-up")
    add_config_options(d, GateConfig)
    d.set_defaults(handler=deploy)


def connect(url: str) -> ServiceClient:
    return ServiceClient(url)


def not_a_student(info: dict) -> str | None:
    """Why a folder cannot be gated at all, from its tbcm.json (None: it is a one-step student)."""
    if info.get("kind") == "student":
        return None
    return f"it is {'a ' + info['kind'] if info.get('kind') else 'not a tbcm folder (no kind in tbcm.json)'}, " \
           f"not a one-step student"


def not_scorable(info: dict, evaluator_size: int) -> str | None:
    """Why the shapes evaluator cannot score a student, from its tbcm.json (None: it can)."""
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


def live_folder_here(live: dict, live_folder: str | None) -> tuple[Path | None, str]:
    """(the live model's folder on this machine, or None; what was found), matched by the manifest hash."""
    path = Path(live_folder or live["path"])
    if not path.is_dir():
        return None, f"its folder {shown_path(path)} is not on this machine"
    local = folder_manifest_sha256(path)
    if local != live["manifest_sha256"]:
        return None, f"{shown_path(path)} here has manifest sha256 {local[:12]}, the live model's is " \
                     f"{live['manifest_sha256'][:12]}"
    return path, f"{shown_path(live['spec'])!r} scored here from {shown_path(path)}"


def no_bar(live: dict, here: str, why: str = "") -> GateError:
    """The refusal when the live model cannot be scored here (`here`: what was found) and has no other bar (`why`)."""
    return GateError(f"no bar to compare with: the live model {live['spec']!r} cannot be scored here ({here}; "
                     f"--live-folder names a copy){' and ' + why if why else ''}")


def live_scores(live: dict, config: GateConfig, live_folder: str | None) -> tuple[dict, str]:
    """(the live model's shapes-evaluator scores, where they came from): its folder scored here, else its
    manifest's records."""
    path, here = live_folder_here(live, live_folder)
    if path is not None:
        return score(path, config), f"{here}, n {config.n}, seed {config.seed}"
    scores, why = recorded_scores(live["manifest"], config)
    if scores is None:
        raise no_bar(live, here, why)
    return scores, f"{live['spec']!r}: {why} ({here})"


def agreement_verdict(folder: Path, info: dict, live: dict, config: GateConfig, args) -> Verdict:
    """Both students' teacher agreement on the same images of their common teacher (see the module docstring)."""
    recorded = info.get("manifest") or {}
    teacher = args.teacher or (recorded.get("teacher") or {}).get("path")
    if not teacher:
        raise GateError("the candidate's manifest records no teacher to measure agreement with; --teacher names it")
    teacher_pipe = load_pipeline(resolve_model(teacher))
    weights = teacher_fingerprint(teacher_pipe)["transformer_sha256"]
    for what, manifest in (("the candidate", recorded), (f"the live model {live['spec']!r}",
                                                         live["manifest"].get("manifest") or {})):
        theirs = (manifest.get("teacher") or {}).get("transformer_sha256")
        if theirs != weights:
            raise GateError(f"{what} is not recorded as a student of the teacher {shown_path(teacher)} (its manifest's "
                            f"teacher transformer sha256 {'differs' if theirs else 'is missing'}), so their teacher "
                            f"agreement does not compare")
    prompt_file = args.prompts or (recorded.get("config") or {}).get("prompts")
    if not prompt_file or not Path(prompt_file).is_file():
        raise GateError(f"no prompt file for the teacher agreement (the candidate's manifest records "
                        f"{prompt_file!r}); --prompts names one")
    path, here = live_folder_here(live, args.live_folder)
    if path is None:
        raise no_bar(live, here)
    reference = teacher_reference(teacher_pipe, read_prompt_file(prompt_file), config.agreement_n)

    def scores(student: Path) -> dict:
        measured = teacher_agreement(load_pipeline(student), reference)["steps"]
        return {f"{steps} step{'s' * (steps != '1')}": values for steps, values in measured.items()}

    return compare(scores(folder), scores(path), config, f"{here}; teacher agreement with {shown_path(teacher)} "
                   f"on {config.agreement_n} images of {shown_path(prompt_file)}")


def gate(folder: Path, live: dict, config: GateConfig, args) -> Verdict:
    unknown = sorted(set(config.split_list()) - set(SPLITS))
    if unknown:
        raise GateError(f"splits: {', '.join(unknown)} not among {', '.join(SPLITS)}")
    info = json.loads((folder / "tbcm.json").read_text()) if (folder / "tbcm.json").exists() else {}
    for what, manifest in ((f"the candidate {shown_path(folder)}", info), (f"the live model {live['spec']!r}",
                                                                           live["manifest"])):
        if problem := not_a_student(manifest):
            raise GateError(f"{what} cannot be gated: {problem}; --no-gate swaps without scoring")
    size = Evaluator.load(Path(config.evaluator)).config["image_size"]
    unscorable = [(what, problem) for what, manifest in (("the candidate", info), ("the live model", live["manifest"]))
                  if (problem := not_scorable(manifest, size))]
    if unscorable:
        print(f"tbcm deploy: gating by teacher agreement, since the shapes world's evaluator "
              f"({shown_path(config.evaluator)}) "
              f"cannot score {'; '.join(f'{what}: {problem}' for what, problem in unscorable)}", file=sys.stderr)
        return agreement_verdict(folder, info, live, config, args)
    bar, source = live_scores(live, config, args.live_folder)
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
        verdict = gate(folder, live, config, args)
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
