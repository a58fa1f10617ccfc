"""The sample Accelerate configs in recipes/accelerate parse as `accelerate launch` would read them."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

from moekit.core.model import Block

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def _launch_env(name: str) -> tuple[object, dict[str, str]]:
    """The launcher's arguments and the environment it would give each process, from the config alone."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    "name, kind, processes, machines",
    [
        ("ddp", DistributedType.MULTI_GPU, 8, 1),
        ("fsdp", DistributedType.FSDP, 8, 1),
        ("multinode", DistributedType.MULTI_GPU, 16, 2),
    ],
)
def test_config_loads(name, kind, processes, machines):
    cfg = ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml")  # rejects unknown top-level keys
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines) == (kind, processes, machines)
    args, env = _launch_env(name)
    assert args.num_processes == processes and int(args.nproc_per_node) == processes // machines
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the trainer sets precision from train.mixed_precision


def test_multinode_rendezvous():
    args, _ = _launch_env("multinode")
    assert args.nnodes == "2" and args.node_rank == 0
    assert args.rdzv_endpoint == "10.0.0.1:29500"  # the placeholders reach the launcher


def test_fsdp_config_builds_an_fsdp2_plugin(monkeypatch):
    args, env = _launch_env("fsdp")
    assert args.use_fsdp
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as the Accelerator does
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap == [Block.__name__]
    assert plugin.cpu_ram_efficient_loading is False
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
