"""Dense twins match the MoE model's active FLOPs (or total params) within 2%."""

import pytest

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.config import ModelConfig
from moekit.experiment.matching import check_matched, dense_twin, describe, param_matched_twin
from moekit.moe.config import MoEConfig


def moe_cfg(**moe_kw) -> ModelConfig:
    moe = dict(num_experts=8, top_k=2, d_expert=128)
    moe.update(moe_kw)
    return ModelConfig(
        vocab_size=272, d_model=128, n_layers=4, n_heads=4, d_ff=344, max_seq_len=128, moe=MoEConfig(**moe)
    )


@pytest.mark.parametrize(
    "moe_kw",
    [
        {},
        dict(num_experts=16, top_k=4, d_expert=64),
        dict(num_shared_experts=1, d_expert=64),
        dict(every_n_layers=2),
        dict(num_experts=64, top_k=8, d_expert=32),
    ],
)
def test_dense_twin_matches_active_flops(moe_kw):
    cfg = moe_cfg(**moe_kw)
    twin = dense_twin(cfg)
    assert twin.moe is None
    f_moe, f_dense = flops_per_token(cfg), flops_per_token(twin)
    assert abs(f_moe - f_dense) / f_moe < 0.02
    a_moe, a_dense = count_params(cfg).active, count_params(twin).active
    assert abs(a_moe - a_dense) / a_moe < 0.02
    check_matched(describe("moe", cfg), describe("dense", twin))


def test_param_matched_twin_matches_total_params():
    cfg = moe_cfg()
    twin = param_matched_twin(cfg)
    assert abs(count_params(twin).total - count_params(cfg).total) / count_params(cfg).total < 0.01
    assert flops_per_token(twin) > 2 * flops_per_token(cfg)  # the same params cost more compute dense


def test_mismatch_is_refused():
    cfg = moe_cfg()
    small = ModelConfig(**{**cfg.to_dict(), "moe": None, "d_ff": 64})
    with pytest.raises(ValueError, match="flops_per_token") as e:
        check_matched(describe("moe", cfg), describe("dense", small))
    assert "compare.allow_mismatch=true" in str(e.value) and "--" not in str(e.value)  # no CLI flags in a library
    with pytest.raises(ValueError, match="moe=None"):
        dense_twin(small)


def test_the_mismatch_error_shows_a_small_tolerance_and_names_its_setting():
    """A tolerance under 1% printed as 0% read as 'no mismatch allowed'; the message names the setting to change."""
    from moekit.experiment.matching import MatchReport

    with pytest.raises(ValueError) as e:
        check_matched(MatchReport("moe", 0, 0, 1010), MatchReport("dense", 0, 0, 1000), tol=0.005)
    text = str(e.value)
    assert "differ by 1.00% in flops_per_token (1,010 vs 1,000)" in text
    assert "the tolerance is 0.50% (compare.max_flops_mismatch=0.005)" in text
    check_matched(MatchReport("moe", 0, 0, 1004), MatchReport("dense", 0, 0, 1000), tol=0.005)  # within 0.5%
