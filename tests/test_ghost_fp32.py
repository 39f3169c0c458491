"""Issue 23: ghost clipping in fp32 (``grad_sample_mode="ghost-fp32"``, :mod:`toolkit.privacy.ghost_fp32`).

Its privacy claims: every example's contribution to the clipped sum has norm ≤ C to fp32 precision with bf16
parameters; the update equals the per-example-gradient (hooks) update; a second backward that drifts from the
first is refused; nothing but trainable nn.Linear layers is accepted; no backward escapes the engine; no
per-example gradient is ever held."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from test_scale import engine_for, make_case, records  # noqa: F401  (records is a fixture)
from fast_run import fast
from toolkit.config import TrainConfig
from toolkit.privacy import ghost_fp32, make_private
from toolkit.privacy.ghost_fp32 import NORM_TOLERANCE, GhostFp32Module
from toolkit.privacy.linear_grads import (CHUNK_BYTES, chunk_budget, example_chunks, linear_clipped_sum_blocks,
                                          linear_norms_sq)
from toolkit.train import train

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.mark.parametrize("mode,checkpointing,chunks", [("lora+head", False, "cpu"), ("lora+head", True, "cpu"),
                                                       ("projector", False, "cpu"), ("lora+head", True, "cuda")])
def test_ghost_fp32_update_equals_the_per_example_gradient_update_in_float64(records, mode, checkpointing, chunks,
                                                                             monkeypatch):
    """No noise, clipping active for most examples, mechanism 2 on: the modes take the same step (up to the
    NORM_TOLERANCE relative slack of the factors); with checkpointing the layers are recomputed in both passes;
    with a GPU's chunks of examples (``cuda``: the whole batch in one product) as with a CPU's one at a time; with
    book-keeping (one backward) as with two."""
    monkeypatch.setattr(ghost_fp32, "chunk_budget", lambda device: chunk_budget(torch.device(chunks)))
    updates = []
    for grad_sample_mode in ("hooks", "ghost-fp32", "ghost-fp32-bk"):
        case = make_case(records, n=8, mode=mode, dtype=torch.float64, checkpointing=checkpointing)
        theta0 = case.flat()
        engine = engine_for(case, max_grad_norm=0.05, noise_multiplier=0.0, grad_prune_ratio=0.3,
                            grad_sample_mode=grad_sample_mode)
        engine.step(lambda: case.losses(engine.module))
        updates.append(theta0 - case.flat())
        assert engine.accountant.history == [(0.0, 0.25, 1)]
    assert float(updates[0].abs().max()) > 1e-3
    for update in updates[1:]:
        torch.testing.assert_close(update, updates[0], rtol=0, atol=2 * NORM_TOLERANCE * float(updates[0].abs().max()))


@pytest.mark.parametrize("grad_sample_mode", ["ghost-fp32", "ghost-fp32-bk"])
def test_ghost_fp32_adds_noise_of_std_sigma_C_once_to_a_bf16_model(records, grad_sample_mode):
    """The noise drawn block by block in the hooks: the gradient the inner optimizer gets with σ = 2 minus the one
    without noise (same data) is N(0, (σC / B_expected)²) in every coordinate (mean 0, std within 2 %), rounded once
    to bf16. Noise dropped or added twice fails."""
    grads = []
    for sigma in (0.0, 2.0):
        case = make_case(records, n=8, dtype=torch.bfloat16)
        engine = engine_for(case, max_grad_norm=0.05, noise_multiplier=sigma, grad_sample_mode=grad_sample_mode)
        seen = []
        engine.optimizer.original_optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
        engine.step(lambda: case.losses(engine.module))
        assert engine.accountant.history == [(sigma, 0.25, 1)]
        assert {g.dtype for g in seen[0]} == {torch.bfloat16}
        grads.append(torch.cat([g.double().reshape(-1) for g in seen[0]]))
    noise = grads[1] - grads[0]
    expected = 2.0 * 0.05 / 8
    assert noise.numel() > 40_000
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(noise.mean())) < 5 * expected / noise.numel() ** 0.5


@pytest.mark.parametrize("bookkeeping", [False, True])
def test_ghost_fp32_bf16_parameters_every_clipped_example_has_norm_at_most_C(records, bookkeeping):
    """Each example alone through the two passes (or, book-keeping, the one pass) of a bf16 model:
    ‖Σ c_i g_i‖ = C / (1 + NORM_TOLERANCE) ≤ C in fp32 arithmetic; the sum lives in fp32. (Factors applied in bf16
    are off by up to ~0.4 % and fail.)"""
    case = make_case(records, n=8, dtype=torch.bfloat16)
    module = GhostFp32Module(case.lm, bookkeeping=bookkeeping)
    norms = []
    for i in range(8):
        module.clipped_backward(case.losses(module, rows=slice(i, i + 1)), max_grad_norm=1e9)
        norms.append(float(torch.cat([p.clipped_sum.double().reshape(-1) for p in module.params]).norm()))
        module.forget()
    C = 0.3 * min(norms)    # the bound is active for every example
    for i in range(8):
        module.clipped_backward(case.losses(module, rows=slice(i, i + 1)), max_grad_norm=C)
        assert {p.clipped_sum.dtype for p in module.params} == {torch.float32}
        assert all(p.grad is None for p in module.params)   # autograd's bf16 gradient was dropped
        clipped = float(torch.cat([p.clipped_sum.double().reshape(-1) for p in module.params]).norm())
        module.forget()
        assert clipped <= C * (1 + 1e-6), (i, clipped / C)
        assert clipped == pytest.approx(C, rel=3 * NORM_TOLERANCE)


@pytest.mark.parametrize("bookkeeping,passes", [(False, 2), (True, 1)])
def test_book_keeping_takes_one_backward_and_keeps_nothing_after_the_step(records, bookkeeping, passes):
    """Book-keeping's point is the saved backward: each trainable layer's output gradient arrives once per step,
    not twice; the kept inputs and output gradients are gone once the sums are made."""
    case = make_case(records, n=4, dtype=torch.bfloat16)
    module = GhostFp32Module(case.lm, bookkeeping=bookkeeping)
    arrivals = []
    original = module._on_output_grad
    module._on_output_grad = lambda layer, activation, grad: arrivals.append(id(layer)) or original(layer, activation,
                                                                                                      grad)
    module.clipped_backward(case.losses(module), max_grad_norm=1.0)
    assert len(arrivals) == passes * len(module.layers)
    assert module._kept == [] and all(p.clipped_sum is not None for p in module.params)


def test_linear_norms_take_the_ghost_and_the_direct_route_to_the_same_float64_value():
    for tokens in (2, 40):   # 2: T² < d_in·d_out (ghost), 40: per-example products
        a, g = torch.randn(3, tokens, 5, dtype=torch.float64), torch.randn(3, tokens, 6, dtype=torch.float64)
        direct = torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2)) + g.sum(1).pow(2).sum(1)
        torch.testing.assert_close(linear_norms_sq(a, g, True, True, torch.float64), direct)
    blocks = list(linear_clipped_sum_blocks(a, g, torch.full((3,), 0.5, dtype=torch.float64), True, True,
                                            torch.float64, block_elements=12))
    assert len(blocks) == 4   # 6 rows of 5 values, 2 rows per block, then the bias
    weight = torch.cat([block for which, _, block in blocks if which == "weight"])
    bias = blocks[-1][2]
    torch.testing.assert_close(weight, 0.5 * torch.einsum("bto,bti->oi", g, a))
    torch.testing.assert_close(bias, 0.5 * g.sum((0, 1)))


# one example per chunk; two (T = 40: 8 bytes x (40 x 11 + 30) per example) or more; the whole batch in one chunk
@pytest.mark.parametrize("budget", [1, 2 * 8 * (40 * 11 + 30), CHUNK_BYTES])
def test_norms_and_clipped_sums_are_the_same_whatever_the_chunk_of_examples(budget):
    """Examples are batched into chunks (one kernel per chunk): every chunking gives each example its own norm and
    factor, against the float64 reference, by the ghost and the direct route and for a bias."""
    factors = torch.tensor([1.0, 0.25, 0.5, 0.125, 2.0], dtype=torch.float64)
    for tokens in (2, 40):
        a, g = torch.randn(5, tokens, 5, dtype=torch.float64), torch.randn(5, tokens, 6, dtype=torch.float64)
        direct = torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2)) + g.sum(1).pow(2).sum(1)
        torch.testing.assert_close(linear_norms_sq(a, g, True, True, torch.float64, budget=budget), direct)
        blocks = list(linear_clipped_sum_blocks(a, g, factors, True, True, torch.float64, block_elements=10,
                                                budget=budget))
        weight = torch.cat([block for which, _, block in blocks if which == "weight"])
        torch.testing.assert_close(weight, torch.einsum("b,bto,bti->oi", factors, g, a))
        torch.testing.assert_close(blocks[-1][2], torch.einsum("b,bto->o", factors, g))
    assert [len(range(5)[c]) for c in example_chunks(5, 8 * (40 * 11 + 30), budget)] == \
        {1: [1] * 5, CHUNK_BYTES: [5]}.get(budget, [2, 2, 1])


def test_ghost_fp32_norms_and_clipped_sums_are_computed_in_full_fp32_under_a_users_tf32_setting(monkeypatch):
    seen = []

    def spy(original):
        def wrapped(*args, **kwargs):
            seen.append(torch.get_float32_matmul_precision())
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ghost_fp32, "linear_norms_sq", spy(ghost_fp32.linear_norms_sq))
    monkeypatch.setattr(ghost_fp32, "linear_clipped_sum_blocks", spy(ghost_fp32.linear_clipped_sum_blocks))
    net = GhostFp32Module(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")   # TF32 (or bf16) products for fp32, as a user may set
    try:
        net.clipped_backward(net(torch.randn(4, 4)).squeeze(1) ** 2, max_grad_norm=1.0)
        assert torch.get_float32_matmul_precision() == "medium"   # the user's setting is back afterwards
    finally:
        torch.set_float32_matmul_precision(previous)
    assert len(seen) == 6 and set(seen) == {"highest"}   # 2 layers: norms in pass 1, norms and sums in pass 2


class _GrowsOnSecondBackward(torch.autograd.Function):
    """Identity whose backward returns 1.01 x the gradient from its second call on (a non-deterministic backward)."""
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _GrowsOnSecondBackward.calls += 1
        return grad * (1.01 if _GrowsOnSecondBackward.calls > 1 else 1.0)


def test_ghost_fp32_refuses_a_step_whose_second_backward_drifts_from_the_first():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    engine = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=0.01,
                          expected_batch_size=4, sample_rate=0.1, grad_sample_mode="ghost-fp32", noise_seed=0)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(4, 4)
    _GrowsOnSecondBackward.calls = 0
    hidden = engine.module._module[1](engine.module._module[0](x))
    losses = engine.module._module[2](_GrowsOnSecondBackward.apply(hidden)).squeeze(1) ** 2
    with pytest.raises(RuntimeError, match="larger gradient norm in the second backward"):
        engine.step(losses)
    assert engine.steps_taken == 0 and engine.accountant.history == []
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert all(getattr(p, "clipped_sum", None) is None and p.summed_grad is None for p in net.parameters())


def test_ghost_fp32_refuses_trainable_parameters_outside_linear_layers_by_name(records):
    case = make_case(records, n=2, mode="lm-full")
    with pytest.raises(ValueError, match="ghost-fp32.*nn.Linear.*norm"):
        engine_for(case, grad_sample_mode="ghost-fp32")


def test_ghost_fp32_with_full_lm_training_is_refused_before_any_model_loads():
    with pytest.raises(ValueError, match="ghost-fp32.*lm-full"):
        train(TrainConfig(method="dp-sgd", grad_sample_mode="ghost-fp32", trainable="lm-full", **fast()))


def test_ghost_fp32_a_backward_outside_the_engine_is_refused():
    net = nn.Linear(3, 1)
    engine = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=4, sample_rate=0.1, grad_sample_mode="ghost-fp32", noise_seed=0)
    with pytest.raises(RuntimeError, match="outside DPEngine.step"):
        engine.module(torch.randn(4, 3)).sum().backward()


def test_ghost_fp32_empty_batch_step_is_pure_noise_and_accounted():
    net = nn.Linear(3, 2)
    engine = make_private(net, torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=4, sample_rate=0.1, grad_sample_mode="ghost-fp32", noise_seed=0)
    before = net.weight.detach().clone()
    engine.empty_step()
    assert engine.steps_taken == 1 and not torch.equal(before, net.weight)


@pytest.mark.parametrize("grad_sample_mode", ["ghost-fp32", "ghost-fp32-bk"])
def test_train_with_ghost_fp32_and_bf16_runs_dual_priv_and_dp_sgd(grad_sample_mode):
    for method in ("dual-priv", "dp-sgd"):
        result = train(TrainConfig(method=method, dtype="bfloat16", grad_sample_mode=grad_sample_mode, noise_seed=0,
                                   **fast()))
        assert result.steps == 3 and result.epsilon_spent > 0
        assert {p.dtype for p in result.bundle.model.parameters()} == {torch.bfloat16}



def test_book_keeping_keeps_the_smaller_record_of_each_layer(records):
    """Book-keeping holds, until the factors are known, each trainable layer's per-example gradients (≥ fp32)
    where they take fewer bytes than its input A and output gradient G, and A and G elsewhere: LoRA's rank-4
    factors keep gradients, the LM head (wide, over few tokens) keeps A and G. Keeping A and G for every layer (the
    plain book-keeping this replaced: about 10x the bytes for LoRA at the 7B shape) fails."""
    case = make_case(records, n=4, mode="lora+head", dtype=torch.bfloat16, trainable_dtype="float32")
    module = GhostFp32Module(case.lm, bookkeeping=True)
    names = {id(layer): next((part for part in ("lora_A", "lora_B") if part in name), name)
             for name, layer in case.lm.named_modules()}
    inputs_bytes, kept = {}, {}
    capture, sum_kept = module._on_output_grad, module._sum_kept

    def on_output_grad(layer, activation, grad):
        inputs_bytes[id(layer)] = activation.numel() * activation.element_size() + grad.numel() * grad.element_size()
        capture(layer, activation, grad)

    def record_kept():
        for layer, kind, *record in module._kept:
            nbytes = sum(t.numel() * t.element_size() for t in record if torch.is_tensor(t))
            grads_bytes = 4 * len(case.feats) * sum(p.numel() for p in (layer.weight, layer.bias) if p is not None)
            kept[id(layer)] = (names[id(layer)], kind, nbytes, min(inputs_bytes[id(layer)], grads_bytes))
        sum_kept()

    module._on_output_grad, module._sum_kept = on_output_grad, record_kept
    module.clipped_backward(case.losses(module), max_grad_norm=1.0)
    assert len(kept) == len(module.layers)
    kinds = {(name, kind) for name, kind, _, _ in kept.values()}
    assert {kind for name, kind in kinds if name in ("lora_A", "lora_B")} == {"example-grads"}, kinds
    assert ("lora_A", "example-grads") in kinds and ("lora_B", "example-grads") in kinds, kinds
    assert any(kind == "inputs" for _, kind in kinds), kinds
    for name, kind, nbytes, smaller in kept.values():
        assert nbytes <= smaller, (name, kind, nbytes, smaller)
