"""The comparison's config and planner, for every task (``TASKS``: name -> adapter). From one MoE base run
config: the dense twin at the same active FLOPs per token, the MoE model, MoE variants or a sweep over one MoE
field at fixed active compute (or the scaling recipe's family), optionally a dense model with the MoE's total
parameters, each at ``compare.seeds`` seeds. All but the decoder (and, for a FLOP budget, the steps) is the
base run's: same data order (``StepSampler`` seeded by ``train.seed``), init seed, optimizer, schedule."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from moekit.core.accounting import flops_per_token
from moekit.core.checks import fail, is_int, is_number
from moekit.core.config import ModelConfig
from moekit.core.layering import build_dataclass, config_to_dict, merge_tree, parse_override, read_yaml, set_dotted
from moekit.core.train_config import TrainConfig
from moekit.experiment.adapter import Row, RunSpec, TaskAdapter, repeated
from moekit.experiment.lm import LMTask
from moekit.experiment.matching import check_matched, dense_twin, describe, moe_name, param_matched_twin
from moekit.experiment.multimodal import MultimodalTask
from moekit.experiment.scaling import ScalingConfig, scaling_models
from moekit.moe.config import MoEConfig

# A new task is one adapter file (a TaskAdapter subclass) and one line here.
TASKS: dict[str, TaskAdapter] = {"lm": LMTask(), "multimodal": MultimodalTask()}
BUDGETS = ("tokens", "flops")
# keys a per-model override may not change: they fix the data order (pairing by seed), the token budget, the
# validation windows every model is scored on and the precision it computes in
FIXED_TRAIN_KEYS = ("seed", "batch_size", "steps", "eval_batches", "mixed_precision")


@dataclass
class CompareConfig:
    """What to compare and how; the ``compare:`` section of a comparison YAML."""

    task: str = "lm"  # a key of TASKS: which adapter plans, trains and reports
    seeds: int = 1  # runs per model, seeds train.seed, train.seed + 1, ...
    param_matched: bool = False  # also train a dense model with the MoE model's total parameters
    budget: str = "tokens"  # one of BUDGETS: equal steps (tokens), or equal decoder training FLOPs
    max_flops_mismatch: float = 0.02  # refuse MoE/dense pairs whose decoder active FLOPs differ by more
    allow_mismatch: bool = False
    variants: list[str] = field(default_factory=list)  # extra MoE runs: "moe.num_experts=16 moe.top_k=4"
    sweep: str | None = None  # "num_experts=1,4,8,16" (also top_k, capacity_factor, router, ...)
    # per-model train overrides, so each model family trains at its own best learning rate (fairness):
    dense_overrides: list[str] = field(default_factory=list)  # e.g. ["train.lr=5.6e-3"], every dense run
    moe_overrides: list[str] = field(default_factory=list)  # the same for every MoE run
    scaling: ScalingConfig | None = None  # a scaling recipe instead of twin + variants (see ScalingConfig)
    workers: int = 1  # runs trained at the same time, each in a fresh process
    threads: int | None = None  # torch intra-op threads per run; None = torch's default
    prompt: str = "**ROMEO**\n"  # task lm: the sample prompt
    sample_tokens: int = 160  # task lm: bytes sampled from each model

    def __post_init__(self) -> None:
        for name, allowed in (("task", tuple(TASKS)), ("budget", BUDGETS)):
            if getattr(self, name) not in allowed:
                fail("CompareConfig", name, getattr(self, name), f"allowed values are {allowed}")
        for name, low in (("seeds", 1), ("workers", 1), ("threads", 1), ("sample_tokens", 0)):
            value = getattr(self, name)
            if not (value is None and name == "threads") and (not is_int(value) or value < low):
                fail("CompareConfig", name, value, f"must be an int >= {low}" + (" or null" * (name == "threads")))
        if not is_number(self.max_flops_mismatch) or not 0 <= self.max_flops_mismatch < 1:
            fail("CompareConfig", "max_flops_mismatch", self.max_flops_mismatch, "must be a number in [0, 1)")
        if not isinstance(self.variants, list) or not all(isinstance(v, str) for v in self.variants):
            fail("CompareConfig", "variants", self.variants, "must be a list of override strings")
        if dup := repeated([" ".join(v.split()) for v in self.variants]):
            fail("CompareConfig", "variants", self.variants, f"variants must be distinct (one MoE model each); {dup}")
        for name in ("dense_overrides", "moe_overrides"):
            train_overrides(getattr(self, name), name)
        if self.sweep is not None:
            parse_sweep(self.sweep)
        if self.scaling is not None and (self.sweep or self.variants or self.param_matched or self.budget != "tokens"):
            fail("CompareConfig", "scaling", self.scaling, "excludes sweep, variants, param_matched and budget=flops")
        if self.sweep and self.variants:
            fail("CompareConfig", "sweep", self.sweep, "give either a sweep or variants, not both")


@dataclass
class Comparison:
    """A loaded comparison: the ``compare`` section and the task's MoE base run config."""

    compare: CompareConfig
    base: Any

    @property
    def task(self) -> TaskAdapter:
        return TASKS[self.compare.task]


def load_comparison(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Comparison:
    """Defaults -> YAML -> dotted overrides. The ``compare`` section and ``compare.*`` overrides make the
    CompareConfig; the rest is the run config of the task that ``compare.task`` names."""
    overrides, tree = list(overrides), (read_yaml(path) if path is not None else None)
    section, items = tree.get("compare") if isinstance(tree, dict) else None, {}
    merge_tree(CompareConfig, items, section or {}, "compare.")
    for key, value in (parse_override(o.removeprefix("compare.")) for o in overrides if o.startswith("compare.")):
        set_dotted(CompareConfig, items, key, value, "compare.")
    compare = build_dataclass(CompareConfig, items, "compare.")
    task = TASKS[compare.task]
    base = task.load_base(path, [o for o in overrides if not o.startswith("compare.")])
    if task.decoder(base).moe is None:
        raise ValueError(
            f"the comparison's base model has no moe section: the comparison starts from a MoE model and derives "
            f"its dense twin; set {task.decoder_key}.moe (e.g. {task.decoder_key}.moe.num_experts=8)"
        )
    return Comparison(compare, base)


def train_overrides(items: Any, name: str = "dense_overrides") -> list[tuple[str, Any]]:
    """``compare.dense_overrides`` / ``moe_overrides`` as ``(key under train, value)`` pairs."""
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        fail("CompareConfig", name, items, "must be a list of 'train.KEY=VALUE' strings")
    out = []
    for text in items:
        key, value = parse_override(text)
        sub = key.removeprefix("train.")
        if not key.startswith("train.") or sub in FIXED_TRAIN_KEYS:
            fail("CompareConfig", name, text, f"only train.* keys, except {FIXED_TRAIN_KEYS}, may differ per model")
        set_dotted(TrainConfig, {}, sub, value, "train.")  # unknown keys fail here, naming the allowed ones
        out.append((sub, value))
    return out


def overridden(config: Any, pairs: Iterable[tuple[str, Any]], prefix: str = "") -> Any:
    """A copy of the config dataclass ``config`` with dotted ``(key, value)`` overrides, validated."""
    tree = config_to_dict(config)
    for key, value in pairs:
        set_dotted(type(config), tree, key, value, prefix)
    return build_dataclass(type(config), tree, prefix)


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("moe.")
    allowed = [f.name for f in dataclasses.fields(MoEConfig)]
    if not sep or key not in allowed or not values.strip():
        fail("CompareConfig", "sweep", text, f"must look like 'num_experts=1,4,8' with a key from {allowed}")
    try:  # as a dotted override reads its value (a YAML error names the sweep); with_moe coerces and validates
        parsed = [parse_override(f"{key}={v}")[1] for v in values.split(",")]
    except ValueError as e:
        fail("CompareConfig", "sweep", text, str(e))
    if dup := repeated(parsed):
        fail("CompareConfig", "sweep", text, f"values must be distinct (one MoE model each); {dup}")
    return key, parsed


def with_moe(model: ModelConfig, **changes: Any) -> ModelConfig:
    """Change MoE fields at fixed active compute: top_k * d_expert is held constant. The changes go through
    the dotted-override path (:func:`overridden`): ``'1e-3'`` (YAML 1.1 text) is a float, bad values are refused
    naming the field."""
    base = model.moe
    assert base is not None
    new = dict(changes)
    if "num_experts" in new and "top_k" not in new and is_int(new["num_experts"]):
        new["top_k"] = min(base.top_k, new["num_experts"])
    if "top_k" in new and "d_expert" not in new and is_int(new["top_k"]) and new["top_k"] > 0:
        new["d_expert"] = max(1, round(base.top_k * base.d_expert / new["top_k"]))
    if new.get("router") == "switch":
        new.setdefault("top_k", 1)
        new["d_expert"] = base.top_k * base.d_expert // new["top_k"]
    if new.get("router") == "expert_choice" and base.capacity_factor is None and "capacity_factor" not in new:
        new["capacity_factor"] = 1.0
    return overridden(model, [(f"moe.{k}", v) for k, v in new.items()])


def apply_overrides(model: ModelConfig, text: str) -> ModelConfig:
    """A variant: space-separated dotted overrides of the decoder config (``moe.top_k=4 d_model=96``)."""
    pairs = [(k.removeprefix("model.").removeprefix("lm."), v) for k, v in map(parse_override, text.split())]
    return overridden(model, pairs)


def plan_runs(cmp: Comparison) -> list[RunSpec]:
    """Every (model, seed) run of the comparison, dense twin first; checks the compute matching."""
    c, task, base = cmp.compare, cmp.task, cmp.base
    moe, seq = task.decoder(base), task.seq_len(base)
    models: list[tuple[str, str, ModelConfig, Any]] = []  # (name, kind, decoder, sweep value)
    if c.scaling is not None:
        models = scaling_models(c.scaling, moe, seq)
    elif c.sweep:
        key, values = parse_sweep(c.sweep)
        for v in values:
            m = with_moe(moe, **{key: v})
            # Text the override path read as a number ('1e-2' in YAML 1.1) is named and plotted as that number.
            v = getattr(m.moe, key) if isinstance(v, str) else v
            models.append((f"moe-{key}={v}", "moe", m, v))
    else:
        models.append((moe_name(moe.moe), "moe", moe, None))
        for text in c.variants:
            m = apply_overrides(moe, text)
            if m.moe is None:
                fail("CompareConfig", "variants", text, "removes the MoE; variants must stay MoE")
            name = moe_name(m.moe)
            models.append((f"{name}[{text}]" if any(name == n for n, *_ in models) else name, "moe", m, None))
    if c.scaling is not None:
        _check_distinct(models, "scaling.moe_experts", c.scaling.moe_experts)
    else:
        _check_distinct(models, *(("sweep", c.sweep) if c.sweep else ("variants", c.variants)))
    twin = next((m for n, _, m, _ in models if n == "dense"), None) or dense_twin(moe, seq)
    if c.scaling is None:
        models.insert(0, ("dense", "dense", twin, None))
    if c.param_matched:
        models.append(("dense-param-matched", "dense", param_matched_twin(moe), None))
    if not c.allow_mismatch:
        ref = describe("dense", twin, seq)
        for name, kind, m, _ in models:
            if kind == "moe":
                check_matched(describe(name, m, seq), ref, "flops_per_token", c.max_flops_mismatch)

    specs = []
    for name, kind, m, value in models:
        train = overridden(base.train, train_overrides(getattr(c, f"{kind}_overrides"), f"{kind}_overrides"), "train.")
        if c.budget == "flops":  # same tokens per step, so steps scale inversely with FLOPs per token
            steps = max(1, round(train.steps * flops_per_token(moe, seq) / flops_per_token(m, seq)))
            train = dataclasses.replace(train, steps=steps, warmup_steps=min(train.warmup_steps, steps))
        for s in range(c.seeds):
            run = dataclasses.replace(task.with_decoder(base, m), train=dataclasses.replace(train, seed=train.seed + s))
            specs.append(RunSpec(task.name, name, kind, train.seed + s, run, value))
    return specs


def _check_distinct(models: list[tuple[str, str, ModelConfig, Any]], field: str, value: Any) -> None:
    """Refuse two models of one name (they would share run folders and the verdicts' seed pairs) or of one
    decoder (the same runs trained twice), naming the ``compare`` field that planned them."""
    for i, (name, _, m, _) in enumerate(models):
        for other, _, m2, _ in models[:i]:
            if name == other or m == m2:
                what = f"the model {name!r} twice" if name == other else f"{name!r}, the same model as {other!r}"
                fail("CompareConfig", field, value, f"it plans {what}; each model must be distinct")


def matching_table(specs: list[RunSpec], state: Any = None) -> list[Row]:
    """One row per model: the task's facts (params, FLOPs, steps): what the comparison holds equal."""
    firsts = {s.name: s for s in reversed(specs)}  # each model's first run
    return [dict(name=s.name, kind=s.kind, **TASKS[s.task].facts(s.run, state)) for s in specs if firsts[s.name] is s]
