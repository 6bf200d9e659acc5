"""What every trainer here shares: the base config, the one training loop (`TrainingRun`), atomic safetensors
checkpoints with exact resume, EMA, progress and logs.

A checkpoint is one `checkpoint.safetensors` (model, EMA and optimizer tensors, RNG state) plus its JSON metadata
stored inside the safetensors header, written to a temp file, fsynced and renamed, so a kill at any moment leaves
either the old checkpoint or the new one. Nothing is unpickled on load.

Weights and optimizer state go through torch.distributed.checkpoint's state-dict API, keyed by parameter name, so
one format serves one process, DDP and FSDP: under FSDP every rank gathers the whole tensors (a collective), rank
0 writes them, and on resume every rank reads the file and keeps its own shards.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm

CHECKPOINT = "checkpoint.safetensors"


@dataclasses.dataclass
class TrainConfig:
    """The knobs every trainer here shares, defined once; each trainer's config subclasses it and restates only the
    defaults it changes (a field restated without a comment keeps this help)."""
    seed: int = 0                 # everything is a function of it (with several processes, rank r uses seed + r)
    steps: int = 1000             # optimizer steps
    lr: float = 1e-4              # AdamW peak learning rate, reached at the end of the warm-up
    warmup_steps: int = 100       # linear LR warm-up from 0
    cosine_decay: bool = False    # after warm-up, anneal the lr to 0 at `steps` (cosine); else constant
    grad_clip: float = 1.0        # max global grad norm; a step whose norm is not finite is skipped
    ema_decay: float = 0.99       # EMA of the weights that get shipped or exported
    checkpoint_every: int = 250   # steps between atomic checkpoints

    retired: ClassVar[dict] = {}  # knobs removed since runs were saved -> the value each is fixed at (saved_config)


def seed_everything(seed: int) -> None:
    """Seed the two global generators every trainer draws from (torch's CPU one and Python's `random`)."""
    torch.manual_seed(seed)
    random.seed(seed)


def atomic_write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """save_file to `path.tmp`, fsync, rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"json": json.dumps(metadata or {})})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("json", "{}"))
    return load_file(str(path)), metadata


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter name -> safetensors tensors `optimizer.<name>.<slot>` and JSON scalars."""
    tensors, scalars = {}, {}
    for param, per_param in state["state"].items():
        for slot, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{param}.{slot}"] = value
            else:
                scalars[f"{param}.{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            param, slot = key[len("optimizer."):].rsplit(".", 1)
            state.setdefault(param, {})[slot] = value
    for key, value in meta["scalars"].items():
        param, slot = key.rsplit(".", 1)
        state.setdefault(param, {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generators: torch CPU, Python `random`, and the current CUDA device's where CUDA is present
    (numpy's global generator is never drawn from here, so it is not carried)."""
    version, internal, gauss = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, {"python_random": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


def rank_rng_path(out: Path, rank: int, step: int) -> Path:
    return Path(out) / f"rng-rank{rank}-step{step}.safetensors"


def save_rank_rng(out: Path, rank: int, step: int) -> Path:
    """One rank's RNG state at checkpoint `step`, beside the checkpoint (atomic). Named by step, so the files of
    the committed checkpoint survive a kill while the next one is written; prune_rank_rng drops the rest."""
    tensors, meta = rng_state()
    path = rank_rng_path(out, rank, step)
    atomic_write_safetensors(tensors, path, {"rank": rank, "step": step, "rng": meta})
    return path


def load_rank_rng(out: Path, rank: int, step: int) -> None:
    """Restore what save_rank_rng wrote for this rank at `step`; a clear error if it is missing or unreadable."""
    path = rank_rng_path(out, rank, step)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; rank {rank} cannot continue the step-{step} checkpoint exactly "
                                "(multi-process runs resume only with the number of processes they were saved with)")
    try:
        tensors, meta = read_safetensors(path)
        if meta.get("rank") != rank or meta.get("step") != step or "rng.torch" not in tensors:
            raise ValueError(f"holds rank {meta.get('rank')} step {meta.get('step')}")
        set_rng_state(tensors, meta["rng"])
    except Exception as error:  # a truncated or foreign file: name it, never continue from a guess
        raise RuntimeError(f"{path}: unreadable RNG state for rank {rank} at step {step}: {error}") from error


def prune_rank_rng(out: Path, rank: int, step: int) -> None:
    """Remove this rank's RNG files of steps other than `step` (call once checkpoint `step` is committed)."""
    keep = rank_rng_path(out, rank, step).name
    for path in Path(out).glob(f"rng-rank{rank}-step*.safetensors"):
        if path.name != keep:
            path.unlink(missing_ok=True)


def _writer() -> bool:
    """Whether this process writes shared files: the only process, or rank 0 of several."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(out: Path, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    config, extra: dict | None = None) -> Path:
    """Everything needed to continue exactly: weights, EMA, optimizer, RNG, step, config, extra JSON state.
    With several processes every rank calls it (FSDP gathers shards); rank 0 writes."""
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optimizer_state = get_state_dict(torch.nn.ModuleDict(modules), optimizer, options=whole)
    path = Path(out) / CHECKPOINT
    if _writer():
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        rng_tensors, rng_meta = rng_state()
        meta = {"step": step, "config": dataclasses.asdict(config), "optimizer": opt_meta, "rng": rng_meta,
                "extra": extra or {}}
        atomic_write_safetensors(weights | opt_tensors | rng_tensors, path, meta)
    return path


def load_checkpoint(out: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """Restore what save_checkpoint wrote (every rank reads it and keeps its shards); returns its metadata
    (step, config, extra). The RNG restored is rank 0's: other ranks then load their own (load_rank_rng)."""
    tensors, meta = read_safetensors(Path(out) / CHECKPOINT)
    weights = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in modules}
    set_state_dict(torch.nn.ModuleDict(modules), optimizer, model_state_dict=weights,
                   optim_state_dict=_unflatten_optimizer(tensors, meta["optimizer"]),
                   options=StateDictOptions(full_state_dict=True))
    set_rng_state(tensors, meta["rng"])
    return meta


RESUME_MAY_CHANGE = ("steps", "out")  # config knobs a resumed run may change (extend it, move its folder)


def saved_config(cls, saved: dict, source: Path):
    """The config a checkpoint recorded, as a `cls`: lists back to tuples, a knob added since at its default (the
    value that run had), `cls.retired` knobs dropped at their fixed values (else refused), unknown ones refused."""
    values = dict(saved)
    for name, fixed in cls.retired.items():
        value = values.pop(name, fixed)
        if json.dumps(value) != json.dumps(fixed):  # as JSON: a saved list is the tuple it was
            raise ValueError(f"{source}: the run was trained with {name} = {value!r}; that knob is retired, fixed "
                             f"at {fixed!r} now, so this version cannot continue or export it")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{source}: the run has knobs that {cls.__name__} does not know: {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_resume_config(out: Path, config, free: tuple[str, ...] = RESUME_MAY_CHANGE) -> None:
    """Refuse to resume a run with a different config (that would not be a continuation); the `free` knobs may
    change. A knob added since the run was saved counts as its default, the value that run had."""
    path = Path(out) / CHECKPOINT
    _, meta = read_safetensors(path)
    as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # noqa: E731 (tuples -> lists, as saved)
    saved, now = as_json(saved_config(type(config), meta["config"], path)), as_json(config)
    diffs = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in free)
    if diffs:
        raise ValueError(f"{path}: config differs from the run being resumed in {diffs}")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Exponential moving average of weights: ema <- decay ema + (1 - decay) model (Polyak averaging).
    `ema` is a whole copy; `model`'s parameters may be FSDP2 shards (DTensors), gathered here on every rank."""
    for e, p in zip(ema.parameters(), model.parameters()):
        whole = p.full_tensor() if isinstance(p, DTensor) else p
        e.lerp_(whole.detach(), 1 - decay)


class RunLog:
    """A tqdm bar with loss, rate and ETA, plus a JSONL log of every reported step."""

    def __init__(self, out: Path, total: int | None, start: int, desc: str):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="it", dynamic_ncols=True, mininterval=2.0)
        self.t0 = time.time()

    def step(self, step: int, **values: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "time_s": round(time.time() - self.t0, 3), **values}) + "\n")

    def close(self) -> None:
        self.bar.close()


def save_grid(images_uint8: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Up to columns^2 images (N, H, W, 3) uint8 as one PNG grid, row-major (sample grids, eval grids)."""
    images = images_uint8[: columns * columns]
    rows = (len(images) + columns - 1) // columns
    h, w = images.shape[1:3]
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im.numpy()), ((i % columns) * w, (i // columns) * h))
    grid.save(path)


def truncate_log(out: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint step so the log reads as one run."""
    path = Path(out) / "metrics.jsonl"
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))




def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to config.lr, then constant or (config.cosine_decay) cosine-annealed to 0 at the last step."""
    if step <= config.warmup_steps:
        return config.lr * step / max(1, config.warmup_steps)
    if not config.cosine_decay:
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))  # SGDR eq. 5 with eta_min = 0


def clipped_update(optimizer: torch.optim.Optimizer, groups: list, max_norm: float,
                   clip=torch.nn.utils.clip_grad_norm_) -> tuple[torch.Tensor, bool]:
    """Clip each group's gradient to `max_norm` on its own (`clip`: torch's, or accelerate's), then step unless a norm
    is not finite (skipped, as Sana-Sprint and TBCM do). Returns (the first group's norm, whether it stepped)."""
    norms = [clip(group, max_norm) for group in groups]
    applied = all(torch.isfinite(norm) for norm in norms)
    if applied:
        optimizer.step()
    return norms[0], applied


class TrainingRun:
    """The one training loop: start fresh (seeded) or resume exactly, step while `continues()`, log every step (the
    main process; the bar counts to `self.total`), checkpoint every `checkpoint_every` steps and at the end.

    A trainer subclasses it and gives `train_step` (one optimizer step: it advances `self.step` and returns the
    metrics to log); it may override `continues`, `extra` (JSON state saved with each checkpoint, which `start`
    returns on resume) and the hooks `before`, `after_step` and `after`. All randomness must come from torch's and
    Python's global generators, which checkpoints carry (each rank's), so a resumed run continues exactly."""

    def __init__(self, config: TrainConfig, out: Path, modules: dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, rank: int = 0, processes: int = 1, desc: str = "train"):
        self.config, self.out, self.modules, self.optimizer = config, Path(out), modules, optimizer
        self.rank, self.processes, self.main, self.desc, self.step = rank, processes, rank == 0, desc, 0
        self.total: int | None = config.steps  # what the progress bar counts to (None: something else ends it)

    def start(self, resume: bool, free: tuple[str, ...] = RESUME_MAY_CHANGE) -> dict:
        """Resume from the checkpoint (refused if the config differs outside `free`): its extra state; or start fresh:
        write config.json, seed (seed + rank), {}."""
        if resume and (self.out / CHECKPOINT).exists():
            check_resume_config(self.out, self.config, free)
            meta = load_checkpoint(self.out, self.modules, self.optimizer)  # restores rank 0's RNG exactly
            self.step = meta["step"]
            if self.processes > 1:  # and every rank its own, saved beside the checkpoint
                load_rank_rng(self.out, self.rank, self.step)
            if self.main:
                truncate_log(self.out, self.step)
            return meta["extra"]
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main:
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        seed_everything(self.config.seed + self.rank)
        return {}

    def train_step(self) -> dict:
        raise NotImplementedError

    def continues(self) -> bool:
        return self.step < self.config.steps

    def extra(self) -> dict:
        return {}

    def before(self) -> None:
        """Runs once before the first step of this process."""

    def after_step(self) -> None:
        """Runs after each step is logged, before its checkpoint."""

    def after(self) -> None:
        """Runs once after the last step, before the final checkpoint."""

    def save(self) -> None:
        """The checkpoint (every rank gathers, rank 0 writes); with several processes every rank first writes its
        RNG state beside it, and its older RNG files go only once the new checkpoint is committed, so a kill leaves
        a consistent set."""
        if self.processes > 1:
            save_rank_rng(self.out, self.rank, self.step)
            torch.distributed.barrier()
        save_checkpoint(self.out, self.step, self.modules, self.optimizer, self.config, self.extra())
        if self.processes > 1:
            torch.distributed.barrier()
            prune_rank_rng(self.out, self.rank, self.step)

    def train(self) -> None:
        log = RunLog(self.out, self.total, self.step, self.desc) if self.main else None
        self.before()
        continues = self.continues()  # read once per step (a trainer may broadcast it)
        while continues:
            metrics = self.train_step()
            continues = self.continues()
            if log:
                log.step(self.step, **metrics)
            self.after_step()
            if self.step % self.config.checkpoint_every == 0 and continues:  # the final save follows the loop
                self.save()
        self.after()
        self.save()  # the final state, whatever ended the run
        if log:
            log.close()


class _LossRun(TrainingRun):
    """AdamW on one model with the shared schedule, clipping and EMA, on the loss `loss_fn(step)` gives."""

    def __init__(self, out: Path, config: TrainConfig, model: torch.nn.Module, loss_fn, ema, desc: str):
        modules = {"model": model} | ({"ema": ema} if ema is not None else {})
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        super().__init__(config, out, modules, optimizer, desc=desc)
        self.model, self.loss_fn, self.ema = model, loss_fn, ema

    def train_step(self) -> dict:
        step = self.step + 1
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, step)
        loss, metrics = self.loss_fn(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm, applied = clipped_update(self.optimizer, [list(self.model.parameters())], self.config.grad_clip)
        if applied and self.ema is not None:
            ema_update(self.ema, self.model, self.config.ema_decay)
        self.step = step
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), **metrics}


def train_loop(out: Path, config: TrainConfig, model: torch.nn.Module, loss_fn, ema: torch.nn.Module | None = None,
               resume: bool = False, desc: str = "train") -> torch.nn.Module:
    """The loop on one model: `loss_fn(step)` returns (loss, {name: value}) from the global generators.
    Returns the EMA model (or the model)."""
    run = _LossRun(out, config, model, loss_fn, ema, desc)
    run.start(resume)
    run.train()
    return ema if ema is not None else model
