"""moekit.core: the dense decoder-only transformer, its accounting, data and training loop."""

from moekit.core.accounting import ParamCount, comm_volume, count_params, flops_per_token, train_flops_per_token
from moekit.core.config import MLAConfig, ModelConfig, RopeScaling
from moekit.core.data import (
    CORPORA,
    CorpusSplits,
    PackedSequences,
    StepSampler,
    TokenSplits,
    load_corpus,
    make_batch,
    tokenize_splits,
)
from moekit.core.extension import TrainContext, TrainerExtension
from moekit.core.generate import filter_logits, generate, greedy_recompute, sample_text
from moekit.core.guard import TrainingDiverged
from moekit.core.hf import (
    config_from_hf,
    config_to_hf,
    hf_to_moekit,
    load_hf,
    moekit_to_hf,
    save_hf,
)
from moekit.core.layers import Attention, RMSNorm, SwiGLU, apply_rope, rope_cos_sin
from moekit.core.meter import SavedTensorBytes
from moekit.core.mla import LatentKV, MLAttention
from moekit.core.model import IGNORE_INDEX, ModelOutput, Transformer, lm_loss
from moekit.core.objective import LMObjective, Objective, StepOutput
from moekit.core.tokenizer import ByteTokenizer

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "hf_to_moekit",
    "load_hf",
    "moekit_to_hf",
    "save_hf",
    "CORPORA",
    "ByteTokenizer",
    "CorpusSplits",
    "PackedSequences",
    "StepSampler",
    "TokenSplits",
    "load_corpus",
    "make_batch",
    "tokenize_splits",
    "IGNORE_INDEX",
    "Attention",
    "LatentKV",
    "MLAConfig",
    "MLAttention",
    "ModelConfig",
    "RopeScaling",
    "ModelOutput",
    "ParamCount",
    "RMSNorm",
    "SavedTensorBytes",
    "SwiGLU",
    "Transformer",
    "TrainingDiverged",
    "apply_rope",
    "count_params",
    "filter_logits",
    "flops_per_token",
    "generate",
    "greedy_recompute",
    "lm_loss",
    "rope_cos_sin",
    "train_flops_per_token",
    "comm_volume",
    "sample_text",
    "LMObjective",
    "Objective",
    "StepOutput",
    "TrainContext",
    "TrainerExtension",
]
