"""The reusable training loop over Accelerate. Its config is ``moekit.core.train_config.TrainConfig``
(re-exported here); ``moekit.experiment.lm.build_lm_trainer`` wires it for language models.

Shapes: ``B`` micro-batch (sequences), ``T`` sequence length, ``K`` logged loss components.

Data order never comes from a DataLoader: ``StepSampler`` fixes the global batch of every step, each rank
takes its contiguous shard, and the shard is cut into micro-batches for gradient accumulation. So a run
on 1 or N processes, or one resumed from a checkpoint, sees exactly the same sequences at every step.

What is optimised comes from an ``Objective`` (``moekit.core.objective``; default ``LMObjective``): per
micro-batch a loss, an auxiliary loss, the number of real target tokens and extra metrics. Everything a
model family needs beyond that (sharding, extra gradient syncs, extra checkpoint files, telemetry) comes
from ``extensions`` (``moekit.core.extension.TrainerExtension``; docs/DESIGN.md lists the expert-layer one).

Metrics (``<run_dir>/metrics.jsonl``, one JSON object per log event, and TensorBoard under ``<run_dir>/tb``):
``train_loss`` is the objective's loss (the optimised quantity is ``loss + aux_loss``; ``aux_loss`` is logged
apart). With an objective that counts its targets (``num_targets(batch)``, as ``LMObjective`` does) a step's
loss is the mean over all its real targets, every micro-batch and process, so micro-batching and the process
count do not change what is optimised; ``aux_loss`` is averaged per micro-batch. ``val_loss`` is its mean over
the val windows weighted by real target tokens, ``val_bpb = val_loss / ln 2 * tokens_per_byte``. ``tokens_seen``
and ``tokens_per_s`` count real target tokens (the objective's ``num_tokens``) summed over micro-batches and
ranks, exactly; ``tokens_per_s`` excludes eval/save time.
``mfu = 3 * flops_per_token * tokens_per_s / (num_processes * probe_flops)``, so ``flops_per_token`` must be
forward FLOPs per real target token; ``probe_flops`` is the best FLOP/s of a square matmul in the training
dtype on this machine (``measure_matmul_flops``, run at start-up and again after each evaluation, keeping the
best): an achievable peak rather than a datasheet number, so it is meaningful on CPUs and unknown GPUs alike,
and lower than vendor-peak-based MFU figures.

Checkpoints store the unwrapped model, so a run resumes on any number of processes; extensions may store
part of the state in files of their own (``TrainerExtension.save_state``). ``save_final`` and
``gather_full_model`` build (collectively) a model the main process can run alone, for ``save_pretrained``
and sampling.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from moekit.core.checkpoint import CKPT_DIR, CheckpointManager
from moekit.core.checks import fail
from moekit.core.data import StepSampler, eval_windows, make_batch
from moekit.core.extension import TrainContext, TrainerExtension
from moekit.core.full_model import fsdp_full_model as _fsdp_full_model
from moekit.core.guard import DivergenceGuard, TrainingDiverged, all_finite
from moekit.core.meter import LogWindow, measure_matmul_flops
from moekit.core.metrics_file import METRICS_FILE, append_event, restart_events, tracker_hparams
from moekit.core.objective import LMObjective, Objective, StepOutput, micro_batch_weights
from moekit.core.optim import build_optimizer, build_scheduler, restart_schedule
from moekit.core.train_config import COMPILE_BACKENDS, MIXED_PRECISIONS, TRACKERS, TrainConfig

__all__ = ["COMPILE_BACKENDS", "MIXED_PRECISIONS", "TRACKERS", "TrainConfig", "Trainer", "measure_matmul_flops"]


class Trainer:
    """Optimise ``model`` on ``train_data`` with Accelerate; evaluate, log and checkpoint into ``run_dir``.

    Batches are ``collate(dataset, indices)`` dicts; ``objective(model, batch)`` (default ``LMObjective()``:
    ``model(**batch)`` with a ``labels`` entry) turns one into a ``StepOutput``. ``extensions`` hook into
    setup, the step, checkpoints, the full-model gather and the logged metrics, in list order; a model with
    routed-expert layers needs its family's extension (its wiring passes it). Every rank must run the
    same calls (``train``, ``evaluate``, ``save_checkpoint``, ``gather_full_model``, ``close``): they
    contain collectives.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        train_data: Dataset,
        val_data: Dataset | None = None,
        *,
        resume: bool = False,
        flops_per_token: int | None = None,  # forward FLOPs per real target token (for MFU)
        tokens_per_byte: float | None = None,
        hparams: Mapping[str, Any] | None = None,
        after_step: Callable[[nn.Module], None] | None = None,  # extra hook after each optimizer step
        collate: Callable[[Dataset, Tensor], dict[str, Tensor]] = make_batch,
        expect_processes: int | None = None,  # the launcher's world size (recipes pass WORLD_SIZE)
        find_unused_parameters: bool = False,  # DDP: some parameters may get no gradient on a rank in a step
        extensions: Sequence[TrainerExtension] = (),
        objective: Objective | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_data, self.val_data, self.collate = train_data, val_data, collate
        self.flops_per_token, self.tokens_per_byte = flops_per_token, tokens_per_byte
        self.after_step = after_step
        self.extensions = tuple(extensions)
        self.objective: Objective = objective if objective is not None else LMObjective()
        self.accelerator = acc = self._make_accelerator(find_unused_parameters)
        self._check_world_size(expect_processes)
        self.micro_batch_size, self.accum_steps = self._micro_batching()
        acc.gradient_accumulation_steps = self.accum_steps
        self.ckpt = CheckpointManager(self.run_dir / CKPT_DIR, cfg.keep_checkpoints)
        latest = self._existing_checkpoint(resume)
        self.ctx = TrainContext(
            cfg=cfg,
            world_size=acc.num_processes,
            rank=acc.process_index,
            device=acc.device,
            is_main=acc.is_main_process,
            fsdp=self._fsdp,
        )
        self._prepare(model)
        self.sampler = StepSampler(len(train_data), cfg.batch_size, cfg.seed)
        self._eval_chunks = self._eval_shard()

        self.step = 0
        self.tokens_seen = 0  # real target tokens over all ranks, up to the last sync (_sync_tokens)
        self._pending_tokens = torch.zeros((), dtype=torch.long, device=acc.device)  # this rank's, not yet synced
        self.train_seconds = 0.0
        # Chained sha256 over every consumed global batch's item indices (hex of the latest link, so a checkpoint
        # can carry it and a resumed run continues it exactly); None after resuming a checkpoint without one.
        self.data_digest: str | None = ""
        self.last_metrics: dict[str, Any] = {}
        self.guard = DivergenceGuard(cfg.divergence_factor)
        if latest is not None:
            self._restore(latest)
        self._start_metrics_file()
        if cfg.log_with != "none":
            acc.init_trackers("tb", config=tracker_hparams(hparams or {"train": vars(cfg)}))
        self.probe_flops: float | None = None
        self._reprobe()

    # ------------------------------------------------------------------ construction
    def _make_accelerator(self, find_unused_parameters: bool) -> Accelerator:
        cfg = self.cfg
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            log_with=None if cfg.log_with == "none" else cfg.log_with,
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
            # DDP's default re-broadcast of rank 0's buffers before every forward would overwrite per-rank
            # buffers (e.g. routers' load counters) mid-accumulation; parameters are synced by DDP regardless.
            kwargs_handlers=[
                DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=find_unused_parameters)
            ],
        )

    def _check_world_size(self, expect_processes: int | None) -> None:
        world = self.accelerator.num_processes
        if expect_processes is not None and world != expect_processes:
            # Otherwise N independent single-process runs would write the same run folder.
            raise RuntimeError(
                f"launched as {expect_processes} processes, but Accelerate formed a group of {world}: on a machine "
                "without GPUs set ACCELERATE_USE_CPU=1 (or train.cpu=true) so that the processes join one gloo group"
            )

    def _micro_batching(self) -> tuple[int, int]:
        """``(micro_batch_size, accumulation steps)`` of this world size."""
        cfg, world = self.cfg, self.accelerator.num_processes
        if cfg.batch_size % world:
            fail("TrainConfig", "batch_size", cfg.batch_size, f"must be divisible by num_processes={world}")
        per_rank = cfg.batch_size // world
        micro = cfg.micro_batch_size or per_rank
        if per_rank % micro:
            fail(
                "TrainConfig",
                "micro_batch_size",
                cfg.micro_batch_size,
                f"must divide the per-process batch batch_size/num_processes={per_rank}",
            )
        return micro, per_rank // micro

    def _existing_checkpoint(self, resume: bool) -> Path | None:
        latest = self.ckpt.latest()
        if latest is not None and not resume:
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints (latest {latest.name}); pass resume=True (--resume) "
                "to continue, or choose a new run directory"
            )
        return latest

    def _prepare(self, model: nn.Module) -> None:
        """Extensions' setup (before the optimizer sees the parameters and before ``prepare`` wraps the
        model), then optimizer, scheduler, ``accelerator.prepare`` and the optional compiled wrapper."""
        cfg = self.cfg
        for ext in self.extensions:
            ext.setup(model, self.ctx)
        optimizer = build_optimizer(
            model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.adam_eps, device=self.accelerator.device
        )
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.decay)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self._compiled: nn.Module | None = None
        if cfg.compile:
            # A wrapper used by _train_step only: everything else keeps seeing the eager (prepared) module.
            self._compiled = torch.compile(self.model, backend=cfg.compile_backend)

    def _restore(self, latest: Path) -> None:
        cfg, acc = self.cfg, self.accelerator
        state = self.ckpt.load(acc, latest, extra_reader=self._read_extra_state)
        for key in ("batch_size", "seed"):
            if state.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"resume: checkpoint {latest} was trained with {key}={state.get(key)}, config has "
                    f"{key}={getattr(cfg, key)}; the data order would not continue exactly"
                )
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        # Accelerate restores its micro-batch counter from rank 0's RNG file; with another process count
        # (hence accumulation) it would fall out of step with ours.
        acc.step = self.step * self.accum_steps
        # The schedule follows this run's config from the restored step on: train.steps, lr and warmup may
        # change on resume (moekit.core.run_folder.RESUME_RULES), and the restored optimizer holds the old lr.
        restart_schedule(self.scheduler.scheduler, cfg.lr)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.data_digest = state.get("data_digest")
        if "divergence_guard" in state:  # checkpoints written before it was saved: the guard starts afresh
            self.guard.load_state_dict(state["divergence_guard"])

    # ------------------------------------------------------------------ public
    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``cfg.steps`` (or ``max_steps``, if smaller); checkpoint on return.

        Reaching ``cfg.steps`` also runs a final evaluation and writes ``<run_dir>/final`` with
        ``save_pretrained`` when the model has it. Returns a summary of the run so far.
        """
        cfg, acc = self.cfg, self.accelerator
        stop = cfg.steps if max_steps is None else min(max_steps, cfg.steps)
        shown = acc.is_local_main_process and cfg.progress_bar
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not shown, dynamic_ncols=True)
        window = LogWindow(self.accelerator.device)
        while self.step < stop:
            lr = self.scheduler.get_last_lr()[0]
            self._train_step(window)
            self.step += 1
            bar.update(1)
            final = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or final or self.step == stop:
                metrics = self._log_train(window, lr)
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
            if self.val_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or final):
                window.pause()
                self._log(self.evaluate())
                self._reprobe()
                window.resume()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != stop:
                unlogged = window.seconds()  # trained since the last log event: not in train_seconds yet
                window.pause()
                self.save_checkpoint(unlogged)
                window.resume()
        bar.close()
        self.save_checkpoint(window.seconds())
        if self.step == cfg.steps:
            self.save_final()
        return self.summary()

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean loss over the fixed val windows (sharded over ranks); all ranks get the same numbers."""
        if self.val_data is None:
            raise ValueError("Trainer.evaluate: no val_data was given")
        model = self.unwrapped_model  # no DDP wrapper: evaluation needs no gradient sync
        was_training = model.training
        model.eval()
        self._sync_tokens()
        dev = self.accelerator.device
        sums = torch.zeros(2, dtype=torch.float64, device=dev)  # [loss * targets, targets]
        for chunk in self._eval_chunks:
            batch = self._to_device(self.collate(self.val_data, chunk))
            with self.accelerator.autocast():
                step = self.objective(model, batch)
            n = step.num_tokens.double()
            sums += torch.stack([step.loss.double() * n, n])
        model.train(was_training)
        total = self.accelerator.gather_for_metrics(sums[None]).sum(0)  # [2]
        val_loss = float(total[0] / total[1].clamp(min=1))
        out: dict[str, Any] = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": val_loss}
        if self.tokens_per_byte is not None:
            out["val_bpb"] = val_loss / math.log(2) * self.tokens_per_byte
        self.last_metrics.update(out)
        return out

    def save_checkpoint(self, unlogged_seconds: float = 0.0) -> Path:
        """Checkpoint this step (collective); ``unlogged_seconds``: training time of the open log window."""
        self._refuse_non_finite_state()
        self._sync_tokens()
        state = {
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds + unlogged_seconds,
            "data_digest": self.data_digest,
            "divergence_guard": self.guard.state_dict(),  # the spike check's baseline continues across a resume
            "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
        }
        return self.ckpt.save(self.accelerator, self.step, state, extra_writer=self._write_extra_state)

    def save_final(self) -> Path | None:
        """``save_pretrained`` of the full (unsharded) model into ``<run_dir>/final``, if the model supports
        it; loadable in one process. Collective; the main process writes."""
        if not hasattr(self.unwrapped_model, "save_pretrained"):
            return None
        path = self.run_dir / "final"
        self._refuse_non_finite_state()
        full = self.gather_full_model()
        if full is not None:
            full.save_pretrained(path)
        self.accelerator.wait_for_everyone()
        return path

    def gather_full_model(self) -> nn.Module | None:
        """Collective (every rank must call it): on the main process, a model it can run alone, for sampling or
        saving; None on the other ranks. Under FSDP a plain copy rebuilt from the full state dict; otherwise
        the unwrapped model, which extensions may replace with a copy (e.g. with sharded weights gathered).
        It may share weights with the training model: use it for inference and drop it, do not train it."""
        full = _fsdp_full_model(self.accelerator, self.model) if self._fsdp else self.unwrapped_model
        for ext in self.extensions:
            full = ext.full_model(full, self.ctx)
        return full if self.is_main_process else None

    def summary(self) -> dict[str, Any]:
        """The latest scalar metrics (per-layer lists and sections left out) and the run's totals."""
        out = {k: v for k, v in self.last_metrics.items() if not isinstance(v, (list, dict))}
        out.update(step=self.step, tokens_seen=self.tokens_seen, train_seconds=self.train_seconds)
        out["data_digest"] = self.data_digest[:16] if self.data_digest else None
        if self.train_seconds > 0:
            out["mean_tokens_per_s"] = self.tokens_seen / self.train_seconds
        return out

    def close(self) -> None:
        """Finish trackers and destroy the process group (gloo aborts at exit otherwise)."""
        self.accelerator.end_training()

    # ------------------------------------------------------------------ internals
    @property
    def _fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def _reprobe(self) -> None:
        """Measure the matmul peak again and keep the best: one probe that ran while other processes
        competed for the device would otherwise understate the peak (MFU > 1) for the whole run."""
        if self.cfg.mfu_probe and self.flops_per_token:
            dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float32
            flops = measure_matmul_flops(self.accelerator.device, dtype)
            self.probe_flops = max(self.probe_flops or 0.0, flops)

    def _train_step(self, window: LogWindow) -> None:
        acc, rank, world = self.accelerator, self.accelerator.process_index, self.accelerator.num_processes
        global_idx = self.sampler.indices(self.step)  # [batch_size]
        if self.data_digest is not None:
            link = self.data_digest.encode() + global_idx.to(torch.int64).numpy().tobytes()
            self.data_digest = hashlib.sha256(link).hexdigest()
        local = self.sampler.shard(global_idx, rank, world)  # [batch_size / world]
        self.model.train()
        mbs = self.micro_batch_size
        batches = [
            self._to_device(self.collate(self.train_data, local[m * mbs : (m + 1) * mbs]))
            for m in range(self.accum_steps)
        ]
        weights = micro_batch_weights(self.objective, batches, self.accelerator)
        losses: list[Tensor] = []  # [2] (loss, aux_loss) per micro-batch, for the divergence guard
        for batch, weight in zip(batches, weights):
            with acc.accumulate(self.model):
                out = self._objective_step(batch)
                loss = out.loss if weight is None else out.loss * weight  # this micro-batch's share of the step
                acc.backward(loss + out.aux_loss)
                losses.append(torch.stack([loss.detach().float(), out.aux_loss.detach().float().reshape(())]))
                if acc.sync_gradients:
                    for ext in self.extensions:
                        ext.after_backward(self.unwrapped_model, self.ctx)
                    self._guard_step(window, torch.stack(losses).mean(0))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add(loss, out.aux_loss, out.metrics, out.num_tokens)
            self._pending_tokens += out.num_tokens.detach().to(self._pending_tokens)
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with the optimizer; this is a bug")
        self.scheduler.step()
        for ext in self.extensions:
            ext.after_optimizer_step(self.unwrapped_model, self.ctx)
        if self.after_step is not None:
            self.after_step(self.unwrapped_model)

    def _guard_step(self, window: LogWindow, losses: Tensor) -> None:
        """Clip (or just measure) the gradient norm and stop before ``optimizer.step`` when the step diverged."""
        clip = self.cfg.grad_clip
        norm = self._clip_grad_norm(clip if clip is not None else math.inf)  # inf: measures, scales by 1
        window.grad_norm = norm  # logged whether or not it clipped
        reason = self.guard.check(self.step + 1, losses[0], losses[1], norm, self.accelerator)
        if reason is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self.step + 1, reason, self._last_good_checkpoint())

    def _refuse_non_finite_state(self) -> None:
        """A checkpoint or final model with non-finite weights or optimizer state is never written. Collective."""
        model = self.unwrapped_model
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
        if not all_finite([*model.parameters(), *model.buffers(), *state], self.accelerator):
            reason = "the weights or optimizer state are not finite; refusing to save them"
            raise TrainingDiverged(self.step, reason, self._last_good_checkpoint())

    def _last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint on disk: every saved one passed ``_refuse_non_finite_state``."""
        try:
            return self.ckpt.latest()
        except (OSError, ValueError):
            return None

    def _objective_step(self, batch: dict[str, Tensor]) -> StepOutput:
        if self._compiled is None:
            return self.objective(self.model, batch)
        # Data-dependent sizes inside the model (e.g. per-expert slices) then trace as unbacked SymInts.
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return self.objective(self._compiled, batch)

    def _clip_grad_norm(self, max_norm: float) -> Tensor:
        """The first extension that clips (sharded parameters need their own global norm), else Accelerate."""
        for ext in self.extensions:
            norm = ext.clip_grad_norm(self.unwrapped_model, max_norm, self.ctx)
            if norm is not None:
                return norm
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def _sync_tokens(self) -> None:
        """Add every rank's real target tokens since the last sync to ``tokens_seen`` (one all-reduce; every
        rank calls it at the same points: log events, evaluation, checkpoints)."""
        total = self.accelerator.reduce(self._pending_tokens.clone(), reduction="sum")
        self.tokens_seen += int(total)
        self._pending_tokens.zero_()

    def _log_train(self, window: LogWindow, lr: float) -> dict[str, Any]:
        self._sync_tokens()
        metrics: dict[str, Any] = {"step": self.step, "tokens_seen": self.tokens_seen, "lr": lr}
        metrics.update(window.reduce(self.accelerator))
        if window.grad_norm is not None:
            metrics["grad_norm"] = float(window.grad_norm)
        seconds = window.seconds()  # after reduce(): the device has finished the window's work
        if seconds > 0:
            tps = window.global_tokens / seconds
            metrics["tokens_per_s"] = tps
            if self.probe_flops and self.flops_per_token:
                peak = self.probe_flops * self.accelerator.num_processes
                metrics["mfu"] = 3 * self.flops_per_token * tps / peak
        self.train_seconds += seconds
        for ext in self.extensions:
            metrics.update(ext.step_metrics(self.unwrapped_model, self.ctx))
        window.restart()
        self._log(metrics)
        return metrics

    def _write_extra_state(self, folder: Path) -> Collection[str]:
        model, opt, ctx = self.unwrapped_model, self.optimizer, self.ctx
        return [key for ext in self.extensions for key in ext.save_state(model, opt, folder, ctx)]

    def _read_extra_state(self, folder: Path) -> Collection[str]:
        model, opt, ctx = self.unwrapped_model, self.optimizer, self.ctx
        return [key for ext in self.extensions for key in ext.load_state(model, opt, folder, ctx)]

    def _log(self, metrics: dict[str, Any]) -> None:
        # elapsed training seconds (eval/save excluded) as of the last train log event, for time axes
        metrics.setdefault("train_seconds", round(self.train_seconds, 4))
        self.last_metrics.update(metrics)
        if not self.is_main_process:
            return
        append_event(self.run_dir / METRICS_FILE, metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if scalars and self.cfg.log_with != "none":
            self.accelerator.log(scalars, step=self.step)

    def _start_metrics_file(self) -> None:
        """Fresh run: empty file. Resume: drop events logged after the checkpoint (the run will redo them)."""
        if not self.is_main_process:
            return
        for event in restart_events(self.run_dir / METRICS_FILE, self.step):
            self.last_metrics.update(event)

    def _eval_shard(self) -> list[Tensor]:
        """This rank's micro-batches of the fixed val windows (``moekit.core.data.eval_windows``)."""
        if self.val_data is None:
            return []
        acc, cfg = self.accelerator, self.cfg
        idx = eval_windows(len(self.val_data), cfg.eval_batches * cfg.batch_size, acc.num_processes)
        return list(idx[acc.process_index :: acc.num_processes].split(self.micro_batch_size))

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
