"""Config layering: dataclass defaults -> YAML file -> dotted overrides; key and value errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from moekit.core.config import ModelConfig
from moekit.core.configio import DataConfig, RunConfig, load_run_config
from moekit.core.layering import load_config, parse_override
from moekit.core.train import TrainConfig
from moekit.moe.config import MoEConfig, ParallelConfig


def _yaml(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_only():
    assert load_run_config() == RunConfig(ModelConfig(), TrainConfig(), DataConfig(), ParallelConfig())


def test_yaml_then_overrides_later_layer_wins(tmp_path):
    path = _yaml(tmp_path, {"model": {"d_model": 128, "n_layers": 3}, "train": {"steps": 7, "lr": 0.002}})
    cfg = load_run_config(path, ["model.d_model=96", "train.warmup_steps=3"])
    assert cfg.model.d_model == 96  # override beats YAML
    assert cfg.model.n_layers == 3  # YAML beats default
    assert cfg.train.steps == 7 and cfg.train.lr == 0.002 and cfg.train.warmup_steps == 3
    assert cfg.model.n_heads == 4 and cfg.data.seq_len == 128  # untouched defaults


def test_override_values_are_parsed_and_coerced():
    cfg = load_run_config(
        None,
        [
            "train.lr=3e-4",  # YAML 1.1 reads this as text; the float field converts it
            "train.weight_decay=0",  # int -> float
            "train.grad_clip=null",
            "train.betas=[0.8, 0.9]",
            "train.progress_bar=false",
            "train.mixed_precision=no",  # YAML reads unquoted `no` as false
            "model.n_kv_heads=2",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.grad_clip is None
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.progress_bar is False
    assert cfg.train.mixed_precision == "no"
    assert cfg.model.n_kv_heads == 2


def test_moe_override_creates_moe_config_with_defaults(tmp_path):
    path = _yaml(tmp_path, {"model": {"moe": None, "d_model": 64}})
    cfg = load_run_config(path, ["model.moe.num_experts=4", "model.moe.layers=[1]"])
    assert cfg.model.moe == MoEConfig(num_experts=4, layers=[1])
    assert cfg.model.moe.top_k == 2  # the MoEConfig default, not something the override set
    assert cfg.model.ffn_kinds() == ["dense", "moe", "dense", "dense"]


def test_moe_section_in_yaml_merges_with_overrides_and_null_clears(tmp_path):
    path = _yaml(tmp_path, {"model": {"moe": {"num_experts": 8, "top_k": 1}}})
    cfg = load_run_config(path, ["model.moe.d_expert=32"])
    assert cfg.model.moe == MoEConfig(num_experts=8, top_k=1, d_expert=32)
    assert load_run_config(path, ["model.moe=null"]).model.moe is None


def test_mapping_overrides_are_accepted():
    cfg = load_run_config(None, {"model.d_model": 32, "train": {"steps": 500}})
    assert cfg.model.d_model == 32 and cfg.train.steps == 500


@pytest.mark.parametrize(
    "override, named, allowed",
    [
        ("model.d_modle=3", "d_modle", "d_model"),
        ("optim.lr=1", "optim", "train"),
        ("model.moe.num_expert=8", "num_expert", "num_experts"),
        ("train.stepz=3", "stepz", "steps"),
    ],
)
def test_unknown_override_key_names_key_and_allowed_keys(override, named, allowed):
    with pytest.raises(ValueError, match=named) as err:
        load_run_config(None, [override])
    assert allowed in str(err.value)


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = _yaml(tmp_path, {"train": {"steps": 3, "warmup": 1}})
    with pytest.raises(ValueError, match=r"'train\.warmup'.*allowed keys.*warmup_steps"):
        load_run_config(path)


def test_malformed_overrides():
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("model.d_model")
    with pytest.raises(ValueError, match="plain value, not a section"):
        load_run_config(None, ["train.lr.peak=1"])
    with pytest.raises(ValueError, match="mapping or null"):
        load_run_config(None, ["model.moe=8"])
    with pytest.raises(ValueError, match="expected a number"):
        load_run_config(None, ["train.lr=fast"])
    # a section that is not optional cannot be null (it crashed later with an AttributeError), in a file too
    with pytest.raises(ValueError, match=r"'train' is a TrainConfig section: give a mapping \(it cannot be null"):
        load_run_config(None, ["train=null"])
    assert load_run_config(None, ["model.moe=null"]).model.moe is None  # an optional one can


def test_a_bare_section_in_a_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("train:\nmodel:\n  d_model: 32\n")  # every key of train commented out
    with pytest.raises(ValueError, match=r"'train' is a TrainConfig section: give a mapping \(it cannot be null"):
        load_run_config(path)


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("train.mixed_precision=fp16", "mixed_precision", "bf16"),
        ("train.decay=step", "decay", "cosine"),
        ("train.log_with=wandb", "log_with", "tensorboard"),
        ("train.micro_batch_size=5", "micro_batch_size", "divides batch_size=32"),
        ("data.corpus=wikipedia", "corpus", "shakespeare"),
        ("model.moe.top_k=9", "top_k", "num_experts=8"),
        ("train.betas=0.9", "betas", "two numbers in [0, 1)"),  # was a bare TypeError from tuple(0.9)
    ],
)
def test_invalid_values_name_field_and_allowed(override, field, allowed):
    with pytest.raises(ValueError, match=field) as err:
        load_run_config(None, [override])
    assert allowed in str(err.value)


def test_seq_len_must_fit_the_model():
    with pytest.raises(ValueError, match=r"data.seq_len=512 exceeds model.max_seq_len=256"):
        load_run_config(None, ["data.seq_len=512"])


def test_resume_refuses_another_model_but_allows_another_parallel_section(tmp_path):
    base = ["model.moe.num_experts=4", "parallel.expert_parallel_size=2", "parallel.dispatch=sorted"]
    load_run_config(None, base).save(tmp_path)
    load_run_config(None, ["model.moe.num_experts=4"]).check_resumable(tmp_path)  # placement, not shape
    with pytest.raises(ValueError, match=r"model\.moe\.top_k: run has 2, now 1"):
        load_run_config(None, [*base, "model.moe.top_k=1"]).check_resumable(tmp_path)
    with pytest.raises(ValueError, match=r"model\.moe: run has a section, now None"):
        load_run_config(None, ["model.moe=null"]).check_resumable(tmp_path)


def test_parallel_section_is_validated():
    cfg = load_run_config(None, ["parallel.expert_parallel_size=2", "parallel.dispatch=grouped_mm"])
    assert cfg.parallel == ParallelConfig(expert_parallel_size=2, dispatch="grouped_mm")
    with pytest.raises(ValueError, match=r"ParallelConfig\.dispatch='triton' is invalid.*reference, sorted"):
        load_run_config(None, ["parallel.dispatch=triton"])
    with pytest.raises(ValueError, match=r"ParallelConfig\.expert_parallel_size=0 is invalid"):
        load_run_config(None, ["parallel.expert_parallel_size=0"])
    with pytest.raises(TypeError, match="dispatch"):  # placement is not a model field
        MoEConfig(dispatch="sorted")


def _old_run_tree() -> dict:
    """A run folder's config.yaml as versions before ParallelConfig wrote it (resolved; placement in model.moe)."""
    tree = load_run_config(
        None, ["model.d_model=64", "model.moe.num_experts=4", "train.steps=3", "train.warmup_steps=1"]
    ).to_dict()
    del tree["parallel"]
    tree["model"]["moe"].update(dispatch="sorted", expert_parallel_size=2, extra={})
    return tree


def test_old_run_folder_config_is_migrated_on_resume(tmp_path, caplog):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_old_run_tree(), sort_keys=False))
    with caplog.at_level("WARNING"):
        cfg = load_run_config(run / "config.yaml")  # what train_lm.py --resume loads
    assert cfg.parallel == ParallelConfig(expert_parallel_size=2, dispatch="sorted")
    assert cfg.model.moe == MoEConfig(num_experts=4) and cfg.train.steps == 3 and cfg.model.d_model == 64
    assert "model.moe.expert_parallel_size=2 is placement, not model: moved to parallel.expert_parallel_size" in (
        caplog.text
    )
    cfg.check_resumable(run)  # the saved tree is migrated before the comparison: no spurious difference
    with pytest.raises(ValueError, match=r"model\.moe\.top_k: run has 2, now 1"):
        load_run_config(run / "config.yaml", ["model.moe.top_k=1"]).check_resumable(run)
    # An old command line's override moves too; a value in the parallel section itself wins over the old key.
    assert load_run_config(None, ["model.moe.expert_parallel_size=4"]).parallel.expert_parallel_size == 4
    assert load_run_config(None, ["model.moe.dispatch=sorted"]).model.moe is None  # no section created by it


def test_old_saved_model_config_json_loads_without_placement(tmp_path, caplog):
    from moekit.core.model import Transformer

    cfg = ModelConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, moe=MoEConfig(4))
    Transformer(cfg).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "dispatch" not in saved["moe"] and "expert_parallel_size" not in saved["moe"]  # only the model
    saved["moe"].update(dispatch="reference", expert_parallel_size=2, extra={})  # what final/ used to hold
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.cfg == cfg and "ignoring saved placement fields" in caplog.text


def test_saved_config_round_trips(tmp_path):
    cfg = load_run_config(None, ["model.moe.num_experts=4", "train.betas=[0.8, 0.99]", "train.lr=2e-3"])
    path = cfg.save(tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_run_config(path) == cfg
    assert yaml.safe_load(path.read_text())["model"]["moe"]["num_experts"] == 4


@pytest.mark.parametrize("preset", ["debug", "cpu-small", "gpu", "compare-debug", "compare-cpu", "compare-gpu"])
def test_presets_load_and_validate(preset):
    root = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    cfg = load_run_config(root / f"{preset}.yaml")
    assert cfg.model.vocab_size == 272 and cfg.data.seq_len <= cfg.model.max_seq_len
    assert load_run_config(root / f"{preset}.yaml", ["model.moe.num_experts=4"]).model.moe.num_experts == 4
    if preset.startswith("compare"):  # train_lm.py trains a comparison preset's MoE base run, ignoring `compare`
        assert cfg.model.moe is not None


def test_old_multimodal_run_folder_is_migrated(tmp_path, caplog):
    """Multimodal runs kept placement in model.lm.moe: config.yaml migrates on load and resume, config.json
    (MultimodalConfig.from_dict) drops it."""
    from moekit.multimodal.config import MultimodalConfig
    from moekit.multimodal.train import load_mm_run_config

    tree = load_mm_run_config(None, ["model.lm.moe.num_experts=4"]).to_dict()
    del tree["parallel"]
    tree["model"]["lm"]["moe"].update(dispatch="reference", expert_parallel_size=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    with caplog.at_level("WARNING"):
        cfg = load_mm_run_config(tmp_path / "config.yaml")
    assert cfg.parallel == ParallelConfig(expert_parallel_size=2, dispatch="reference")
    assert "model.lm.moe.dispatch='reference' is placement" in caplog.text
    cfg.check_resumable(tmp_path)
    with pytest.raises(ValueError, match=r"model\.lm\.moe\.top_k: run has 2, now 1"):
        load_mm_run_config(tmp_path / "config.yaml", ["model.lm.moe.top_k=1"]).check_resumable(tmp_path)
    old_json = json.loads(json.dumps(tree["model"]))  # what final/config.json used to hold
    assert MultimodalConfig.from_dict(old_json) == cfg.model


def test_a_key_repeated_in_a_yaml_mapping_is_refused_with_its_line(tmp_path):
    """yaml.safe_load keeps the last of two 'steps:' silently; the loader (a SafeLoader) refuses it."""
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  steps: 5\n  lr: 1.0e-3\n  steps: 50\n")
    with pytest.raises(ValueError, match=r"dup.yaml: invalid YAML at line 4, column 3: key 'steps' appears twice"):
        load_run_config(path)
    path.write_text("train:\n  steps: 5\nmodel:\n  steps: 5\n")  # the same key in two mappings is fine
    with pytest.raises(ValueError, match=r"'model\.steps'"):  # (then refused as a field, not as a repeat)
        load_run_config(path)


@dataclass
class _Shapes:
    """Every container shape of a config field, for the numeric-text coercion inside containers."""

    many: tuple[float, ...] = ()
    pair: tuple[float, float] | None = None
    items: list[float] = field(default_factory=list)
    table: dict[str, float] = field(default_factory=dict)
    maybe: float | None = None


def test_scientific_notation_text_is_a_number_inside_containers_too():
    """YAML 1.1 reads 3e-4 as text: a float field converted it, an element of a tuple/list/dict field did not."""
    overrides = ["many=[5e-1, 1]", "pair=[0.9, 1e-3]", "items=[1.5e3]", "table={a: 2e-1}", "maybe=1e-2"]
    cfg = load_config(_Shapes, None, overrides)
    assert cfg == _Shapes(many=(0.5, 1.0), pair=(0.9, 1e-3), items=[1500.0], table={"a": 0.2}, maybe=1e-2)
    assert all(isinstance(v, float) for v in (*cfg.many, *cfg.pair, *cfg.items, *cfg.table.values()))
    with pytest.raises(ValueError, match=r"config key 'many\[1\]': expected a number, got 'x'"):
        load_config(_Shapes, None, ["many=[1, x]"])
    assert load_run_config(None, ["train.betas=[0.9, 1e-3]"]).train.betas == (0.9, 1e-3)  # was refused
    from moekit.multimodal.train import load_mm_run_config

    mm = load_mm_run_config(None, ["model.image.mean=[5e-1]", "tasks.weights={caption: 1e-1}"])
    assert mm.model.image.mean == (0.5,) and mm.tasks.weights == {"caption": 0.1}  # ('5e-1',) crashed mid-run


def test_override_value_that_is_no_yaml_or_a_mapping_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"override 'train\.betas=\[0\.9': the value '\[0\.9' is not valid YAML"):
        parse_override("train.betas=[0.9")  # was a yaml.parser.ParserError traceback
    # 'shakespeare: x' reads as a mapping: it reached `corpus in CORPORA` (unhashable dict TypeError)
    with pytest.raises(ValueError, match=r"'data\.corpus': expected str, got a mapping .*quote a text"):
        load_run_config(None, ["data.corpus=shakespeare: x"])
    with pytest.raises(ValueError, match=r"'model\.d_model': expected int, got a list \[64\]"):
        load_run_config(None, ["model.d_model=[64]"])
    with pytest.raises(ValueError, match=r"DataConfig\.corpus=\{'shakespeare': 'x'\} is invalid"):
        DataConfig(corpus={"shakespeare": "x"})  # built directly, without the layering


def test_a_text_where_a_list_of_voices_is_required_is_refused_not_split_into_letters():
    from moekit.multimodal.train import load_mm_run_config

    with pytest.raises(ValueError, match=r"MMDataConfig\.eval_voices='en\+f2' is invalid: .*eval_voices=\[en\+f2\]"):
        load_mm_run_config(None, ["data.eval_voices=en+f2"])  # was ('e', 'n', '+', 'f', '2')
    assert load_mm_run_config(None, ["data.eval_voices=[en+f2]"]).data.eval_voices == ("en+f2",)
