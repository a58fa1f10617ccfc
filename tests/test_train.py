"""Training loop: exact resume, accumulation, evaluation, checkpoints, schedule, param groups, recipe."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from moekit.core.checkpoint import LATEST, STATE_FILE, CheckpointManager
from moekit.core.config import ModelConfig
from moekit.core.data import PackedSequences, make_batch
from moekit.core.extension import TrainerExtension
from moekit.core.generate import sample_text
from moekit.core.model import IGNORE_INDEX, Transformer
from moekit.core.optim import build_optimizer, build_scheduler, lr_factor, split_decay_params
from moekit.core.train import TrainConfig, Trainer
from moekit.moe.config import MoEConfig
from moekit.moe.extension import MoEExtension

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ModelConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, dropout=0.1)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; tests with other settings (bf16) need a clean slate."""

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()  # whatever ran earlier in this process
    yield
    reset()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    # A learnable stream (a noisy cycle), so losses move visibly within a few steps.
    base = torch.arange(4000) % 37 + 60
    noise = torch.randint(0, 256, (4000,), generator=gen)
    tokens = torch.where(torch.rand(4000, generator=gen) < 0.1, noise, base)
    return PackedSequences(tokens[:3400], 16), PackedSequences(tokens[3400:], 16)  # 200 / 35 windows


def _cfg(**kw) -> TrainConfig:
    base = dict(
        steps=6,
        batch_size=4,
        micro_batch_size=2,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        eval_every=3,
        eval_batches=2,
        log_with="none",
        progress_bar=False,
        mfu_probe=False,
        cpu=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def _trainer(run_dir, data, cfg, seed=0, model_cfg=TINY, **kw) -> Trainer:
    torch.manual_seed(seed)
    kw.setdefault("extensions", [MoEExtension()])  # what the wiring passes; a no-op for the dense model
    return Trainer(Transformer(model_cfg), cfg, run_dir, data[0], data[1], tokens_per_byte=1.0, **kw)


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run_dir) -> list[tuple[int, float]]:
    return [(e["step"], e["train_loss"]) for e in _events(run_dir) if "train_loss" in e]


# Noisy top-k draws router noise from the RNG and the aux-loss-free bias is persistent model state:
# both must survive a resume.
TINY_MOE = ModelConfig(
    **{
        **TINY.to_dict(),
        "moe": MoEConfig(
            num_experts=4, top_k=2, d_expert=16, router="noisy_topk", router_noise=1.0, bias_update_rate=0.01
        ),
    }
)


@pytest.mark.parametrize("model_cfg", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_resume_continues_exactly(tmp_path, data, model_cfg):
    cfg = _cfg(steps=8)
    straight = _trainer(tmp_path / "a", data, cfg, model_cfg=model_cfg)
    straight.train()
    straight.close()

    first = _trainer(tmp_path / "b", data, cfg, model_cfg=model_cfg)
    first.train(max_steps=4)
    first.close()
    assert (tmp_path / "b" / "ckpt" / LATEST).read_text().strip() == "step_0000004"
    # A different init seed: everything the second half sees must come from the checkpoint.
    second = _trainer(tmp_path / "b", data, cfg, seed=123, model_cfg=model_cfg, resume=True)
    assert second.step == 4 and second.tokens_seen == 4 * 4 * 16
    second.train()
    second.close()
    if model_cfg.moe is not None:  # the trainer ran the aux-loss-free bias update every step
        biases = [blk.ffn.router.expert_bias for blk in second.unwrapped_model.layers]
        assert all(b.abs().sum() > 0 for b in biases)
        event = _events(tmp_path / "b")[-2]  # the last train event: routing telemetry summary + per layer
        assert "moe/router_entropy" in event and "moe_loss/load_balance" in event
        assert len(event["moe_layers"]) == 2 and len(event["moe_layers"][0]["tokens_per_expert"]) == 4

    losses_a, losses_b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert [s for s, _ in losses_a] == list(range(1, 9))
    assert losses_b == losses_a  # bitwise: float32, CPU, dropout RNG restored
    assert losses_a[-1][1] < losses_a[0][1] - 0.2  # it does learn
    val_a = [e["val_loss"] for e in _events(tmp_path / "a") if "val_loss" in e]
    val_b = [e["val_loss"] for e in _events(tmp_path / "b") if "val_loss" in e]
    assert val_a == val_b and len(val_a) == 3  # steps 3, 6, 8
    wa, wb = (
        load_file(tmp_path / "a" / "final" / "model.safetensors"),
        load_file(tmp_path / "b" / "final" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, data):
    # No dropout: masks would differ between the two micro-batchings.
    nodrop = ModelConfig(**{**TINY.to_dict(), "dropout": 0.0})
    cfg = dict(steps=3, eval_every=0, grad_clip=0.5)
    _trainer(tmp_path / "big", data, _cfg(micro_batch_size=4, **cfg), model_cfg=nodrop).train()
    _trainer(tmp_path / "acc", data, _cfg(micro_batch_size=1, **cfg), model_cfg=nodrop).train()
    big, acc = _train_losses(tmp_path / "big"), _train_losses(tmp_path / "acc")
    assert [s for s, _ in big] == [s for s, _ in acc] == [1, 2, 3]
    # Adam and clipping hide a gradient scale error; the pre-clip norm does not.
    norms = [[e["grad_norm"] for e in _events(tmp_path / run) if "grad_norm" in e] for run in ("big", "acc")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    for (_, lb), (_, la) in zip(big, acc):
        assert lb == pytest.approx(la, abs=1e-5)
    assert abs(big[2][1] - big[0][1]) > 1e-3  # the updates happened and moved the loss


def test_evaluate_matches_direct_loss(tmp_path, data):
    trainer = _trainer(tmp_path, data, _cfg(eval_batches=2))
    windows = torch.arange(8) * len(data[1]) // 8  # eval_batches * batch_size evenly spread windows
    got = trainer.evaluate()
    model = trainer.unwrapped_model.eval()
    with torch.no_grad():
        ids = torch.stack([data[1][int(i)]["input_ids"] for i in windows])
        labels = torch.stack([data[1][int(i)]["labels"] for i in windows])
        logits = model(input_ids=ids).logits.double()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert got["val_loss"] == pytest.approx(float(ref), abs=1e-6)
    assert got["val_bpb"] == pytest.approx(float(ref) / math.log(2), abs=1e-6)


def _padded_collate(dataset, indices):
    """make_batch with the targets of a data-dependent share of positions removed (-100), unevenly per row."""
    batch = make_batch(dataset, indices)
    drop_bt = (batch["input_ids"] % 3 == 0) | (torch.arange(16) >= 16 - (indices[:, None] % 5))
    batch["labels"] = batch["labels"].masked_fill(drop_bt, IGNORE_INDEX)
    return batch


def test_tokens_count_real_targets_only(tmp_path, data, monkeypatch):
    """tokens_seen counts labels != -100 summed over micro-batches (exactly), tokens/s and MFU follow it, and
    val_loss weights every window by its real targets."""
    monkeypatch.setattr("moekit.core.train.measure_matmul_flops", lambda device, dtype: 1e9)  # a fixed peak
    cfg = _cfg(steps=3, eval_every=0, mfu_probe=True)
    trainer = _trainer(tmp_path, data, cfg, collate=_padded_collate, flops_per_token=1000)
    trainer.train()
    trainer.close()
    expected = 0
    for step in range(3):
        batch = _padded_collate(data[0], trainer.sampler.indices(step))
        expected += int((batch["labels"] != IGNORE_INDEX).sum())
    assert 0 < expected < 3 * 4 * 16  # the padding is real
    events = [e for e in _events(tmp_path) if "train_loss" in e]
    assert trainer.tokens_seen == events[-1]["tokens_seen"] == expected
    first = int((_padded_collate(data[0], trainer.sampler.indices(0))["labels"] != IGNORE_INDEX).sum())
    assert events[0]["tokens_seen"] == first
    e = events[1]
    assert e["mfu"] == pytest.approx(3 * 1000 * e["tokens_per_s"] / 1e9)
    # val_loss: CE summed over every real target of the val windows / their count (micro-batches differ in size)
    got = trainer.evaluate()["val_loss"]
    model = trainer.unwrapped_model.eval()
    windows = torch.arange(8) * len(data[1]) // 8
    ce, n = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(2):
            b = _padded_collate(data[1], chunk)
            logits = model(input_ids=b["input_ids"]).logits.double()
            ce += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum"))
            n += int((b["labels"] != IGNORE_INDEX).sum())
    assert got == pytest.approx(ce / n, abs=1e-6)


class _Recorder(TrainerExtension):
    """Logs every hook call; clips nothing (returns None), so Accelerate's clipping still runs."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setup(self, model, ctx):
        assert ctx.world_size == 1 and ctx.rank == 0 and ctx.is_main and not ctx.fsdp and ctx.cfg.steps == 2
        self.calls.append("setup")

    def after_backward(self, model, ctx):
        assert all(p.grad is not None for p in model.parameters())
        self.calls.append("after_backward")

    def clip_grad_norm(self, model, max_norm, ctx):
        self.calls.append("clip")
        return None

    def after_optimizer_step(self, model, ctx):
        self.calls.append("step")

    def save_state(self, model, optimizer, folder, ctx):
        (folder / "mine.txt").write_text("x")
        self.calls.append("save")
        return ()

    def load_state(self, model, optimizer, folder, ctx):
        assert (folder / "mine.txt").read_text() == "x"
        self.calls.append("load")
        return ()

    def full_model(self, model, ctx):
        self.calls.append("full")
        return model

    def step_metrics(self, model, ctx):
        return {"mine": len(self.calls)}


def test_extension_hooks_are_called_in_order(tmp_path, data):
    rec = _Recorder()
    cfg = _cfg(steps=2, eval_every=0, micro_batch_size=1)  # 4 micro-batches: after_backward once per step
    trainer = _trainer(tmp_path, data, cfg, extensions=[rec])
    trainer.train()
    trainer.close()
    step = ["after_backward", "clip", "step"]
    assert rec.calls == ["setup", *step, *step, "save", "full"]
    assert [e["mine"] for e in _events(tmp_path) if "train_loss" in e] == [4, 7]
    assert "grad_norm" in _events(tmp_path)[0]  # Accelerate clipped
    again = _Recorder()
    resumed = _trainer(tmp_path, data, cfg, extensions=[again], resume=True)
    resumed.close()
    assert again.calls == ["setup", "load"]


def test_checkpoints_are_pruned_and_guarded(tmp_path, data):
    cfg = _cfg(steps=5, save_every=1, keep_checkpoints=2, eval_every=0)
    trainer = _trainer(tmp_path, data, cfg)
    trainer.train()
    trainer.close()
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step_0000004", "step_0000005"]
    assert json.loads((ckpt / "step_0000005" / STATE_FILE).read_text())["step"] == 5
    with pytest.raises(FileExistsError, match="resume=True"):
        _trainer(tmp_path, data, cfg)
    with pytest.raises(ValueError, match="batch_size=8"):
        _trainer(tmp_path, data, _cfg(steps=5, batch_size=8), resume=True)


def test_a_checkpoint_folder_latest_does_not_name_is_set_aside_not_reused(tmp_path, data):
    """A crash between a folder's rename and ``latest`` leaves step 6 on disk with ``latest`` at step 3; the
    resumed run (here at another lr) reaches step 6 and must write its own folder, not keep the old one."""
    cfg = _cfg(steps=6, save_every=3, keep_checkpoints=5, eval_every=0)
    first = _trainer(tmp_path, data, cfg)
    first.train()
    first.close()
    ckpt = tmp_path / "ckpt"
    old = load_file(ckpt / "step_0000006" / "model.safetensors")
    (ckpt / LATEST).write_text("step_0000003\n")  # as if the crash came before latest moved on
    resumed = _trainer(
        tmp_path, data, _cfg(steps=6, save_every=3, keep_checkpoints=5, eval_every=0, lr=1e-2), resume=True
    )
    resumed.train()
    resumed.close()
    assert (ckpt / LATEST).read_text().strip() == "step_0000006"
    new = load_file(ckpt / "step_0000006" / "model.safetensors")
    assert not all(torch.equal(new[k], old[k]) for k in old)  # trained at lr 1e-2 from step 3: its own weights
    kept = load_file(ckpt / "discarded" / "step_0000006" / "model.safetensors")
    assert all(torch.equal(kept[k], old[k]) for k in old)  # the old folder is set aside, not deleted


def test_a_checkpoint_between_log_events_keeps_the_training_time_so_far(tmp_path, data):
    """train_seconds used to grow only at log events: a checkpoint at step 3 with logging every 5 stored 0 s,
    and a resumed run reported tokens_seen over the time of its last steps only."""
    cfg = _cfg(steps=6, save_every=3, log_every=5, eval_every=0)
    trainer = _trainer(tmp_path, data, cfg)
    trainer.train()
    trainer.close()
    saved = json.loads((tmp_path / "ckpt" / "step_0000003" / STATE_FILE).read_text())["train_seconds"]
    final = json.loads((tmp_path / "ckpt" / "step_0000006" / STATE_FILE).read_text())["train_seconds"]
    assert 0 < saved < final
    assert final == pytest.approx(trainer.train_seconds, abs=0.05)  # plus the moments since the last log


def test_every_checkpoint_file_is_fsynced_before_the_folder_counts(tmp_path, data, monkeypatch):
    """accelerate's writers do not fsync: after a machine crash ``latest`` must not name a folder of empty
    files, so every file (model, optimizer, RNG, trainer state) is synced before the rename."""
    import moekit.core.files as files

    synced, real_fsync = set(), os.fsync

    def spy(fd):
        synced.add(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    trainer = _trainer(tmp_path, data, _cfg(steps=1, eval_every=0))
    trainer.train()
    trainer.close()
    written = {p.name for p in (tmp_path / "ckpt" / "step_0000001").rglob("*") if p.is_file()}
    assert {"model.safetensors", STATE_FILE} <= written
    missing = {n for n in written if n not in synced and f".{n}.tmp{os.getpid()}" not in synced}
    assert not missing, f"not fsynced: {sorted(missing)}"


def test_the_divergence_guard_resumes_with_its_baseline(tmp_path, data):
    """The spike check's baseline (first loss, recent losses) is in the checkpoint: after a resume it takes the
    decisions the uninterrupted run would, not ones relative to the first loss after the break."""
    cfg = _cfg(steps=6, eval_every=0, save_every=3)
    straight = _trainer(tmp_path / "a", data, cfg)
    straight.train()
    straight.close()
    first = _trainer(tmp_path / "b", data, cfg)
    first.train(max_steps=3)
    first.close()
    resumed = _trainer(tmp_path / "b", data, cfg, resume=True)
    assert resumed.guard.state_dict() == first.guard.state_dict() and len(resumed.guard.history) == 3  # JSON floats
    resumed.train()
    resumed.close()
    want, got = straight.guard.state_dict(), resumed.guard.state_dict()
    assert got["first"] == pytest.approx(want["first"]) and got["history"] == pytest.approx(want["history"])


@pytest.mark.parametrize(
    "state",
    [{"history": []}, {"first": "x", "history": []}, {"first": 1.0, "history": [1.0, None]}, [1.0], {"first": True}],
)
def test_a_malformed_divergence_guard_state_is_refused_naming_the_field(state):
    from moekit.core.guard import DivergenceGuard

    with pytest.raises(ValueError, match=r"trainer_state\.json: divergence_guard=.* needs 'first'"):
        DivergenceGuard(3.0).load_state_dict(state)
    guard = DivergenceGuard(3.0)
    guard.load_state_dict({"first": 2, "history": [2.5, 3]})
    assert guard.first == 2.0 and list(guard.history) == [2.5, 3.0]


def _uneven_targets(dataset, indices):
    """Rows keep 15 or 2 real targets (by index parity): micro-batches hold very different target counts."""
    batch = make_batch(dataset, indices)
    keep = torch.where(torch.as_tensor(indices)[:, None] % 2 == 0, 15, 2)  # [B, 1]
    batch["labels"] = batch["labels"].masked_fill(torch.arange(16) >= keep, IGNORE_INDEX)
    return batch


def test_micro_batching_does_not_change_the_optimised_loss(tmp_path, data):
    """A step's loss is the mean over all its real targets: one micro-batch of 4 or four of 1 (each with its own
    target count) give the same logged loss and the same weights (a mean of per-micro-batch means would not)."""
    runs = {}
    for mbs in (4, 1):
        cfg = _cfg(steps=2, micro_batch_size=mbs, eval_every=0, save_every=0, grad_clip=None)
        no_dropout = ModelConfig(**{**TINY.to_dict(), "dropout": 0.0})  # dropout masks depend on the split
        t = _trainer(tmp_path / f"mb{mbs}", data, cfg, model_cfg=no_dropout, collate=_uneven_targets)
        t.train()
        t.close()
        runs[mbs] = (t.unwrapped_model.state_dict(), [e["train_loss"] for e in _events(tmp_path / f"mb{mbs}")
                                                      if "train_loss" in e])  # fmt: skip
    assert all("grad_norm" in e for e in _events(tmp_path / "mb4") if "train_loss" in e)  # measured, unclipped
    (w4, loss4), (w1, loss1) = runs[4], runs[1]
    assert loss1 == pytest.approx(loss4, abs=1e-5)
    for name, w in w4.items():
        torch.testing.assert_close(w1[name], w, atol=1e-5, rtol=0, msg=name)


def test_interrupted_save_leaves_last_checkpoint_usable(tmp_path, data):
    cfg = _cfg(steps=6, eval_every=0)
    first = _trainer(tmp_path, data, cfg)
    first.train(max_steps=2)
    first.close()
    # A crash while writing step 4: half a temp folder and no pointer update.
    debris = tmp_path / "ckpt" / ".tmp_step_0000004"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"truncated")
    assert CheckpointManager(tmp_path / "ckpt", keep=2).latest().name == "step_0000002"
    second = _trainer(tmp_path, data, cfg, resume=True)
    assert second.step == 2
    second.train()
    second.close()
    assert not debris.exists()
    assert [s for s, _ in _train_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_metrics_and_tensorboard(tmp_path, data):
    trainer = _trainer(tmp_path, data, _cfg(steps=2, log_with="tensorboard", mfu_probe=True), flops_per_token=10_000)
    summary = trainer.train()
    trainer.close()
    train_event = next(e for e in _events(tmp_path) if "train_loss" in e)
    for key in ("step", "tokens_seen", "train_loss", "aux_loss", "lr", "tokens_per_s", "mfu", "grad_norm"):
        assert key in train_event
    assert train_event["lr"] == pytest.approx(3e-3 * 0.5)  # warmup step 1 of 2
    assert summary["step"] == 2 and "val_loss" in summary
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_bf16_autocast_trains_on_cpu(tmp_path, data):
    trainer = _trainer(tmp_path, data, _cfg(steps=2, mixed_precision="bf16", eval_every=0))
    summary = trainer.train()
    trainer.close()
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    assert trainer.unwrapped_model.embed.weight.dtype == torch.float32  # master weights stay float32


def test_a_launcher_world_size_accelerate_did_not_form_is_refused(tmp_path, data):
    # e.g. torchrun --nproc_per_node 2 on a CPU-only machine without ACCELERATE_USE_CPU: two 1-process runs
    with pytest.raises(RuntimeError, match=r"launched as 2 processes.*group of 1.*ACCELERATE_USE_CPU=1"):
        _trainer(tmp_path / "run", data, _cfg(), expect_processes=2)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before writing anything
    _trainer(tmp_path / "ok", data, _cfg(), expect_processes=1).close()


def test_batch_must_split_over_micro_batches():
    with pytest.raises(ValueError, match=r"micro_batch_size=3 is invalid: .* divides batch_size=4"):
        _cfg(micro_batch_size=3)
    with pytest.raises(ValueError, match=r"warmup_steps=-1 is invalid: must be an int >= 0"):
        _cfg(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"grad_clip=0.0 is invalid"):
        _cfg(grad_clip=0.0)


def test_lr_schedule_values():
    # warmup 2, total 11: decay runs over steps 2..10 (8 intervals).
    assert lr_factor(0, 2, 11, 0.1) == pytest.approx(0.5)
    assert lr_factor(1, 2, 11, 0.1) == pytest.approx(1.0)
    assert lr_factor(2, 2, 11, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 2, 11, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(4, 2, 11, 0.1, "linear") == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_factor(10, 2, 11, 0.1) == pytest.approx(0.1)
    assert lr_factor(7, 2, 11, 0.1, "constant") == 1.0
    model = torch.nn.Linear(2, 2)
    sched = build_scheduler(build_optimizer(model, 0.5, 0.0), 2, 11, 0.1, "cosine")
    seen = []
    for _ in range(11):
        seen.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, 2, 11, 0.1) for s in range(11)])


def test_no_weight_decay_on_norms_biases_embeddings():
    decay, no_decay = split_decay_params(Transformer(ModelConfig(**{**TINY.to_dict(), "n_layers": 1})))
    assert sorted(decay) == sorted(
        f"layers.0.{m}.weight"
        for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.w_gate", "ffn.w_up", "ffn.w_down")
    )
    assert sorted(no_decay) == ["embed.weight", "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight", "norm.weight"]
    untied = Transformer(ModelConfig(**{**TINY.to_dict(), "n_layers": 1, "tie_embeddings": False}))
    assert "lm_head.weight" in split_decay_params(untied)[0]
    opt = build_optimizer(untied, 1e-3, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(untied.parameters()))


def test_fused_adamw_matches_the_per_tensor_loop_in_float64():
    """build_optimizer's fused kernel (one pass per group) against torch's for-loop AdamW, the reference,
    on a MoE model (stacked [E, D, F] expert tensors, a router, norms without decay)."""
    torch.manual_seed(0)
    fused_model = Transformer(ModelConfig(**{**TINY_MOE.to_dict(), "dropout": 0.0})).double()
    loop_model = copy.deepcopy(fused_model)
    start = [p.detach().clone() for p in fused_model.parameters()]
    fused = build_optimizer(fused_model, 1e-2, 0.1)
    assert fused.defaults["fused"] is True
    decay, no_decay = split_decay_params(loop_model)
    params = dict(loop_model.named_parameters())
    groups = [
        {"params": [params[n] for n in names], "weight_decay": wd} for names, wd in ((decay, 0.1), (no_decay, 0.0))
    ]
    loop = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    for _ in range(3):  # both optimizers get the same gradients (the MoE forward draws router jitter)
        fused.zero_grad(set_to_none=True)
        fused_model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        fused.step()
        loop.step()
    moved = 0
    for (name, a), b, a0 in zip(fused_model.named_parameters(), loop_model.parameters(), start):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        moved += not torch.equal(a, a0)
    assert moved >= len(start) - 2  # every parameter that got a gradient moved (an idle expert may not)
    # where the fused kernel does not run (meta tensors here), or the target device says so, torch decides
    meta = Transformer(ModelConfig(**{**TINY.to_dict(), "n_layers": 1})).to("meta")
    assert build_optimizer(meta, 1e-3, 0.1).defaults["fused"] is None
    assert build_optimizer(meta, 1e-3, 0.1, device=torch.device("cpu")).defaults["fused"] is True


def test_sample_text_continues_prompts():
    from moekit.core.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    texts = sample_text(Transformer(TINY), ByteTokenizer(), ["ab", "hello"], max_new_tokens=5)
    assert texts[0].startswith("ab") and texts[1].startswith("hello") and len(texts) == 2


def _load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_lm_recipe", RECIPES / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_lm_recipe_debug_preset(tmp_path, capsys):
    out = tmp_path / "run"
    overrides = ["train.steps=4", "train.log_with=none", "train.progress_bar=false", "--set", "train.eval_every=2"]
    argv = ["--config", str(RECIPES / "configs" / "debug.yaml"), "--out", str(out), "--sample-tokens", "8", *overrides]
    summary = _load_recipe().main(argv)
    printed = capsys.readouterr().out
    assert "params" in printed and "MFLOPs/token" in printed and "----- sample" in printed
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 4 and resolved["train"]["eval_every"] == 2
    assert resolved["model"]["d_model"] == 64  # from the preset
    assert summary["step"] == 4 and math.isfinite(summary["val_loss"])
    reloaded = Transformer.from_pretrained(out / "final")
    assert reloaded.cfg.d_model == 64

    # --resume without --config continues with the run's saved config.yaml (plus new overrides).
    summary = _load_recipe().main(["--out", str(out), "--resume", "--samples", "0", "train.steps=6"])
    assert summary["step"] == 6
    assert [e["step"] for e in _events(out) if "train_loss" in e][-3:] == [4, 5, 6]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _load_recipe().main(["--out", str(out), "--resume", "model.d_model=32"])
    assert exit_info.value.code == 2 and "model.d_model: run has 64, now 32" in capsys.readouterr().err
