"""Trainer plumbing: atomic safetensors writes, exact checkpoint round trips (model, AdamW, RNG), and a killed and
resumed train_loop that ends bit-identical to an uninterrupted run."""
import copy
import dataclasses
import json
import random

import pytest
import torch

import tbcm.models.training as training
from tbcm.models.training import (CHECKPOINT, TrainConfig, atomic_write_safetensors, check_resume_config, learning_rate,
                             load_checkpoint, read_safetensors, save_checkpoint, saved_config, train_loop)


@dataclasses.dataclass
class LoopConfig(TrainConfig):
    steps: int = 10
    lr: float = 3e-2
    warmup_steps: int = 3
    ema_decay: float = 0.8
    checkpoint_every: int = 3
    width: int = 8
    betas: tuple = (0.9, 0.99)


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def make_loss(model, kill_at: int | None = None):
    """A loss drawing from both of the global generators (torch: data and dropout; Python: a target scale)."""
    def loss_fn(step: int):
        if step == kill_at:
            raise KeyboardInterrupt(f"killed at step {step}")
        x = torch.randn(16, 4)
        target = x.sum(1, keepdim=True) * (1 + random.random())
        loss = (model(x) - target).square().mean()
        return loss, {"scale": float(target.abs().mean())}
    return loss_fn


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_atomic_write_round_trips_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "weights.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3).T, "b": torch.tensor([1, 2], dtype=torch.int64)}  # a: non-contiguous
    metadata = {"step": 3, "nested": {"list": [1, 2.5, None], "text": "x"}}
    atomic_write_safetensors(tensors, path, metadata)
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"]
    loaded, meta = read_safetensors(path)
    assert meta == metadata
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    atomic_write_safetensors({"a": torch.zeros(1)}, path)  # overwrite, no metadata
    loaded, meta = read_safetensors(path)
    assert meta == {} and list(loaded) == ["a"]
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    atomic_write_safetensors({"a": torch.ones(3)}, path, {"v": 1})

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(training, "save_file", broken_save)
    with pytest.raises(OSError):
        atomic_write_safetensors({"a": torch.zeros(3)}, path, {"v": 2})
    loaded, meta = read_safetensors(path)
    assert meta == {"v": 1} and torch.equal(loaded["a"], torch.ones(3))


def adamw_steps(model, optimizer, n):
    for _ in range(n):
        loss = model(torch.randn(8, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_checkpoint_round_trips_model_optimizer_and_rng(tmp_path):
    config = LoopConfig()
    model = make_model(0)
    ema = make_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    torch.manual_seed(5)
    random.seed(5)
    adamw_steps(model, optimizer, 3)
    snapshot_model, snapshot_opt = copy.deepcopy((model, optimizer))
    save_checkpoint(tmp_path, 3, {"model": model, "ema": ema}, optimizer, config, extra={"prompts_seen": 48})
    next_torch, next_python = torch.randn(5), [random.random() for _ in range(3)]

    adamw_steps(model, optimizer, 2)  # move everything on, then restore into fresh objects
    torch.manual_seed(99)
    random.seed(99)
    restored, restored_ema = make_model(7), make_model(8)
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=0.5)
    meta = load_checkpoint(tmp_path, {"model": restored, "ema": restored_ema}, restored_opt)

    assert meta["step"] == 3 and meta["extra"] == {"prompts_seen": 48}
    assert meta["config"] == json.loads(json.dumps(dataclasses.asdict(config)))
    assert_same_state(restored, snapshot_model)
    assert_same_state(restored_ema, ema)
    saved_state, restored_state = snapshot_opt.state_dict(), restored_opt.state_dict()
    assert saved_state["state"].keys() == restored_state["state"].keys()
    for index, per_param in saved_state["state"].items():
        for name, value in per_param.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored_state["state"][index][name]))
    group, restored_group = saved_state["param_groups"][0], restored_state["param_groups"][0]
    assert restored_group["lr"] == group["lr"] and tuple(restored_group["betas"]) == (0.8, 0.95)
    assert restored_group["weight_decay"] == 0.1
    # the RNG continues where it was saved
    assert torch.equal(torch.randn(5), next_torch)
    assert [random.random() for _ in range(3)] == next_python
    # and a further optimizer step is identical from the snapshot and from the restored checkpoint
    torch.manual_seed(3)
    adamw_steps(snapshot_model, snapshot_opt, 2)
    torch.manual_seed(3)
    adamw_steps(restored, restored_opt, 2)
    assert_same_state(restored, snapshot_model)


def run_log_steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("interruption", ["killed", "finished-shorter-run"])
def test_resumed_train_loop_matches_an_uninterrupted_run(tmp_path, interruption):
    config = LoopConfig()
    straight_model, straight_ema = make_model(0), make_model(0)
    train_loop(tmp_path / "straight", config, straight_model, make_loss(straight_model), ema=straight_ema)

    out = tmp_path / "resumed"
    model, ema = make_model(0), make_model(0)
    if interruption == "killed":  # dies during step 5; the last checkpoint is step 3
        with pytest.raises(KeyboardInterrupt):
            train_loop(out, config, model, make_loss(model, kill_at=5), ema=ema)
        assert read_safetensors(out / CHECKPOINT)[1]["step"] == 3
    else:  # a 4-step run, continued to 10 steps
        train_loop(out, dataclasses.replace(config, steps=4), model, make_loss(model), ema=ema)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())

    # a "new process": different initial weights and global RNG state, everything must come from the checkpoint
    torch.manual_seed(1234)
    random.seed(1234)
    model, ema = make_model(42), make_model(43)
    result = train_loop(out, config, model, make_loss(model), ema=ema, resume=True)
    assert result is ema
    assert_same_state(model, straight_model)
    assert_same_state(ema, straight_ema)
    assert not torch.equal(model[0].weight, make_model(0)[0].weight)  # it did train
    # the log reads as one run: every step once, with the same losses as the uninterrupted run
    log, straight_log = run_log_steps(out), run_log_steps(tmp_path / "straight")
    assert [r["step"] for r in log] == list(range(1, 11))
    assert [r["loss"] for r in log] == [r["loss"] for r in straight_log]


def test_non_finite_gradients_skip_the_step(tmp_path):
    config = LoopConfig(steps=2, checkpoint_every=100)
    model = make_model(0)
    after_one = {}

    def loss_fn(step):
        loss = model(torch.randn(4, 4)).square().mean()
        if step == 1:
            return loss, {}
        after_one.update({k: v.clone() for k, v in model.state_dict().items()})
        return loss * float("nan"), {}

    train_loop(tmp_path, config, model, loss_fn)
    assert all(torch.equal(after_one[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(after_one["0.weight"], make_model(0)[0].weight)


def test_check_resume_config(tmp_path):
    config = LoopConfig()
    model = make_model(0)
    save_checkpoint(tmp_path, 1, {"model": model}, torch.optim.AdamW(model.parameters()), config)
    check_resume_config(tmp_path, config)
    check_resume_config(tmp_path, dataclasses.replace(config, steps=50))  # extending a run is a continuation
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors.*\['lr'\]"):
        check_resume_config(tmp_path, dataclasses.replace(config, lr=1e-3))
    with pytest.raises(ValueError, match=r"\['betas', 'width'\]"):
        check_resume_config(tmp_path, dataclasses.replace(config, width=16, betas=(0.9, 0.999)))
    # a knob added after the run was saved counts as its default, the value the run had
    newer = dataclasses.make_dataclass("Newer", [("added", bool, dataclasses.field(default=True))], bases=(LoopConfig,))
    check_resume_config(tmp_path, newer())
    with pytest.raises(ValueError, match=r"\['added'\]"):
        check_resume_config(tmp_path, newer(added=False))
    # and train_loop refuses to resume with a changed config
    with pytest.raises(ValueError, match="seed"):
        train_loop(tmp_path, dataclasses.replace(config, seed=1), model, make_loss(model), resume=True)


def test_a_retired_knob_is_accepted_only_at_the_value_it_is_fixed_at(tmp_path):
    """A knob removed from a config: runs saved with it at its fixed value still resume (and load); others are
    refused with the knob named."""
    older = dataclasses.make_dataclass("Older", [("old_knob", float, dataclasses.field(default=0.1))],
                                       bases=(LoopConfig,))
    retiring = dataclasses.make_dataclass("Retiring", [], bases=(LoopConfig,), namespace={"retired": {"old_knob": 0.1}})
    model = make_model(0)
    for value, folder in ((0.1, tmp_path / "fixed"), (0.3, tmp_path / "other")):
        save_checkpoint(folder, 1, {"model": model}, torch.optim.AdamW(model.parameters()), older(old_knob=value))
    check_resume_config(tmp_path / "fixed", retiring())
    saved = read_safetensors(tmp_path / "fixed" / CHECKPOINT)[1]["config"]
    assert "old_knob" in saved and saved_config(retiring, saved, tmp_path) == retiring()  # betas: a tuple again
    with pytest.raises(ValueError, match="trained with old_knob = 0.3; that knob is retired, fixed at 0.1"):
        check_resume_config(tmp_path / "other", retiring())


@dataclasses.dataclass
class CosineConfig(LoopConfig):
    cosine_decay: bool = True


def test_learning_rate_warms_up_then_stays_or_anneals_to_zero():
    constant, cosine = LoopConfig(steps=11, warmup_steps=3), CosineConfig(steps=11, warmup_steps=3)
    for config in (constant, cosine):  # the same linear warm-up
        assert [learning_rate(config, s) for s in (1, 2, 3)] == pytest.approx([0.01, 0.02, 0.03])
    assert [learning_rate(constant, s) for s in (4, 7, 11)] == [0.03, 0.03, 0.03]
    annealed = [learning_rate(cosine, s) for s in range(3, 12)]
    assert annealed[0] == pytest.approx(0.03) and annealed[4] == pytest.approx(0.015)  # half way: half the lr
    assert annealed[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(annealed, annealed[1:]))
