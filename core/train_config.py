"""TrainConfig: optimisation, evaluation and bookkeeping of one run (the ``train`` section of a recipe YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.core.checks import fail, is_finite_number, is_int
from moekit.core.optim import DECAY_SCHEDULES

MIXED_PRECISIONS = ("no", "bf16")
TRACKERS = ("tensorboard", "none")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


@dataclass
class TrainConfig:
    """Optimisation, evaluation and bookkeeping of one run. Batch sizes count sequences."""

    steps: int = 1000  # optimizer steps; the lr schedule spans exactly these
    batch_size: int = 32  # global batch: sequences per optimizer step over all ranks and micro-batches
    micro_batch_size: int | None = None  # sequences per forward on one rank; None = batch_size / num_processes
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    # A warmup longer than ``steps`` is allowed (a preset's warmup with a tiny ``steps`` override, e.g. a smoke
    # test): the run then ends inside the warmup, below the peak lr.
    warmup_steps: int = 100
    decay: str = "cosine"  # one of DECAY_SCHEDULES
    weight_decay: float = 0.1  # matrices only (see optim.split_decay_params)
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    # Stop (TrainingDiverged) when a step's loss exceeds this multiple of the running median of recent step
    # losses (moekit.core.guard); None = no spike check. Non-finite losses and gradients always stop a run.
    divergence_factor: float | None = 10.0
    mixed_precision: str = "no"  # "no" (float32) or "bf16" autocast (CPU too)
    eval_every: int = 200  # steps between evaluations; 0 = only at the end
    eval_batches: int = 4  # val windows evaluated = eval_batches * batch_size (capped by the val set)
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = only when train() returns
    keep_checkpoints: int = 2
    seed: int = 0
    log_with: str = "tensorboard"  # one of TRACKERS
    progress_bar: bool = True
    mfu_probe: bool = True  # time a matmul at start-up for the MFU denominator
    cpu: bool = False  # force CPU even when an accelerator is present
    compile: bool = False  # torch.compile the training forward (evaluation, sampling, checkpoints stay eager)
    compile_backend: str = "inductor"  # one of COMPILE_BACKENDS; aot_eager traces alike without code generation

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        for name, low in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("eval_batches", 1),
                          ("keep_checkpoints", 1), ("warmup_steps", 0), ("eval_every", 0), ("save_every", 0),
                          ("seed", 0)):  # fmt: skip
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                fail("TrainConfig", name, getattr(self, name), f"must be an int >= {low}")
        mb = self.micro_batch_size
        if mb is not None and (not is_int(mb) or mb < 1 or self.batch_size % mb):
            fail(
                "TrainConfig", "micro_batch_size", mb, f"must be an int >= 1 that divides batch_size={self.batch_size}"
            )
        for name, ok, rule in (
            ("lr", lambda x: x > 0, "> 0"),
            ("min_lr_ratio", lambda x: 0 <= x <= 1, "in [0, 1]"),
            ("weight_decay", lambda x: x >= 0, ">= 0"),
            ("adam_eps", lambda x: x > 0, "> 0"),
            ("grad_clip", lambda x: x > 0, "> 0, or None for no clipping"),
            ("divergence_factor", lambda x: x > 1, "> 1, or None for no loss-spike check"),
        ):
            value = getattr(self, name)
            if value is None and name in ("grad_clip", "divergence_factor"):
                continue
            # is_finite_number: inf/nan pass every comparison above (or fail it silently) and diverge at step 1
            if not (is_finite_number(value) and ok(value)):
                fail("TrainConfig", name, value, f"must be a finite number {rule}")
            setattr(self, name, float(value))
        if not isinstance(self.betas, (list, tuple)):
            fail("TrainConfig", "betas", self.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(is_finite_number(b) and 0 <= b < 1 for b in self.betas):
            fail("TrainConfig", "betas", self.betas, "must be two numbers in [0, 1)")
        for name, choices in (
            ("decay", DECAY_SCHEDULES),
            ("mixed_precision", MIXED_PRECISIONS),
            ("log_with", TRACKERS),
            ("compile_backend", COMPILE_BACKENDS),
        ):
            if getattr(self, name) not in choices:
                fail("TrainConfig", name, getattr(self, name), f"allowed values are {', '.join(choices)}")
        for name in ("progress_bar", "mfu_probe", "cpu", "compile"):
            if not isinstance(getattr(self, name), bool):
                fail("TrainConfig", name, getattr(self, name), "must be true or false")
