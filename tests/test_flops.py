"""The analytic FLOPs of a training step (toolkit.flops) against torch's FlopCounterMode."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from toolkit.flops import estimate_step_flops, preset_dims, text_length, trainable_params

# Tolerance: the estimate counts every matmul the step runs, so it must match FlopCounterMode within 1%
# (measured: exact for forward + backward; +0.2% for DP-SGD, whose per-example norms are not matmuls).

TOLERANCE = 0.01


def _tiny_step(trainable="lora+head", n_visual=16, batch=4):
    from toolkit.data import Collator, make_vqa
    from toolkit.forward import LlavaLM
    from toolkit.models import apply_trainable, build_model

    bundle = build_model("tiny")
    apply_trainable(bundle, trainable, 8)
    bundle.model.set_attn_implementation("eager")  # the CPU SDPA kernel is not in FlopCounterMode's registry
    collator = Collator(bundle.tokenizer, n_visual, bundle.image_token_id, bundle.prompt_template)
    batch_ = collator(make_vqa("parity", "private", 32, limit=batch).records)
    lm = LlavaLM(bundle).bind_collator(collator).train()
    feats = torch.randn(batch, n_visual, bundle.config.vision_config.hidden_size)
    assert batch_["input_ids"].shape[1] == n_visual + text_length("parity")
    return lm, feats, batch_


@pytest.mark.parametrize("trainable", ["lora+head", "projector"])
def test_flops_match_flop_counter_non_private(trainable):
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.forward import per_example_loss

    lm, feats, batch = _tiny_step(trainable)
    with FlopCounterMode(display=False) as counter:
        loss = per_example_loss(lm(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"]).mean()
        forward = counter.get_total_flops()
        loss.backward()
    est = estimate_step_flops("non-private", 16, text_length("parity"), 4, trainable=trainable)
    assert est["forward"] == pytest.approx(forward, rel=TOLERANCE)
    assert est["total"] == pytest.approx(counter.get_total_flops(), rel=TOLERANCE)


def test_flops_match_flop_counter_dp_sgd_and_dp_zo():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.forward import per_example_loss

    lm, feats, batch = _tiny_step()
    params = [p for p in lm.parameters() if p.requires_grad]
    module = GradSampleModule(lm)
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=4)
    with warnings.catch_warnings(), FlopCounterMode(display=False) as counter:
        warnings.simplefilter("ignore")
        losses = per_example_loss(module(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"])
        losses.mean().backward()
        optimizer.step()
    est = estimate_step_flops("dp-sgd", 16, text_length("parity"), 4)
    assert est["total"] == pytest.approx(counter.get_total_flops(), rel=TOLERANCE)
    assert est["dp_overhead"] > 0

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for _ in range(2):                                    # DP-ZO: L(θ + μz) and L(θ - μz)
            per_example_loss(lm(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"])
    est = estimate_step_flops("dp-zo", 16, text_length("parity"), 4)
    assert est["total"] == pytest.approx(counter.get_total_flops(), rel=TOLERANCE)
    assert est["backward"] == 0


def test_trainable_params_formula_matches_the_model():
    from toolkit.models import TRAINABLE_MODES, apply_trainable, build_model

    for mode in TRAINABLE_MODES:
        assert trainable_params(preset_dims("tiny"), mode, 8) == apply_trainable(build_model("tiny"), mode, 8), mode


def test_flops_grow_as_documented():
    a = estimate_step_flops("dual-priv", 16, 14, 8)
    b = estimate_step_flops("dp-sgd", 64, 14, 8)
    assert a["total"] < b["total"]                              # fewer visual tokens, fewer FLOPs
    np_ = estimate_step_flops("non-private", 64, 14, 8)
    assert b["total"] - np_["total"] == b["dp_overhead"] == b["weight_grad"] + 4 * 8 * b["trainable_params"]
    zo = estimate_step_flops("dp-zo", 64, 14, 8)
    assert zo["total"] == 2 * np_["forward"] + 8 * zo["trainable_params"]
    with pytest.raises(ValueError):
        estimate_step_flops("adam", 16, 14, 8)
    assert math.isclose(estimate_step_flops("non-private", 16, 14, 16)["total"], 2 * a["total"] - 2 * a["dp_overhead"],
                        rel_tol=1e-12)
