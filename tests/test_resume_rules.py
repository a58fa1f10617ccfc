"""Resume rules (moekit.core.run_folder.RESUME_RULES): every field of every run config is classified, a fixed
field changed on resume is refused naming it with both values, a may-change field is accepted."""

from __future__ import annotations

import pytest

from moekit.core.configio import RunConfig, load_run_config
from moekit.core.layering import config_to_dict, flatten_dict
from moekit.core.run_folder import FIXED, MAY_CHANGE, RESUME_RULES, RunFolderError, resume_rule, save_run_config
from moekit.multimodal.train import MultimodalRunConfig, load_mm_run_config

CONFIGS = {"lm": (RunConfig, load_run_config), "multimodal": (MultimodalRunConfig, load_mm_run_config)}

# One changed value per classified field (dotted override value as a recipe would pass it). A new field in the
# table needs a row here, so that its class is exercised, not just declared.
CHANGES: dict[str, str | dict[str, str]] = {
    "model": {"lm": "model.n_layers=3", "multimodal": "model.lm.n_layers=3"},
    "train.steps": "train.steps=50",
    "train.lr": "train.lr=0.01",
    "train.warmup_steps": "train.warmup_steps=7",
    "train.min_lr_ratio": "train.min_lr_ratio=0.5",
    "train.decay": "train.decay=linear",
    "train.weight_decay": "train.weight_decay=0.2",
    "train.betas": "train.betas=[0.8,0.9]",
    "train.adam_eps": "train.adam_eps=1e-6",
    "train.grad_clip": "train.grad_clip=null",
    "train.divergence_factor": "train.divergence_factor=null",
    "train.batch_size": "train.batch_size=16",
    "train.micro_batch_size": "train.micro_batch_size=8",
    "train.seed": "train.seed=3",
    "train.mixed_precision": "train.mixed_precision=bf16",
    "train.eval_every": "train.eval_every=5",
    "train.eval_batches": "train.eval_batches=9",
    "train.log_every": "train.log_every=3",
    "train.save_every": "train.save_every=2",
    "train.keep_checkpoints": "train.keep_checkpoints=5",
    "train.log_with": "train.log_with=none",
    "train.progress_bar": "train.progress_bar=false",
    "train.mfu_probe": "train.mfu_probe=false",
    "train.cpu": "train.cpu=true",
    "train.compile": "train.compile=true",
    "train.compile_backend": "train.compile_backend=eager",
    "data.seq_len": "data.seq_len=32",
    "data.train_samples": "data.train_samples=999",
    "data.val_samples": "data.val_samples=99",
    "data.speech": "data.speech.rates=[150]",
    "data.eval_voices": "data.eval_voices=[en-us]",
    "data.cache_root": "data.cache_root=/elsewhere",
    "data.pad_to_multiple_of": "data.pad_to_multiple_of=4",
    "tasks": "tasks.text_tokens=32",
    "eval.samples_per_task": "eval.samples_per_task=7",
    "eval.batch_size": "eval.batch_size=7",
    "eval.every": "eval.every=7",
    "parallel.expert_parallel_size": "parallel.expert_parallel_size=2",
    "parallel.dispatch": "parallel.dispatch=reference",
}
SINGLE_VALUED = {"data.corpus", "data.tokenizer"}  # one allowed value today: nothing to change


def _leaves(cls) -> list[str]:
    return sorted(flatten_dict(config_to_dict(cls())))


def _keys_of(cls) -> set[str]:
    keys = set()
    for leaf in _leaves(cls):
        parts = leaf.split(".")
        keys |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return keys


@pytest.mark.parametrize("task", CONFIGS)
def test_every_field_of_every_run_config_is_classified(task):
    cls = CONFIGS[task][0]
    unclassified = [k for k in _leaves(cls) if resume_rule(k) is None]
    assert not unclassified, f"{cls.__name__}: add these fields to RESUME_RULES: {unclassified}"


def test_every_rule_names_a_real_field_and_has_a_test_change():
    every = set().union(*(_keys_of(cls) for cls, _ in CONFIGS.values()))
    assert set(RESUME_RULES) <= every, f"stale rows: {sorted(set(RESUME_RULES) - every)}"
    assert set(RESUME_RULES) - SINGLE_VALUED == set(CHANGES)
    assert set(RESUME_RULES.values()) == {FIXED, MAY_CHANGE}


def _cases():
    for key, override in CHANGES.items():
        for task, (cls, _) in CONFIGS.items():
            if key in _keys_of(cls):
                change = override[task] if isinstance(override, dict) else override
                yield pytest.param(task, key, change, id=f"{task}-{key}")


@pytest.mark.parametrize("task, key, override", list(_cases()))
def test_a_change_on_resume_is_refused_or_accepted_by_its_class(tmp_path, task, key, override):
    cls, load = CONFIGS[task]
    saved = cls()
    save_run_config(saved, tmp_path)
    changed = load(tmp_path / "config.yaml", [override])
    assert config_to_dict(changed) != config_to_dict(saved)  # the override really changes something
    if RESUME_RULES[key] == MAY_CHANGE:
        changed.check_resumable(tmp_path)
        return
    field = override.split("=")[0]
    old = flatten_dict(config_to_dict(saved))[field]
    with pytest.raises(RunFolderError) as info:
        changed.check_resumable(tmp_path)
    msg = str(info.value)
    assert f"{field}: run has {old!r}, now " in msg and "fixed on resume" in msg and str(tmp_path) in msg


def test_a_run_folder_from_before_a_new_field_resumes_and_a_changed_field_is_still_refused(tmp_path):
    # An older version wrote config.yaml without the fields added since (here: qk_norm, qkv_bias); their
    # defaults keep the old behaviour, so they must not read as a change.
    import yaml

    from moekit.core.run_folder import check_resumable

    cfg = load_run_config("recipes/configs/debug.yaml")
    save_run_config(cfg, tmp_path)
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for key in ("qk_norm", "qkv_bias"):
        tree["model"].pop(key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    check_resumable(cfg, tmp_path)
    changed = load_run_config("recipes/configs/debug.yaml", ["model.qk_norm=head"])
    with pytest.raises(RunFolderError, match="model.qk_norm: run has 'none'"):
        check_resumable(changed, tmp_path)
