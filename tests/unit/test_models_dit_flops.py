"""The DiT FLOPs/params planner: token arithmetic, analytic FLOPs against torch's counter, the 30B plan."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.dit import PRESETS, build
from models.dit import parameter_count as model_parameter_count
from models.dit.flops import (
    MOVIEGEN_TOKENS,
    forward_flops,
    forward_flops_breakdown,
    main,
    parameter_count,
    plan,
    token_count,
    train_step_flops,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_token_count_matches_moviegen_context():
    config = PRESETS["moviegen-30b"]
    # 16 s x 16 fps x 768 px -> TAE 8x T/H/W -> 32 x 96 x 96 latent cells -> patch 1x2x2.
    assert token_count(config, 256 // 8, 768 // 8, 768 // 8) == MOVIEGEN_TOKENS == 73_728
    assert token_count(PRESETS["demo"], 1, 32, 32) == 64
    assert token_count(PRESETS["demo-latent"], 3, 8, 8) == 3 * 64
    with pytest.raises(ValueError, match="height"):
        token_count(config, 32, 95, 96)


def _counted(config, batch, frames, height, width, text_tokens, backward=False):
    """FlopCounterMode total for one forward (and backward) with SDPA forced onto its matmul path."""
    torch.manual_seed(0)
    model = build(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(batch, config.in_channels, frames, height, width)
    tokens = torch.randn(batch, text_tokens, config.text_dim)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool)
    # CPU's fused SDPA kernel has no registered FLOP formula; the math backend is plain bmm, which is counted.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, torch.rand(batch), tokens, mask, torch.randn(batch, config.text_dim))
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "config, frames, height, width",
    [
        (PRESETS["tiny"], 3, 16, 8),
        (dataclasses.replace(PRESETS["tiny"], patch_size_t=2, frames=2), 4, 8, 16),
        (PRESETS["demo-latent"], 2, 8, 8),
    ],
)
def test_forward_flops_match_torch_flop_counter(config, frames, height, width):
    batch, text_tokens = 2, 7
    counted = _counted(config, batch, frames, height, width, text_tokens)
    analytic = forward_flops(config, batch, token_count(config, frames, height, width), text_tokens)
    print(f"counted {counted:,} analytic {analytic:,}")
    assert abs(analytic - counted) <= 0.02 * counted


def test_train_step_is_three_forwards_and_close_to_counted_backward():
    config = dataclasses.replace(PRESETS["tiny"], width=128, heads=4)
    tokens = token_count(config, 2, 16, 16)
    forward = forward_flops(config, 2, tokens, 32)
    assert train_step_flops(config, 2, tokens, 32) == 3 * forward
    assert train_step_flops(config, 2, tokens, 32, activation_checkpointing=True) == 4 * forward
    # The counter sees slightly less than 3x: inputs (noise, text) need no gradient of their own.
    counted = _counted(config, 2, 2, 16, 16, 32, backward=True)
    assert 0.95 * 3 * forward <= counted <= 3 * forward


def test_parameter_count_is_the_built_models():
    for name in ("tiny", "demo", "demo-latent", "dit-s"):
        counts = parameter_count(PRESETS[name])
        assert counts["total"] == model_parameter_count(build(PRESETS[name], device="meta"))
        assert 0 < counts["non_embedding"] < counts["total"]


def test_moviegen_30b_plan():
    result = plan("moviegen-30b", batch_size=4)
    print("\n" + result.table())
    assert result.tokens == 73_728
    assert 27e9 < result.params < 33e9
    assert 27e9 < result.non_embedding_params < result.params
    assert result.train_flops_per_sample == 3 * result.forward_flops_per_sample
    assert result.train_flops_per_step == 4 * result.train_flops_per_sample
    # 2 FLOPs x 29B params x 73,728 tokens ~ 4.3 PFLOP of linear work; attention adds more than that at 73K.
    assert 4e15 < result.forward_flops_per_sample < 2e16
    assert 0.5 < result.attention_share < 0.8
    assert result.self_attention_share < result.attention_share
    # Self-attention grows quadratically: at 1/8 of the tokens it is a far smaller share.
    assert plan("moviegen-30b", tokens=73_728 // 8).attention_share < result.attention_share / 3


def test_breakdown_sums_and_cli_prints_a_table(capsys):
    parts = forward_flops_breakdown(PRESETS["demo"], 64)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    main(["demo", "--tokens", "64", "--batch-size", "32"])
    out = capsys.readouterr().out
    assert "non-embedding parameters" in out and "4,136,688" in out and "attention share" in out
    with pytest.raises(ValueError, match="unknown preset"):
        plan("nope")
