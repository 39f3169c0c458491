"""DP zeroth-order: per-example scalars clipped to [−C, C], the perturbation restores θ and copies no parameter,
the update is −lr·ĝ·z with ĝ = (Σ clip(d_i) + N(0, σ²C²)) / B, empty batches, accounting, resume."""
from __future__ import annotations

import math

import pytest
import torch

from toolkit.privacy.accounting import epsilon_for
from toolkit.zo import DPZeroOrder




def _zo(params, **kwargs):
    kwargs = dict(lr=0.1, mu=1e-3, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4,
                  sample_rate=0.1, seed=0, noise_seed=0) | kwargs
    return DPZeroOrder(params, **kwargs)


class Recorder:
    """A per-example loss function that records the parameters and the losses it sees at each call."""

    def __init__(self, params, x, y):
        self.params, self.x, self.y, self.thetas, self.losses = params, x, y, [], []

    def __call__(self):
        w, b = self.params
        self.thetas.append([p.detach().clone() for p in self.params])
        losses = ((self.x @ w + b - self.y) ** 2).sum(dim=1)
        self.losses.append(losses.clone())
        return losses


def _linear_problem(dtype=torch.float64):
    torch.manual_seed(0)
    w = torch.randn(6, 3, dtype=dtype)
    b = torch.randn(3, dtype=dtype)
    x = torch.randn(4, 6, dtype=dtype) * 3
    y = torch.randn(4, 3, dtype=dtype)
    return [w, b], x, y


def test_scalars_are_finite_differences_clipped_to_C():
    params, x, y = _linear_problem()
    rec = Recorder(params, x, y)
    C = 0.5
    zo = _zo(params, max_grad_norm=C, mu=1e-2)
    zo.step(rec)
    plus, minus = rec.losses
    raw = (plus - minus) / (2 * 1e-2)
    assert (raw.abs() > C).any()  # the clip has work to do
    torch.testing.assert_close(zo.last_clipped_scalars, raw.clamp(-C, C))
    assert float(zo.last_clipped_scalars.abs().max()) <= C


def test_perturbation_is_plus_minus_mu_z_and_restores_theta():
    params, x, y = _linear_problem(torch.float32)
    theta0 = [p.clone() for p in params]
    rec = Recorder(params, x, y)
    mu = 1e-2
    zo = _zo(params, lr=0.0, mu=mu)  # lr = 0: the step must leave θ where it was
    zo.step(rec)
    for p, t0 in zip(params, theta0):
        torch.testing.assert_close(p, t0, atol=1e-6, rtol=0)
    (plus_w, plus_b), (minus_w, minus_b) = rec.thetas
    z_w, z_b = (plus_w - minus_w) / (2 * mu), (plus_b - minus_b) / (2 * mu)
    torch.testing.assert_close((plus_w + minus_w) / 2, theta0[0], atol=1e-6, rtol=0)
    assert 0.5 < float(torch.cat([z_w.reshape(-1), z_b]).std()) < 1.6  # z ~ N(0, I), 21 coordinates


def test_update_is_minus_lr_times_projected_gradient_times_z():
    params, x, y = _linear_problem()
    theta0 = [p.clone() for p in params]
    rec = Recorder(params, x, y)
    mu, lr = 1e-3, 0.05
    zo = _zo(params, lr=lr, mu=mu, max_grad_norm=1e6)  # σ = 0, nothing clipped
    zo.step(rec)
    z = [(a - b) / (2 * mu) for a, b in zip(*rec.thetas)]
    g = float(zo.last_clipped_scalars.sum() / 4)
    assert zo.last_projected_grad == pytest.approx(g)
    for p, t0, zi in zip(params, theta0, z):
        torch.testing.assert_close(p, t0 - lr * g * zi, atol=1e-9, rtol=1e-7)
    # the finite difference is the directional derivative of each example's loss (quadratic: exact)
    w, b = theta0
    grads = [torch.autograd.functional.jacobian(lambda W, B_: ((x[i] @ W + B_ - y[i]) ** 2).sum(), (w, b))
             for i in range(4)]
    directional = torch.stack([(gw * z[0]).sum() + (gb * z[1]).sum() for gw, gb in grads])
    torch.testing.assert_close(zo.last_clipped_scalars, directional, atol=1e-6, rtol=1e-6)


def test_noise_on_the_projected_gradient_has_std_sigma_C_over_B():
    from scipy import stats

    w = torch.zeros(1, dtype=torch.float64)
    sigma, C = 2.0, 0.3
    zo = _zo([w], noise_multiplier=sigma, max_grad_norm=C, lr=0.0, noise_seed=11)
    values = []
    for _ in range(2000):
        zo.empty_step()
        values.append(zo.last_projected_grad)
    v = torch.tensor(values) * 4 / (sigma * C)
    assert stats.kstest(v.numpy(), "norm").pvalue > 1e-3
    assert abs(float(v.std()) - 1) < 0.06


def test_no_parameter_copy_during_a_step():
    """Peak extra memory of a step stays near one parameter tensor (z is regenerated tensor by tensor)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    params = [torch.zeros(100_000) for _ in range(10)]  # 10 x 400 kB
    x = torch.randn(4, 16)
    zo = _zo(params, lr=1e-3)

    def losses():
        return (x @ params[0][:16]) ** 2 + params[9][:4]

    zo.step(losses)  # warm-up (lazy allocations)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        zo.step(losses)
    current = peak = 0
    for t, action, _, size in prof._memory_profile().timeline:
        if t < 0:
            continue  # pre-existing tensors: not allocated by the step
        if action == Action.CREATE:
            current += abs(size)
        elif action == Action.DESTROY:
            current -= abs(size)
        peak = max(peak, current)
    total = sum(p.numel() * p.element_size() for p in params)
    assert 0 < peak < 0.25 * total, (peak, total)  # a full copy of θ (or of z) would be ≥ total


def test_empty_batch_is_noise_only_and_accounted():
    params, x, y = _linear_problem()
    theta0 = [p.clone() for p in params]
    zo = _zo(params, noise_multiplier=1.0)
    zo.empty_step()
    assert zo.steps_taken == 1 and zo.accountant.history == [(1.0, 0.1, 1)]
    assert any(not torch.equal(p, t) for p, t in zip(params, theta0))
    assert zo.last_clipped_scalars.numel() == 0
    loss = zo.step(lambda: torch.zeros(0, dtype=torch.float64))  # a loss function over an empty batch
    assert math.isnan(loss) and zo.steps_taken == 2


def test_epsilon_matches_the_dp_sgd_accounting():
    params, x, y = _linear_problem()
    zo = _zo(params, noise_multiplier=1.2, sample_rate=0.05, accountant="rdp")
    assert zo.epsilon(1e-5) == 0.0
    for _ in range(3):
        zo.step(Recorder(params, x, y))
    zo.empty_step()
    assert zo.epsilon(1e-5) == pytest.approx(epsilon_for(1.2, 0.05, 4, 1e-5, "rdp"))


def test_resume_keeps_epsilon_and_trajectory():
    settings = dict(noise_multiplier=1.0, noise_seed=3, seed=7)
    full_params, x, y = _linear_problem()
    full = _zo(full_params, **settings)
    for _ in range(4):
        full.step(Recorder(full_params, x, y))

    first_params, _, _ = _linear_problem()
    first = _zo(first_params, **settings)
    for _ in range(2):
        first.step(Recorder(first_params, x, y))
    state = first.state_dict()
    second_params = [p.clone() for p in first_params]
    second = _zo(second_params, **(settings | dict(noise_seed=100, seed=100)))
    second.load_state_dict(state)
    for _ in range(2):
        second.step(Recorder(second_params, x, y))
    assert second.epsilon(1e-5) == full.epsilon(1e-5) > 0
    for p, q in zip(second_params, full_params):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError):
        second.load_state_dict(state)


def test_a_failing_loss_function_leaves_theta_unchanged_and_nothing_accounted():
    params, x, y = _linear_problem()
    theta0 = [p.clone() for p in params]
    zo = _zo(params, noise_multiplier=1.0)
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return Recorder(params, x, y)()

    with pytest.raises(RuntimeError, match="boom"):
        zo.step(broken)
    for p, t in zip(params, theta0):
        torch.testing.assert_close(p, t, atol=1e-12, rtol=0)
    assert zo.steps_taken == 0 and zo.accountant.history == []
    with pytest.raises(ValueError, match="1-D"):
        zo.step(lambda: torch.zeros(4, 2))
    with pytest.raises(ValueError, match="non-finite"):
        zo.step(lambda: torch.full((4,), float("nan")))


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(mu=0.0), dict(noise_multiplier=-0.1), dict(max_grad_norm=0.0),
                                 dict(expected_batch_size=0), dict(sample_rate=0.0), dict(accountant="gdp")])
def test_bad_arguments_are_value_errors(bad):
    with pytest.raises(ValueError):
        _zo([torch.zeros(3)], **bad)


def test_dp_zo_trains_lora_on_the_tiny_llava():
    from toolkit.data import Collator, make_vqa, preprocess_images
    from toolkit.forward import LlavaLM, per_example_loss, select_features, tower_hidden_states
    from toolkit.models import apply_trainable, build_model

    bundle = build_model("tiny", seed=0)
    apply_trainable(bundle, "lora", lora_rank=4)
    records = make_vqa("parity", "private", image_size=32, limit=4).records
    pixels = preprocess_images([r.image for r in records], bundle.image_size)
    feats = select_features(bundle, tower_hidden_states(bundle, pixels))
    collator = Collator(bundle.tokenizer, feats.shape[1], bundle.image_token_id, bundle.prompt_template)
    batch = collator(records)
    lm = LlavaLM(bundle).bind_collator(collator)
    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    zo = _zo(list(params.values()), noise_multiplier=1.0, lr=1e-3, sample_rate=4 / 700)

    def losses():
        return per_example_loss(lm(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"])

    loss = zo.step(losses)
    assert math.isfinite(loss) and zo.last_clipped_scalars.shape == (4,)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in params.items())
    assert all(p.grad is None for p in params.values())  # no backward, no gradient memory


def test_noisy_sum_is_divided_by_the_expected_not_the_realised_batch_size():
    w = torch.zeros(2, dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    zo = _zo([w], expected_batch_size=8, noise_multiplier=0.0, max_grad_norm=1e6)
    zo.step(lambda: (x @ w - 1.0) ** 2)  # a realised batch of 2
    torch.testing.assert_close(torch.tensor(zo.last_projected_grad, dtype=torch.float64),
                               zo.last_clipped_scalars.sum() / 8)
