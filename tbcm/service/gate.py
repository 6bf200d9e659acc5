"""The quality gate of `tbcm deploy`: a candidate student goes live only if it scores within tolerance of the live
model on every split, both scored at the same n and seeds.

The scores come from outside (the cli wires them): for shapes-world students the shapes world's evaluator
(tbcm.world.evaluate, one step, at `GateConfig.n` images per split: FD and accuracy gated); for any other student
the evaluator-free teacher agreement (tbcm.distill.agreement, at `GateConfig.agreement_n` images: PSNR against
the common teacher's images gated at 1, 2 and 4 steps, one "split" per step count). This module holds the knobs,
the bar each gated metric sets, the comparison, and the scores a live folder's manifest records, for when the
live folder cannot be scored here. Those were measured by the distill export (tbcm.world.sources.student_metrics:
one step, seed 0, the shipped evaluator), so they are used only when the gate runs the same way: at the n the
manifest states, seed 0, the shipped evaluator.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tbcm.models.pipeline import WEIGHTS_DIR

DEFAULT_EVALUATOR = str(WEIGHTS_DIR / "evaluator")
GATED = {"fd": "fd_tolerance", "accuracy": "accuracy_tolerance", "psnr_db": "psnr_tolerance_db"}  # -> its knob
REPORTED = ("precision", "recall", "latent_mse")  # shown beside the gated ones, never refused on
EVALUATOR_GATED = ("fd", "accuracy")  # what every split of a shapes-evaluator score must hold
RECORDED_N = re.compile(r"run: (\d+) images per split")  # the distill export's eval_status


@dataclass(frozen=True)
class GateConfig:
    n: int = 256  # images per split for the candidate and the live model alike (the distill export's default
                  # eval n, so a live manifest's recorded numbers compare)
    seed: int = 0  # offsets every scene and noise seed of the evaluation (the manifests' numbers used 0)
    splits: str = "train,heldout"  # prompt splits scored, comma-separated; every one must pass
    fd_tolerance: float = 0.05  # the candidate's FD may exceed the live one's by at most this fraction
    accuracy_tolerance: float = 0.01  # the candidate's attribute accuracy may trail the live one's by at most this
    agreement_n: int = 32  # teacher-agreement images (prompt i mod the prompts, seed i) for a student the shapes
                           # evaluator cannot score; the teacher's are made once and shared by both students
    psnr_tolerance_db: float = 0.5  # the candidate's PSNR against the teacher may trail the live one's by this
    evaluator: str = DEFAULT_EVALUATOR  # the shapes world's evaluator folder (FD features, attribute heads)
    threads: int = 1  # torch intra-op threads while scoring (0: torch's default); on a busy 2-core CPU two threads
                      # scored 64 images in 43 s, one in 2.9 s

    def __post_init__(self):
        if self.n < 2:
            raise ValueError(f"n must be at least 2 (FD needs a covariance), got {self.n}")
        if self.agreement_n < 1:
            raise ValueError(f"agreement_n must be at least 1, got {self.agreement_n}")
        if min(self.fd_tolerance, self.accuracy_tolerance, self.psnr_tolerance_db, self.threads) < 0:
            raise ValueError("fd_tolerance, accuracy_tolerance, psnr_tolerance_db and threads must be >= 0")
        if not self.split_list():
            raise ValueError("splits must name at least one split")

    def split_list(self) -> list[str]:
        return [part.strip() for part in self.splits.split(",") if part.strip()]


def bound(metric: str, live: float, config: GateConfig) -> tuple[str, float]:
    """(comparison, limit) the candidate's value of a gated metric must meet, given the live model's value."""
    if metric == "fd":  # lower is better
        return "<=", live * (1 + config.fd_tolerance)
    if metric in ("accuracy", "psnr_db"):  # higher is better
        return ">=", live - getattr(config, GATED[metric])
    raise KeyError(f"{metric!r} is not a gated metric; gated: {', '.join(GATED)}")


@dataclass
class Verdict:
    rows: list[dict]  # one per split and metric: split, metric, candidate, live, op, bound (None: reported), ok
    live_source: str  # where the live numbers came from

    @property
    def failures(self) -> list[dict]:
        return [row for row in self.rows if not row["ok"]]

    @property
    def passed(self) -> bool:
        return not self.failures

    def reason(self, config: GateConfig) -> str:
        """Why the candidate was refused: each failed split and metric, candidate vs live vs the allowed bound."""
        return "; ".join(f"{r['split']} {r['metric']}: candidate {r['candidate']:.4g}, live {r['live']:.4g}, "
                         f"allowed {r['op']} {r['bound']:.4g} ({GATED[r['metric']]} "
                         f"{getattr(config, GATED[r['metric']]):g})" for r in self.failures)

    def table(self) -> str:
        lines = [f"{'split':<9}{'metric':<11}{'candidate':>11}{'live':>11}{'allowed':>14}  verdict"]
        for r in self.rows:
            allowed = "-" if r["bound"] is None else f"{r['op']} {r['bound']:.4g}"
            verdict = "report" if r["bound"] is None else ("ok" if r["ok"] else "FAIL")
            lines.append(f"{r['split']:<9}{r['metric']:<11}{_value(r['candidate']):>11}{_value(r['live']):>11}"
                         f"{allowed:>14}  {verdict}")
        return "\n".join(lines + [f"(live numbers: {self.live_source})"])


def _value(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def compare(candidate: dict, live: dict, config: GateConfig, live_source: str) -> Verdict:
    """candidate and live: {split: {metric: value}} with the same splits; every GATED metric the candidate's split
    holds must meet its bound, the REPORTED ones are shown."""
    rows = []
    for split, scores in candidate.items():
        for metric in (m for m in GATED if m in scores):
            op, limit = bound(metric, live[split][metric], config)
            value = scores[metric]
            rows.append({"split": split, "metric": metric, "candidate": value, "live": live[split][metric],
                         "op": op, "bound": limit, "ok": value <= limit if op == "<=" else value >= limit})
        rows += [{"split": split, "metric": metric, "candidate": scores.get(metric),
                  "live": live[split].get(metric), "op": None, "bound": None, "ok": True}
                 for metric in REPORTED if metric in scores or metric in live[split]]
    return Verdict(rows, live_source)


def recorded_scores(info: dict, config: GateConfig) -> tuple[dict | None, str]:
    """(the live folder's recorded scores, or None; why they can or cannot stand in for scoring it here).
    `info` is the folder's tbcm.json, as /info shows it under "manifest"."""
    manifest = info.get("manifest") or {}
    evals, status = manifest.get("eval") or {}, str(manifest.get("eval_status", ""))
    stated = RECORDED_N.fullmatch(status)  # manifests before "eval_n" state it in words only
    n = manifest.get("eval_n", int(stated.group(1)) if stated else None)
    if not evals or n is None:
        return None, (f"its manifest records no scores at a stated n (eval_status {status!r})" if evals else
                      "its manifest records no eval scores")
    if n != config.n:
        return None, f"its manifest's scores are at n {n}, the gate's n is {config.n}"
    if config.seed != 0 or config.evaluator != DEFAULT_EVALUATOR:
        return None, "its manifest's scores are at seed 0 with the shipped evaluator, and the gate's are not"
    missing = [f"{split} {metric}" for split in config.split_list() for metric in EVALUATOR_GATED
               if metric not in evals.get(split, {})]
    if missing:
        return None, f"its manifest records no {', '.join(missing)}"
    return evals, f"recorded in its manifest at n {config.n}, seed 0, the shipped evaluator"
