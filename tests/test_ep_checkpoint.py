"""Unsharded expert checkpoints (moekit.moe.ep_checkpoint) and the checkpoint hooks of core/checkpoint.py, in
one process. Expert-parallel ranks are faked with ``ExpertParallelGroups`` objects (slicing needs no process
group); the gathers themselves run in the 2-process tests of test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.core.checkpoint import MODEL_FILE, CheckpointManager, _load_weights
from moekit.core.config import ModelConfig
from moekit.core.model import Transformer
from moekit.moe import ep_checkpoint
from moekit.moe.config import MoEConfig
from moekit.moe.ep_checkpoint import (
    EXPERTS_FILE,
    gather_full_model,
    load_expert_state,
    local_expert_range,
    routed_expert_weights,
    save_expert_state,
)
from moekit.moe.parallel import ExpertParallelGroups, apply_expert_parallel

NAMES = [f"layers.{i}.ffn.experts.{w}" for i in range(2) for w in ("w_gate", "w_up", "w_down")]


def _cfg(num_experts: int = 4) -> ModelConfig:
    moe = MoEConfig(num_experts=num_experts, top_k=2, d_expert=8, balance_scope="global")
    return ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=8, moe=moe)


def _model(seed: int, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_cfg()).to(dtype)


def _step(model: nn.Module) -> torch.optim.AdamW:
    """An AdamW with state: one step on a random batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 32, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def _fake_rank(ep_rank: int) -> ExpertParallelGroups:
    return ExpertParallelGroups(ep_size=2, ep_rank=ep_rank, world_size=2, ep_group=None, replica_group=None)


def test_save_writes_full_tensors_and_round_trips(tmp_path):
    src = _model(0)
    opt = _step(src)
    assert save_expert_state(tmp_path, src, opt) == NAMES
    saved = load_file(tmp_path / EXPERTS_FILE)
    params = dict(src.named_parameters())
    expected = {n: params[n] for n in NAMES}
    expected |= {f"{n}::{k}": opt.state[params[n]][k] for n in NAMES for k in ("exp_avg", "exp_avg_sq")}
    assert saved.keys() == expected.keys()  # AdamW's scalar `step` stays with the optimizer
    assert all(torch.equal(saved[k], v) for k, v in expected.items())

    dst = _model(1)
    dst_opt = _step(dst)  # state of the same keys, other values
    assert load_expert_state(tmp_path, dst, dst_opt) == sorted(NAMES)
    dst_params = dict(dst.named_parameters())
    for n in NAMES:
        assert torch.equal(dst_params[n], params[n])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(dst_opt.state[dst_params[n]][k], opt.state[params[n]][k])
    assert not torch.equal(dst.embed.weight, src.embed.weight)  # only the experts come from this file


def test_load_gives_each_ep_rank_its_rows(tmp_path):
    """A checkpoint saved unsharded (EP 1) resumes on EP rank 1 of 2: rows [2, 4), weights and Adam moments,
    replacing moments of the wrong shape (as optimizer.bin from another EP size leaves them) in their dtype."""
    src = _model(0, dtype=torch.float64)
    opt = _step(src)
    save_expert_state(tmp_path, src, opt)
    groups = _fake_rank(1)
    dst = _model(1, dtype=torch.float64)
    apply_expert_parallel(dst, groups)  # slicing only: no process group needed
    dst_opt = torch.optim.AdamW(dst.parameters(), lr=1e-2)
    for _, p, _ in routed_expert_weights(dst):
        dst_opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, *p.shape[1:], dtype=torch.float32)}
    load_expert_state(tmp_path, dst, dst_opt, groups)
    src_params, dst_params = dict(src.named_parameters()), dict(dst.named_parameters())
    for n in NAMES:
        assert dst_params[n].shape[0] == 2
        assert torch.equal(dst_params[n], src_params[n][2:4])
        moments = dst_opt.state[dst_params[n]]
        assert moments["exp_avg"].dtype == torch.float32  # the optimizer's dtype for that state is kept
        torch.testing.assert_close(moments["exp_avg"], opt.state[src_params[n]]["exp_avg"][2:4].float())
        assert torch.equal(moments["exp_avg_sq"], opt.state[src_params[n]]["exp_avg_sq"][2:4])


def test_load_errors(tmp_path):
    src = _model(0)
    save_expert_state(tmp_path, src)
    assert load_expert_state(tmp_path / "elsewhere", src) == []  # no file: nothing to restore
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"w_gate has shape \[4, 16, 8\], the model expects \[8, 16, 8\]"):
        load_expert_state(tmp_path, Transformer(_cfg(num_experts=8)))
    one_layer = ModelConfig(**{**_cfg().to_dict(), "n_layers": 1})
    with pytest.raises(ValueError, match=r"different model: experts only in the file \['layers.1.ffn.experts.w_down'"):
        load_expert_state(tmp_path, Transformer(one_layer))
    sharded = _model(1)
    apply_expert_parallel(sharded, _fake_rank(0))
    with pytest.raises(ValueError, match=r"layers.0.ffn.experts.w_gate holds 2 of 4 experts, .* no expert paral"):
        load_expert_state(tmp_path, sharded)  # a sharded model needs its groups
    # Moments of another slice that the file does not replace must not survive silently: of another shape,
    # or of this rank's shape (rank 0's slice from the other file, at the same expert-parallel size).
    opt = torch.optim.AdamW(sharded.parameters())
    p = routed_expert_weights(sharded)[0][1]
    for shape in ((4, *p.shape[1:]), tuple(p.shape)):
        opt.state[p] = {"exp_avg": torch.zeros(shape), "step": torch.tensor(3.0)}
        with pytest.raises(ValueError, match=r"w_gate::exp_avg, and the optimizer's copy is another slice's"):
            load_expert_state(tmp_path, sharded, opt, _fake_rank(0))


def test_local_expert_range():
    assert local_expert_range(8, 8, None) == (0, 8)
    assert local_expert_range(8, 4, _fake_rank(1)) == (4, 8)
    with pytest.raises(ValueError, match="3 of 8 experts"):
        local_expert_range(8, 3, _fake_rank(0))


def test_gather_full_model_builds_an_unsharded_copy(monkeypatch):
    """The copy logic, with the gather replaced by the known full tensors (the real gather runs in the 2-process
    test): full experts, no hook, single-process configs, shared non-expert weights, same outputs."""
    ref = _model(0, dtype=torch.float64).eval()
    full = {n: p.detach().clone() for n, p, _ in routed_expert_weights(ref)}
    sharded = _model(0, dtype=torch.float64).eval()
    apply_expert_parallel(sharded, _fake_rank(0))
    names = iter(n for n, _, _ in routed_expert_weights(sharded))
    monkeypatch.setattr(ep_checkpoint, "gather_expert_rows", lambda local, e, groups: full[next(names)])

    copy = gather_full_model(sharded, _fake_rank(0))
    layer, orig = copy.layers[0].ffn, sharded.layers[0].ffn
    assert layer.expert_parallel is None and layer.experts.num_experts == 4 and layer.experts.w_up.shape[0] == 4
    assert orig.expert_parallel is not None and orig.experts.w_up.shape[0] == 2  # the training model is untouched
    assert layer.cfg.balance_scope == layer.router.cfg.balance_scope == "local"  # no collective on rank 0 alone
    assert copy.cfg.moe.balance_scope == "global" and orig.cfg.balance_scope == "global"  # saved config untouched
    assert sharded.cfg.moe == copy.cfg.moe and "expert_parallel_size" not in copy.cfg.to_dict()["moe"]
    assert copy.embed.weight is sharded.embed.weight and copy.lm_head.weight is copy.embed.weight
    ids = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(copy(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ core checkpoint hooks
@pytest.fixture
def accelerator(fresh_accelerate):
    return Accelerator(cpu=True)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2, bias=False)


def test_checkpoint_extra_writer_and_reader(tmp_path, accelerator):
    torch.manual_seed(0)
    pair = _Pair()
    model, _ = accelerator.prepare(pair, torch.optim.SGD(pair.parameters(), lr=0.1))
    seen = []

    def writer(tmp):
        seen.append(tmp)
        assert tmp.name.startswith(".tmp_") and tmp.is_dir()  # before the folder is complete and renamed
        save_file({"w": model.b.weight.detach().clone()}, tmp / "extra.safetensors")
        return ["b.weight"]

    manager = CheckpointManager(tmp_path, keep=1)
    path = manager.save(accelerator, 3, {"k": 1}, extra_writer=writer)
    assert len(seen) == 1 and path.name == "step_0000003" and (path / "extra.safetensors").is_file()
    assert set(load_file(path / MODEL_FILE)) == {"a.weight", "a.bias"}  # the writer's key is left out

    saved_b = model.b.weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(RuntimeError, match=r"no saved value for \['b.weight'\]"):
        manager.load(accelerator, path)

    def reader(directory):
        with torch.no_grad():
            model.b.weight.copy_(load_file(directory / "extra.safetensors")["w"])
        return ["b.weight"]

    assert manager.load(accelerator, path, extra_reader=reader)["k"] == 1
    assert torch.equal(model.b.weight, saved_b) and model.a.weight.abs().sum() > 0


def test_load_weights_accepts_ddp_prefix_and_tied_weights(tmp_path):
    torch.manual_seed(0)
    src = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=24, max_seq_len=8))
    state = {f"module.{k}": v for k, v in src.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_file(state, tmp_path / MODEL_FILE)
    torch.manual_seed(1)
    dst = Transformer(src.cfg)
    assert _load_weights(dst, tmp_path / MODEL_FILE) == set()
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    save_file({"embed.weight": state["module.embed.weight"], "extra": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(RuntimeError, match=r"keys the model does not have: \['extra'\]"):
        _load_weights(dst, tmp_path / "bad.safetensors")


def test_fsdp_full_model_is_a_plain_copy_rebuilt_from_the_gathered_state():
    """Accelerate runs FSDP on GPUs only; the rank-0 rebuild is checked with FSDP2's class swap and a stub
    accelerator whose get_state_dict returns what FSDP's full-state gather would."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import FSDPModule

    from moekit.core.extension import TrainContext
    from moekit.core.train import TrainConfig, _fsdp_full_model
    from moekit.moe.extension import MoEExtension

    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=8, balance_scope="global", bias_update_rate=0.01)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe=moe)
    model = Transformer(cfg)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    model.__class__ = type("FSDPTransformer", (FSDPModule, Transformer), {})  # what fully_shard does
    acc = SimpleNamespace(get_state_dict=lambda m: full, is_main_process=True, unwrap_model=lambda m: m)
    plain = _fsdp_full_model(acc, model)
    assert type(plain) is Transformer and plain is not model
    ctx = TrainContext(TrainConfig(), world_size=2, rank=0, device=torch.device("cpu"), is_main=True, fsdp=True)
    ext = MoEExtension()
    ext.setup(Transformer(cfg), TrainContext(**{**vars(ctx), "world_size": 1}))
    assert ext.full_model(plain, ctx) is plain and ext.full_model(None, ctx) is None  # no collective under FSDP
    # rank 0 runs the copy alone: no global-scope all-reduce may remain in it
    assert {m.cfg.balance_scope for m in plain.modules() if hasattr(m, "experts")} == {"local"}
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(plain(ids).logits, Transformer.forward(model, ids).logits, rtol=0, atol=0)
    acc.is_main_process = False
    assert _fsdp_full_model(acc, model) is None


def test_rank_local_router_bias_is_refused_on_several_processes():
    from moekit.moe.extension import check_bias_scope as _check_bias_scope

    def model(scope):
        moe = MoEConfig(num_experts=4, top_k=2, d_expert=8, balance_scope=scope, bias_update_rate=0.01)
        return Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8, moe=moe))

    with pytest.raises(ValueError, match=r"MoEConfig\.balance_scope='local'.*on 2 processes.*'global'"):
        _check_bias_scope(model("local"), world=2)
    _check_bias_scope(model("local"), world=1)  # one process: local is global
    _check_bias_scope(model("global"), world=2)


def test_loading_an_fsdp_checkpoint_without_fsdp_says_so(tmp_path):
    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        _load_weights(model, tmp_path / MODEL_FILE)
    (tmp_path / "pytorch_model_fsdp_0").mkdir()  # what accelerate's FSDP save_state writes instead
    with pytest.raises(FileNotFoundError, match="written under FSDP"):
        _load_weights(model, tmp_path / MODEL_FILE)
