"""Expert parallelism: real multi-process CPU (gloo) runs against single-process references, and the
communication-volume model against a hand calculation.

The multi-process checks live in ``ep_worker.py`` (each rank compares itself with the unsharded
computation of the whole batch and exits non-zero on a mismatch); these tests launch the ranks on a free
port, bound the run with a timeout and require every rank to report success.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit.core.accounting import comm_volume
from moekit.core.config import ModelConfig
from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer, set_dispatch
from moekit.moe.parallel import ExpertParallelGroups, expert_parameters, init_expert_parallel, shard_experts

WORKER = Path(__file__).with_name("ep_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, mode: str, world: int, ep: int, timeout: float = 90.0) -> None:
    """Run ``world`` ranks of the worker; fail fast (killing the rest) as soon as one rank fails."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "ACCELERATE_USE_CPU": "1",
        }
        log = open(tmp_path / f"{mode}_rank{rank}.log", "w+")  # closed after the run
        logs.append(log)
        cmd = [sys.executable, str(WORKER), mode, str(world), "--ep", str(ep)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    report = "\n".join(
        f"--- rank {r} (rc {p.returncode})\n{out[-4000:]}" for r, (p, out) in enumerate(zip(procs, outputs))
    )
    assert all(p.returncode == 0 for p in procs), report
    for rank, out in enumerate(outputs):
        assert f"rank {rank}: ok" in out, report


@pytest.mark.slow
def test_ep_layer_matches_single_process(tmp_path):
    """2 ranks, EP=2: outputs, aux losses, input and all parameter gradients equal the unsharded layer on the
    same global batch, for dropless, both capacity drop policies (per rank), expert choice, grouped_mm,
    and the degenerate cases (a rank that receives nothing, a rank with only padding)."""
    _launch(tmp_path, "layer", world=2, ep=2)


@pytest.mark.slow
def test_ep_ddp_matches_single_process(tmp_path):
    """2 ranks, EP=2 under Accelerate's DDP with the experts excluded: non-expert gradients are DDP's average,
    expert gradients (one replica: nothing to reduce, but scaled by 1/W) match; so do grad norm and clipping."""
    _launch(tmp_path, "ddp", world=2, ep=2)


@pytest.mark.slow
def test_ep_ddp_with_expert_replicas(tmp_path):
    """4 ranks = 2 EP groups x 2 replicas: expert gradients are also summed over the replica group."""
    _launch(tmp_path, "ddp", world=4, ep=2)


# ------------------------------------------------------------------------------------------ single process
def test_single_process_groups_and_errors():
    groups = init_expert_parallel(1)
    assert (groups.ep_size, groups.ep_rank, groups.world_size, groups.num_replicas) == (1, 0, 1, 1)
    assert groups.expert_range(8) == (0, 8)
    with pytest.raises(ValueError, match="expert_parallel_size=2 needs an initialised"):
        init_expert_parallel(2)
    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8))
    assert shard_experts(layer, groups) is layer and layer.experts.w_gate.shape[0] == 4
    assert expert_parameters(layer) == []  # nothing sharded: the experts stay ordinary data-parallel weights
    fake = ExpertParallelGroups(ep_size=2, ep_rank=0, world_size=2, ep_group=None, replica_group=None)
    odd = MoELayer(8, MoEConfig(num_experts=3, top_k=2, d_expert=8))
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 is invalid: must divide MoEConfig.num_experts=3"):
        shard_experts(odd, fake)


def test_reference_dispatch_is_refused_under_expert_parallelism():
    """The reference loop needs every expert on one rank: refused at sharding and afterwards, never run as sorted."""
    fake = ExpertParallelGroups(ep_size=2, ep_rank=0, world_size=2, ep_group=None, replica_group=None)
    ref = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8), dispatch="reference")
    with pytest.raises(ValueError, match=r"dispatch='reference' is invalid under expert parallelism"):
        shard_experts(ref, fake)
    layer = shard_experts(MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8), dispatch="sorted"), fake)
    with pytest.raises(ValueError, match=r"dispatch='reference' is not available for the expert-parallel MoE layer"):
        set_dispatch(layer, "reference")
    layer.dispatch_impl = "reference"  # set behind set_dispatch's back: the EP hook still refuses
    with pytest.raises(ValueError, match="no expert-parallel form"):
        layer(torch.randn(1, 3, 8))
    x_nd = torch.randn(3, 8)  # an explicit impl is refused, not silently replaced by the EP path
    with pytest.raises(ValueError, match=r"dispatch\(impl='padded_bmm'\) on an expert-parallel layer"):
        layer.dispatch(x_nd, layer.route(x_nd), impl="padded_bmm")


def _gpu_like_cfg() -> ModelConfig:
    # Hand-checkable: d_model 4, 2 layers (layer 1 MoE), V 10 tied, attention 4*4*4 = 64, norms 2*4 per layer.
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=2, every_n_layers=2)  # expert: 3*4*2 = 24 params
    return ModelConfig(vocab_size=10, d_model=4, n_layers=2, n_heads=2, d_ff=3, max_seq_len=8, moe=moe)


def test_comm_volume_hand_calculation():
    vol = comm_volume(_gpu_like_cfg(), tokens_per_gpu=100, ep_size=2, dp_size=3, dtype_bytes=2)
    # params: embed 40 + final norm 4 + 2 x (attn 64 + norms 8) = 188; dense FFN layer 0: 3*4*3 = 36;
    # MoE layer 1: router 4*4 = 16 + 4 experts x 24 = 96.  Non-expert = 188 + 36 + 16 = 240.
    assert vol["dense_params"] == 240
    assert vol["expert_params_per_gpu"] == 96 // 2 == 48
    assert vol["world_size"] == 6 and vol["moe_layers"] == 1
    # dispatch: 100 tokens x k=2 rows x 4 dims x 2 bytes = 1600 bytes, half of it to the other EP rank.
    assert vol["a2a_dispatch_bytes_per_layer"] == pytest.approx(800)
    assert vol["a2a_bytes_per_layer"] == pytest.approx(3200)  # dispatch + combine, forward + backward
    assert vol["a2a_bytes"] == pytest.approx(3200)
    # DDP ring all-reduce 2 (n-1)/n S: non-expert over 6 ranks: 2 * 5/6 * 480 = 800; experts over the
    # 3 replicas: 2 * 2/3 * 96 = 128.
    assert vol["ddp_allreduce_dense_bytes"] == pytest.approx(800)
    assert vol["ddp_allreduce_expert_bytes"] == pytest.approx(128)
    assert vol["ddp_allreduce_bytes"] == pytest.approx(928)
    # FSDP: each all-gather / reduce-scatter (n-1)/n S: 5/6 * 480 + 2/3 * 96 = 464; two gathers, one scatter.
    assert vol["fsdp_allgather_bytes"] == pytest.approx(928)
    assert vol["fsdp_reduce_scatter_bytes"] == pytest.approx(464)
    assert vol["fsdp_bytes"] == pytest.approx(1392)


def test_comm_volume_limits_and_errors():
    cfg = _gpu_like_cfg()
    one = comm_volume(cfg, 100, ep_size=1, dp_size=1)
    assert one["a2a_bytes"] == one["ddp_allreduce_bytes"] == one["fsdp_bytes"] == 0  # a single GPU sends nothing
    # all-to-all grows with top_k and tokens, and tends to all rows leaving the GPU as EP grows.
    k4 = ModelConfig(**{**cfg.to_dict(), "moe": {**cfg.moe.to_dict(), "top_k": 4}})
    assert comm_volume(k4, 100, 2, 1)["a2a_bytes"] == pytest.approx(2 * comm_volume(cfg, 100, 2, 1)["a2a_bytes"])
    assert comm_volume(cfg, 100, 4, 1)["a2a_dispatch_bytes_per_layer"] == pytest.approx(1600 * 3 / 4)
    with pytest.raises(ValueError, match="ep_size=3 must divide num_experts=4"):
        comm_volume(cfg, 100, 3, 1)
    with pytest.raises(ValueError, match="tokens_per_gpu=0"):
        comm_volume(cfg, 0, 1, 1)
    with pytest.raises(ValueError, match="moe is None"):
        comm_volume(ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, d_ff=3), 1, 1, 1)


def test_moe_extension_refuses_unsupported_setups_and_ignores_dense_models():
    from moekit.core.extension import TrainContext
    from moekit.core.train_config import TrainConfig
    from moekit.moe.config import ParallelConfig
    from moekit.moe.extension import MoEExtension

    def ctx(**kw):
        base = dict(cfg=TrainConfig(), world_size=2, rank=0, device=torch.device("cpu"), is_main=True, fsdp=False)
        return TrainContext(**{**base, **kw})

    moe = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, moe=MoEConfig(num_experts=4, d_expert=8))
    from moekit.core.model import Transformer

    ep2 = MoEExtension(ParallelConfig(expert_parallel_size=2))
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 under FSDP is not supported"):
        ep2.setup(Transformer(moe), ctx(fsdp=True))
    with pytest.raises(ValueError, match=r"TrainConfig\.compile=True is invalid: not supported with expert_parallel"):
        ep2.setup(Transformer(moe), ctx(cfg=TrainConfig(compile=True)))
    dense = Transformer(ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2))
    ep2.setup(dense, ctx(fsdp=True))  # nothing to shard: no error, no groups, no hooks
    assert ep2.groups is None and ep2.step_metrics(dense, ctx()) == {} and ep2.full_model(dense, ctx()) is dense
    # parallel.dispatch reaches every layer; without a ParallelConfig the layers keep their own.
    model = Transformer(moe)
    MoEExtension(ParallelConfig(dispatch="reference")).setup(model, ctx(world_size=1))
    assert model.layers[0].ffn.dispatch_impl == "reference"
    keep = MoEExtension()
    keep.setup(model, ctx(world_size=1))
    assert model.layers[0].ffn.dispatch_impl == "reference"
    with pytest.raises(RuntimeError, match="already bound"):  # one extension per Trainer
        keep.setup(model, ctx(world_size=1))
