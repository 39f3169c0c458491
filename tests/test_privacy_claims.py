"""Privacy claims that code mutations of an independent review broke without any test failing (issue 20, item
8): the public update mask's gradients come from the public split, the audit's membership coins are independent
of the canaries, DP-ZO's scalar noise is drawn in ≥ fp32, DP-AdamBC subtracts the run's noise variance Φ, and a
logical batch processed in physical chunks is ONE accounted step (checked without torchrun).

``make mutations`` (benchmarks/mutations.py) applies each of those mutations to a scratch copy and runs these
tests against it; every one was seen to fail there."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fast_run import FAST
import toolkit.audit.run as audit_run_module
from toolkit.audit import CANARY_ANSWERS, make_canaries, membership_coins, run_audit
from toolkit.config import TrainConfig
from toolkit.data import Collator, make_vqa
from toolkit.features import encode_records, make_pruner_for
from toolkit.forward import LlavaLM, answer_losses
from toolkit.models import apply_trainable, build_model
from toolkit.privacy import epsilon_for
from toolkit.privacy.adam_bc import noise_variance
from toolkit.train import public_gradients, setup, train
from toolkit.zo import DPZeroOrder



# -------------------------------------------------------------------------- the public update mask

def test_the_public_update_mask_ranks_gradients_of_the_public_split_only():
    c = TrainConfig(method="dual-priv", epsilon=3.0, update_mask="public", **FAST).resolved()
    bundle = build_model("tiny", seed=0)
    torch.manual_seed(0)
    apply_trainable(bundle, c.trainable, c.lora_rank)
    pruner = make_pruner_for(bundle, c)
    collator = Collator(bundle.tokenizer, pruner.n_out, bundle.image_token_id, bundle.prompt_template)
    lm = LlavaLM(bundle).bind_collator(collator)
    params = [p for p in lm.parameters() if p.requires_grad]

    def mean_gradient(split: str) -> list[torch.Tensor]:
        data = make_vqa(c.task, split, bundle.image_size, limit=16)
        lm.zero_grad(set_to_none=True)
        answer_losses(lm, encode_records(bundle, pruner, data.records), collator(data.records)).mean().backward()
        grads = [p.grad.detach().clone() for p in params]
        lm.zero_grad(set_to_none=True)
        return grads

    def same(a, b) -> bool:
        return all(torch.allclose(x, y, atol=1e-7) for x, y in zip(a, b))

    got = public_gradients(c, bundle, lm, collator, pruner, n_records=16)
    assert same(got, mean_gradient("public"))
    assert not same(got, mean_gradient(c.train_split))


# ------------------------------------------------------------------------------ the audit's coins

def test_audit_coins_are_fair_and_independent_of_the_canaries_answers():
    rng = np.random.default_rng(0)
    canaries = make_canaries(1900, 4, "what is this ?", rng)
    coins = membership_coins(rng, canaries)
    answers = np.array([r.answer for r in canaries])
    assert 0.45 < coins.mean() < 0.55
    for answer in CANARY_ANSWERS:  # about 100 canaries per answer: a fair coin stays well inside (0.3, 0.7)
        assert 0.3 < coins[answers == answer].mean() < 0.7, answer


def test_the_audit_draws_its_membership_from_those_coins(monkeypatch):
    drawn = []

    def recorded(rng, canaries):
        drawn.append(membership_coins(rng, canaries))
        return drawn[-1]

    monkeypatch.setattr(audit_run_module, "membership_coins", recorded)
    config = TrainConfig(method="dp-sgd", epsilon=8.0, steps=2, train_limit=16, eval_limit=8, warm_start_steps=0,
                         expected_batch_size=8, progress=False, noise_seed=0)
    result = run_audit(config, canaries=16, k=2, seed=0)
    assert len(drawn) == 1 and np.array_equal(result.included, drawn[0])


# ------------------------------------------------------------------------------------- DP-ZO noise

def test_dp_zo_scalar_noise_is_drawn_in_at_least_fp32_not_bf16():
    zo = DPZeroOrder([torch.zeros(3)], lr=0.0, mu=1e-3, noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=4, sample_rate=0.1, seed=0, noise_seed=0)
    values = []
    for _ in range(32):
        zo.empty_step()
        values.append(zo.last_projected_grad * 4)  # the noise itself (B = 4 divides exactly)
    noise = torch.tensor(values, dtype=torch.float64)
    as_bf16 = noise.to(torch.bfloat16).to(torch.float64)
    assert (noise != as_bf16).sum() >= 30  # a bf16 draw has 8 significant bits: every value would round-trip


# ------------------------------------------------------------------------------------------ DP-AdamBC

def test_dp_adambc_subtracts_the_noise_variance_of_the_run():
    run = setup(TrainConfig(method="dp-sgd", optimizer="dp-adambc", epsilon=3.0, **FAST).resolved())
    phi = run.optimizer.optimizer.original_optimizer.param_groups[0]["noise_variance"]
    expected = noise_variance(run.plan.noise_multiplier, 1.0, 8)
    assert expected > 0 and phi == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------- accumulation accounting

@pytest.mark.parametrize("method", ["dp-sgd", "dp-zo"])
def test_a_batch_in_physical_chunks_is_one_accounted_step_at_the_logical_rate(method):
    result = train(TrainConfig(method=method, epsilon=3.0, max_physical_batch_size=2, **FAST))
    assert result.epsilon_spent == pytest.approx(epsilon_for(result.noise_multiplier, 0.25, 3, 1e-5), abs=1e-9)
    assert result.history.epsilon_spent.tolist() == pytest.approx(
        [epsilon_for(result.noise_multiplier, 0.25, t, 1e-5) for t in (1, 2, 3)], abs=1e-4)  # the precomputed curve


def test_every_mutation_of_make_mutations_still_finds_its_line_and_its_tests():
    """A refactor that rewords a guarded line would silently turn its mutation into "NOT APPLIED"."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("dualpriv_mutations", root / "benchmarks" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    for mutation in module.MUTATIONS:
        assert (root / mutation.path).read_text().count(mutation.old) == 1, mutation.name
        assert (root / mutation.tests[0].split("::")[0]).is_file(), mutation.name
