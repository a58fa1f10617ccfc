"""Multimodal training: the run config, the Trainer wiring, and held-out evaluation per task.

Shapes: ``B`` batch rows, ``T`` tokens, ``V`` vocab, ``L`` MoE layers, ``Gr`` modality groups, ``E`` experts.

Data. The training set is virtual: item ``i`` is ``DigitTasks.sample(step=i, j=0, split="train")``, so the
Trainer's ``StepSampler`` picks items exactly as it picks text windows (same order on resume and across
compared models). The val set is items of the ``eval`` split (held-out images, unseen voices, val plays);
``val_loss`` is the mean CE over their answer and text tokens.

Task accuracy (``<task>_acc``) is measured on held-out samples drawn apart from the val-loss items
(``sample(i, j=1, split="eval")``) by likelihood ranking: every candidate answer (10 captions, 10
transcripts, same/different) is scored by the summed log-probability of its tokens plus EOS after the
sample's prompt, and the sample counts as correct when the gold answer ranks first. Multiple-choice
scoring is cheaper than generation (one batched forward, no decoding loop) and robust: a malformed
generation cannot happen. Chance: caption 10%, transcribe 10%, compare 50% (``same_prob`` = 0.5). ``<task>_loss`` is the
gold answer's CE per token (for ``text``: over the window). ``routing`` holds per-modality MoE telemetry
summed over the val set: load per expert per layer per modality and each expert's modality purity.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor
from torch.utils.data import Dataset

from moekit.core.layering import config_to_dict
from moekit.core.model import IGNORE_INDEX, ModelOutput
from moekit.core.objective import LMObjective
from moekit.core.pretrained import load_weights, read_config, save_pretrained_folder
from moekit.core.run_folder import check_resumable, load_run_file, migrate_placement, save_run_config
from moekit.core.tokenizer import ByteTokenizer
from moekit.core.train import TrainConfig, Trainer
from moekit.moe.config import ParallelConfig
from moekit.moe.extension import MoEExtension
from moekit.moe.modality import mean_purity, modality_purity
from moekit.multimodal.config import MultimodalConfig, as_tuple
from moekit.multimodal.model import MultimodalLM
from moekit.multimodal.sequence import Sample, TextPart, build_batch
from moekit.multimodal.speech import DIGIT_WORDS, SpeechConfig
from moekit.multimodal.tasks import DigitTasks, DigitTasksConfig, load_digit_tasks

CANDIDATES: dict[str, tuple[str, ...]] = {
    "caption": tuple(f"a handwritten {w}" for w in DIGIT_WORDS),
    "transcribe": DIGIT_WORDS,
    "compare": ("same", "different"),
}
CHANCE = {"caption": 0.1, "transcribe": 0.1, "compare": 0.5}
EVAL_J = 1  # sample slot of the accuracy samples: disjoint from the val-loss items (slot 0)


# ---------------------------------------------------------------- config
@dataclass
class MMDataConfig:
    """Where the samples come from: virtual set sizes, the spoken-digit grid and its held-out voices."""

    train_samples: int = 200_000  # items of the virtual training set (each a fresh draw)
    val_samples: int = 1024  # items of the virtual val set (the Trainer evaluates eval_batches * batch_size)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    eval_voices: tuple[str, ...] | None = None  # None = every 7th voice of the grid (default_eval_voices)
    cache_root: str | None = None  # speech cache; None = ~/.cache/moekit/speech
    pad_to_multiple_of: int = 8

    def __post_init__(self) -> None:
        for name in ("train_samples", "val_samples", "pad_to_multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MMDataConfig.{name}={value!r} is invalid: must be an int >= 1")
        if isinstance(self.speech, dict):
            self.speech = SpeechConfig(**self.speech)
        if self.eval_voices is not None:  # a bare 'en+f2' is refused, not split into letters
            self.eval_voices = as_tuple("MMDataConfig", "eval_voices", self.eval_voices, "[en+f2]")
            if not all(isinstance(v, str) and v for v in self.eval_voices):
                raise ValueError(
                    f"MMDataConfig.eval_voices={self.eval_voices!r} is invalid: entries must be voice names"
                )


@dataclass
class MMEvalConfig:
    """Held-out task accuracy: how many samples per task, rows per forward, and when."""

    samples_per_task: int = 200
    batch_size: int = 100  # candidate rows per forward
    every: int = 0  # steps between task evaluations (at val-loss evaluations only); 0 = only at the end

    def __post_init__(self) -> None:
        for name, low in (("samples_per_task", 1), ("batch_size", 1), ("every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MMEvalConfig.{name}={value!r} is invalid: must be an int >= {low}")


@dataclass
class MultimodalRunConfig:
    """Everything a ``train_multimodal`` run needs; written resolved to ``<run_dir>/config.yaml``."""

    model: MultimodalConfig = field(default_factory=MultimodalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: DigitTasksConfig = field(default_factory=DigitTasksConfig)
    data: MMDataConfig = field(default_factory=MMDataConfig)
    eval: MMEvalConfig = field(default_factory=MMEvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # where the decoder's MoE layers run

    def __post_init__(self) -> None:
        if self.tasks.weights.get("text", 0) > 0 and self.tasks.text_tokens + 1 > self.model.lm.max_seq_len:
            raise ValueError(
                f"MultimodalRunConfig: tasks.text_tokens={self.tasks.text_tokens} (+ BOS) exceeds "
                f"model.lm.max_seq_len={self.model.lm.max_seq_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``config.yaml`` into ``run_dir`` atomically."""
        return save_run_config(self, run_dir)

    def check_resumable(self, run_dir: str | os.PathLike) -> None:
        """Refuse to resume ``run_dir`` with another model (see ``moekit.core.run_folder.check_resumable``)."""
        check_resumable(self, run_dir, migrate=_migrate)


# Older run folders kept placement in the decoder's MoE section: moved to `parallel` on load (logged).
_migrate = functools.partial(migrate_placement, moe_path="model.lm.moe")


def load_mm_run_config(
    path: str | os.PathLike | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> MultimodalRunConfig:
    """Defaults -> YAML ``path`` -> dotted ``overrides``, like ``moekit.core.configio.load_run_config``: a
    top-level ``compare`` section (the comparison's, so one preset serves both recipes) is ignored, and an
    older file's ``model.lm.moe.dispatch`` / ``expert_parallel_size`` move to ``parallel`` (logged)."""
    return load_run_file(MultimodalRunConfig, path, overrides, ignore=("compare",), migrate=_migrate)


# ---------------------------------------------------------------- data and model glue
class TaskSamples(Dataset):
    """Virtual dataset: item ``i`` is ``tasks.sample(i, slot, split)`` (drawn on access, deterministic)."""

    def __init__(self, tasks: DigitTasks, split: str, size: int, slot: int = 0) -> None:
        self.tasks, self.split, self.size, self.slot = tasks, split, size, slot

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.size:
            raise IndexError(f"TaskSamples: index {i} outside [0, {self.size})")
        return self.tasks.sample(int(i), self.slot, self.split)


class SampleCollate:
    """``collate(dataset, indices)`` for the Trainer: samples -> one padded batch for a model's layout."""

    def __init__(self, model: MultimodalLM, pad_to_multiple_of: int = 8) -> None:
        self.layout, self.cfg = model.layout, model.cfg
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tokenizer = ByteTokenizer()

    def samples(self, samples: Sequence[Sample]) -> dict[str, Tensor]:
        return build_batch(
            samples,
            self.tokenizer,
            self.layout,
            bidirectional_media=self.cfg.bidirectional_media,
            pad_to_multiple_of=self.pad_to_multiple_of,
            max_len=self.cfg.lm.max_seq_len,
        )

    def __call__(self, dataset: Dataset, indices: Tensor | Sequence[int]) -> dict[str, Tensor]:
        return self.samples([dataset[int(i)] for i in indices])


class TrainableMultimodalLM(MultimodalLM):
    """``MultimodalLM`` whose forward also takes the batch as keyword arguments (the Trainer calls
    ``model(**batch)``); parameter names are MultimodalLM's. Saves/loads ``config.json`` + safetensors.

    Buffers that are views into a larger storage (torch.hann_window(400) lives in a 401-element one) are
    copied into their own storage at construction: safetensors, and so ``accelerator.load_state``,
    refuses to load tensors that do not cover their storage.
    """

    def __init__(self, cfg: MultimodalConfig) -> None:
        super().__init__(cfg)
        for module in self.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.untyped_storage().nbytes() != buf.numel() * buf.element_size():
                    module._buffers[name] = buf.clone()

    def forward(self, batch: dict[str, Tensor] | None = None, **tensors: Tensor) -> ModelOutput:
        return super().forward(batch if batch is not None else tensors)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tied weights stored once), all-or-nothing."""
        save_pretrained_folder(self, self.cfg.to_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> TrainableMultimodalLM:
        """Load a ``save_pretrained`` folder (names, dtypes and HF folders checked by ``moekit.core.pretrained``)."""
        model = cls(MultimodalConfig.from_dict(read_config(directory)))
        load_weights(model, directory, map_location)
        return model


# ---------------------------------------------------------------- held-out evaluation
def _answer_logprobs(model: MultimodalLM, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per row: summed log-probability of the target tokens and their count (float64 ``[B]`` each)."""
    out = model(batch)
    labels_bt = batch["labels"]
    logp_btv = torch.log_softmax(out.logits.float(), dim=-1)
    target_bt = labels_bt != IGNORE_INDEX
    lp_bt = logp_btv.gather(-1, labels_bt.clamp(min=0)[..., None])[..., 0] * target_bt
    return lp_bt.sum(1).double(), target_bt.sum(1).double()


def _with_answer(sample: Sample, answer: str) -> Sample:
    *prompt, gold = sample.parts
    if not (isinstance(gold, TextPart) and gold.target):
        raise ValueError(f"evaluate_tasks: the last part of a {sample.task!r} sample is not the answer")
    return Sample((*prompt, TextPart(answer, target=True, eos=True)), sample.task)


@torch.no_grad()
def evaluate_tasks(
    model: MultimodalLM,
    tasks: DigitTasks,
    collate: SampleCollate,
    cfg: MMEvalConfig,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
) -> dict[str, Tensor]:
    """Held-out accuracy and gold-answer loss per active task (module docstring).

    Returns float64 sums ``{"<task>_correct", "<task>_nll", "<task>_tokens", "<task>_count"}`` over this
    rank's share of the samples (``i % world == rank``); :func:`finish_task_metrics` turns the all-rank
    sums into ``<task>_acc`` / ``<task>_loss``.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    for task in tasks.tasks:
        single = DigitTasks(dataclasses.replace(tasks.cfg, weights={task: 1.0}), tasks.splits, tasks.tokenizer)
        samples = [single.sample(i, EVAL_J, "eval") for i in range(rank, cfg.samples_per_task, world)]
        cands = CANDIDATES.get(task)
        correct = nll = tokens = torch.zeros((), dtype=torch.float64)
        if cands is None:  # text: the window's own CE
            for lo in range(0, len(samples), cfg.batch_size):
                batch = _to(collate.samples(samples[lo : lo + cfg.batch_size]), device)
                lp, n = _answer_logprobs(model, batch)
                nll, tokens = nll - lp.sum().cpu(), tokens + n.sum().cpu()
        else:
            per_chunk = max(1, cfg.batch_size // len(cands))
            for lo in range(0, len(samples), per_chunk):
                chunk = samples[lo : lo + per_chunk]
                gold = [cands.index(s.parts[-1].text) for s in chunk]  # ValueError: unknown answer
                rows = [_with_answer(s, c) for s in chunk for c in cands]
                lp, n = _answer_logprobs(model, _to(collate.samples(rows), device))
                lp_sc, n_sc = lp.cpu().view(len(chunk), len(cands)), n.cpu().view(len(chunk), len(cands))
                gold_s = torch.tensor(gold)
                correct = correct + (lp_sc.argmax(1) == gold_s).sum()
                rows_s = torch.arange(len(chunk))
                nll, tokens = nll - lp_sc[rows_s, gold_s].sum(), tokens + n_sc[rows_s, gold_s].sum()
        count = torch.tensor(float(len(samples)), dtype=torch.float64)
        sums.update({f"{task}_correct": correct, f"{task}_nll": nll, f"{task}_tokens": tokens, f"{task}_count": count})
    model.train(was_training)
    return sums


def finish_task_metrics(sums: dict[str, Tensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in sums:
        if key.endswith("_count"):
            task = key.removesuffix("_count")
            if task in CANDIDATES:
                out[f"{task}_acc"] = float(sums[f"{task}_correct"] / sums[key].clamp(min=1))
            out[f"{task}_loss"] = float(sums[f"{task}_nll"] / sums[f"{task}_tokens"].clamp(min=1))
    return out


@torch.no_grad()
def routing_profile(model: MultimodalLM, batches: Sequence[dict[str, Tensor]]) -> dict[str, Tensor] | None:
    """Per-modality routing summed over ``batches`` (eval mode): ``by_group [L, Gr, E]`` kept assignments
    and ``tokens [L, Gr]`` real tokens; None for a dense model."""
    was_training = model.training
    model.eval()
    by_group = tokens = None
    for batch in batches:
        stats = model(batch).moe_stats
        if not stats:
            break
        bg = torch.stack([s.tokens_per_expert_by_group for s in stats]).double().cpu()  # [L, Gr, E]
        tk = torch.stack([s.tokens_by_group for s in stats]).double().cpu()  # [L, Gr]
        by_group, tokens = (bg, tk) if by_group is None else (by_group + bg, tokens + tk)
    model.train(was_training)
    return None if by_group is None else {"by_group": by_group, "tokens": tokens}


def routing_summary(profile: dict[str, Tensor]) -> dict[str, Any]:
    """JSON-ready per-layer load per modality, expert purity and its load-weighted mean."""
    by_group, tokens = profile["by_group"], profile["tokens"]
    return {
        "tokens_per_expert_by_group": by_group.tolist(),
        "tokens_by_group": tokens.tolist(),
        "modality_purity": [modality_purity(b, t).tolist() for b, t in zip(by_group, tokens)],
        "mean_modality_purity": [mean_purity(b, t).item() for b, t in zip(by_group, tokens)],
    }


def _to(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class MultimodalTrainer(Trainer):
    """The generic Trainer plus held-out task accuracy and per-modality routing at evaluation time."""

    def __init__(self, *args: Any, tasks: DigitTasks, eval_cfg: MMEvalConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks, self.eval_cfg = tasks, eval_cfg

    def evaluate(self) -> dict[str, Any]:
        out = super().evaluate()
        every = self.eval_cfg.every
        if self.step == self.cfg.steps or (every and self.step % every == 0):
            out.update(self.evaluate_tasks())
            self.last_metrics.update(out)
        return out

    def evaluate_tasks(self) -> dict[str, Any]:
        """Task accuracies/losses (sharded over ranks) and the routing profile of the val items."""
        acc, model = self.accelerator, self.unwrapped_model
        sums = evaluate_tasks(
            model, self.tasks, self.collate, self.eval_cfg, acc.device, acc.process_index, acc.num_processes
        )
        keys = sorted(sums)
        total = acc.reduce(torch.stack([sums[k] for k in keys]).to(acc.device), reduction="sum").cpu()
        out: dict[str, Any] = finish_task_metrics(dict(zip(keys, total)))
        batches = [self._to_device(self.collate(self.val_data, chunk)) for chunk in self._eval_chunks]
        profile = routing_profile(model, batches)
        if profile is not None:  # this rank's val shard; the other ranks' shards look alike
            out["routing"] = routing_summary(profile)
        return out

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in super().summary().items() if k != "routing"}


# ---------------------------------------------------------------- wiring
def load_run_tasks(cfg: MultimodalRunConfig) -> DigitTasks:
    return load_digit_tasks(cfg.tasks, cfg.model, cfg.data.speech, cfg.data.cache_root, cfg.data.eval_voices)


def build_multimodal_trainer(
    cfg: MultimodalRunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    tasks: DigitTasks | None = None,
    expect_processes: int | None = None,
) -> MultimodalTrainer:
    """Load the task data (or reuse ``tasks``), build the model and its Trainer, write ``config.yaml``."""
    run_dir = Path(run_dir)
    if resume:
        cfg.check_resumable(run_dir)
    tasks = tasks if tasks is not None else load_run_tasks(cfg)
    set_seed(cfg.train.seed)  # identical initial weights on every rank and on every rerun
    model = TrainableMultimodalLM(cfg.model)
    collate = SampleCollate(model, cfg.data.pad_to_multiple_of)
    trainer = MultimodalTrainer(
        model,
        cfg.train,
        run_dir,
        TaskSamples(tasks, "train", cfg.data.train_samples),
        TaskSamples(tasks, "eval", cfg.data.val_samples),
        resume=resume,
        flops_per_token=flops_profile(model, tasks, collate, cfg.train.batch_size)["per_token"]["total"],
        hparams=cfg.to_dict(),
        collate=collate,
        tasks=tasks,
        eval_cfg=cfg.eval,
        expect_processes=expect_processes,
        # A rank whose micro-batch holds no image (or no clip) gives that encoder no gradient in the step.
        find_unused_parameters=True,
        extensions=[MoEExtension(cfg.parallel)],  # a no-op for a dense decoder
        objective=LMObjective(),
    )
    if trainer.is_main_process:
        cfg.save(run_dir)
    return trainer


def flops_profile(
    model: MultimodalLM, tasks: DigitTasks, collate: SampleCollate, batch_size: int, num_batches: int = 4
) -> dict[str, Any]:
    """Forward FLOPs of the training mixture, encoders included, from the first ``num_batches`` training
    batches (``MultimodalLM.batch_flops``: padding excluded): per sample and per real target token (labels !=
    -100, what the Trainer counts as tokens, so that its MFU = 3 x FLOPs per target token x target tokens/s),
    split into ``lm`` / ``image`` / ``audio`` / ``total``."""
    data = TaskSamples(tasks, "train", num_batches * batch_size)
    sums = {"lm": 0, "image": 0, "audio": 0, "total": 0}
    tokens = 0
    for b in range(num_batches):
        batch = collate(data, range(b * batch_size, (b + 1) * batch_size))
        for k, v in model.batch_flops(batch).items():
            sums[k] += v
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    n = num_batches * batch_size
    return {
        "per_sample": {k: v / n for k, v in sums.items()},
        "per_token": {k: round(v / max(tokens, 1)) for k, v in sums.items()},
        "samples": n,
    }
