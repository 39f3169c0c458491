"""The DP engine on the tiny LLaVA: per-example gradients equal micro-batch gradients for every trainable layer
type (float64), clipping is per example, σ = 0 / C = ∞ is the non-private step, the noise has std σC,
empty Poisson batches, resume keeps ε and the trajectory, LoRA weights move, bad input fails clearly."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from toolkit.data import Collator, make_vqa, preprocess_images
import torch.nn.functional as F

from toolkit.forward import LlavaLM, select_features, tower_hidden_states
from toolkit.models import apply_trainable, build_model
from toolkit.privacy import make_private

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
B = 4




@pytest.fixture(scope="module")
def records():
    return make_vqa("parity", "private", image_size=32, limit=8).records


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """toolkit.forward.per_example_loss without its ``.float()`` (which casts float64 logits DOWN to float32 and
    would cap these float64 comparisons at ~1e-7 relative precision)."""
    shift_logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    return token_loss.sum(dim=1) / (shift_labels != -100).sum(dim=1).clamp(min=1)


@dataclass
class Case:
    lm: LlavaLM
    feats: torch.Tensor
    batch: dict

    def losses(self, module=None, rows=slice(None)):
        module = module if module is not None else self.lm
        b = self.batch
        logits = module(self.feats[rows], b["input_ids"][rows], b["attention_mask"][rows])
        return per_example_loss(logits, b["labels"][rows])

    def trainable(self) -> dict:
        return {n: p for n, p in self.lm.named_parameters() if p.requires_grad}


def _visual_tokens(bundle, hidden, n_visual):
    if n_visual is None:
        return select_features(bundle, hidden)
    try:
        from toolkit.tokens import make_pruner
    except ImportError:  # mechanism 1 not there yet: fewer tokens by slicing
        return select_features(bundle, hidden)[:, :n_visual]
    return make_pruner("dual-priv", bundle, keep=n_visual)(hidden).features


def make_case(records, mode="lora", n_visual=None, dtype=torch.float64, randomize_lora_b=True) -> Case:
    bundle = build_model("tiny", seed=0)
    torch.manual_seed(0)
    apply_trainable(bundle, mode, lora_rank=4)
    if randomize_lora_b:  # peft zero-inits lora_B, which would make every lora_A gradient exactly 0
        with torch.no_grad():
            for name, p in bundle.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
    bundle.model.to(dtype)
    recs = records[:B]
    pixels = preprocess_images([r.image for r in recs], bundle.image_size, bundle.image_mean, bundle.image_std)
    feats = _visual_tokens(bundle, tower_hidden_states(bundle, pixels), n_visual).detach()
    collator = Collator(bundle.tokenizer, feats.shape[1], bundle.image_token_id, bundle.prompt_template)
    return Case(LlavaLM(bundle).bind_collator(collator), feats, collator(recs))


def micro_batch_grads(case: Case) -> list[list[torch.Tensor]]:
    """∇θ L_i from a forward/backward of row i alone (same padded row): the definition of a per-example gradient."""
    params = list(case.trainable().values())
    return [torch.autograd.grad(case.losses(rows=slice(i, i + 1))[0], params) for i in range(B)]


def engine_for(case: Case, lr=1.0, optimizer="sgd", **kwargs):
    params = list(case.trainable().values())
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    kwargs = dict(noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=B, sample_rate=0.5,
                  noise_seed=0) | kwargs
    return make_private(case.lm, opt, **kwargs)


# ---------------------------------------------------------------- per-example gradients

@pytest.mark.parametrize("mode,grad_sample_mode,n_visual", [
    ("lora", "hooks", None), ("lora", "hooks", 16), ("lora", "functorch", 16),
    ("lm-full", "hooks", None), ("lm-full", "hooks", 16),
])
def test_per_example_gradients_equal_micro_batch_gradients(records, mode, grad_sample_mode, n_visual):
    case = make_case(records, mode, n_visual)
    expected = micro_batch_grads(case)
    kinds = {type(m).__name__ for m in case.lm.modules() if any(p.requires_grad for p in m.parameters(False))}
    must = {"Linear"} | ({"Embedding", "LlamaRMSNorm"} if mode == "lm-full" else set())
    assert must <= kinds, kinds  # LoRA A/B, projector, (lm-full:) embeddings, RMSNorm, attention/MLP, LM head
    engine = engine_for(case, grad_sample_mode=grad_sample_mode)
    case.losses(engine.module).mean().backward()
    for j, (name, p) in enumerate(case.trainable().items()):
        ref = torch.stack([g[j] for g in expected])
        assert p.grad_sample.shape == ref.shape, name
        torch.testing.assert_close(p.grad_sample, ref, atol=1e-6, rtol=1e-6, msg=name)
    assert any(g[j].abs().max() > 1e-4 for g in expected for j in range(len(g)))  # not all zeros
    engine.optimizer.zero_grad()


def test_ghost_clipping_per_example_norms_equal_micro_batch_norms(records):
    case = make_case(records, "lora", 16)
    expected = torch.stack([torch.cat([t.reshape(-1) for t in g]).norm() for g in micro_batch_grads(case)])
    engine = engine_for(case, grad_sample_mode="ghost")
    engine.step(case.losses(engine.module))
    torch.testing.assert_close(engine.module.per_sample_gradient_norms, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- clipping, σ = 0, noise

@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_each_example_is_clipped_to_C(records, grad_sample_mode):
    case = make_case(records, "lora", 16)
    grads = [torch.cat([t.reshape(-1) for t in g]) for g in micro_batch_grads(case)]
    norms = torch.stack([g.norm() for g in grads])
    C = float(norms.median())  # some examples clipped, some not
    assert (norms > C).any() and (norms < C).any()
    clipped = [g * min(1.0, C / (float(g.norm()) + 1e-6)) for g in grads]
    assert all(float(c.norm()) <= C * (1 + 1e-9) for c in clipped)
    theta0 = torch.cat([p.detach().reshape(-1) for p in case.trainable().values()]).clone()
    engine = engine_for(case, max_grad_norm=C, grad_sample_mode=grad_sample_mode)  # σ = 0, SGD lr = 1
    engine.step(case.losses(engine.module))
    update = theta0 - torch.cat([p.detach().reshape(-1) for p in case.trainable().values()])
    # Hooks clip the per-example gradients of one backward: exact. Ghost runs a second backward of Σ c_i L_i,
    # and HF's Llama computes RMSNorm and RoPE in float32 even in a float64 model, so an arbitrary c_i rounds
    # differently there (~1e-8 relative; a missing or wrong clip would be off by O(1)).
    tol = dict(atol=1e-10, rtol=1e-9) if grad_sample_mode == "hooks" else dict(atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(update, torch.stack(clipped).sum(0) / B, **tol)


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_zero_noise_and_huge_C_is_the_non_private_step(records, grad_sample_mode):
    case = make_case(records, "lora", 16)
    plain = copy.deepcopy(case.lm)
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.SGD(plain_params, lr=0.1)
    per_example_loss(plain(case.feats, case.batch["input_ids"], case.batch["attention_mask"]),
                     case.batch["labels"]).mean().backward()
    opt.step()
    engine = engine_for(case, lr=0.1, grad_sample_mode=grad_sample_mode)
    engine.step(case.losses(engine.module))
    for p, q in zip(case.trainable().values(), plain_params):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-10, rtol=1e-10)


def test_added_noise_has_standard_deviation_sigma_C(records):
    from scipy import stats

    sigma, C = 1.5, 0.7
    base = make_case(records, "lora", 16)
    quiet_case = Case(copy.deepcopy(base.lm), base.feats, base.batch)
    noisy = engine_for(base, noise_multiplier=sigma, max_grad_norm=C, noise_seed=123)
    quiet = engine_for(quiet_case, noise_multiplier=0.0, max_grad_norm=C)
    noisy.step(base.losses(noisy.module))
    quiet.step(quiet_case.losses(quiet.module))
    # Same batch, same clipping, SGD lr = 1: the difference of the updates is the noise / B.
    noise = torch.cat([(q.detach() - p.detach()).reshape(-1) * B
                       for p, q in zip(base.trainable().values(), quiet_case.trainable().values())])
    assert noise.numel() > 20_000
    ratio = float(noise.var() / (sigma * C) ** 2)
    assert abs(ratio - 1) < 0.03, ratio  # sd of the sample variance ratio ≈ sqrt(2/n) < 1%
    assert stats.kstest((noise / (sigma * C)).numpy(), "norm").pvalue > 1e-3
    assert abs(float(noise.mean())) < 5 * sigma * C / noise.numel() ** 0.5


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_empty_batch_is_a_noise_only_step_and_is_accounted(records, grad_sample_mode):
    case = make_case(records, "lora", 16, dtype=torch.float32)
    theta0 = torch.cat([p.detach().reshape(-1) for p in case.trainable().values()]).clone()
    engine = engine_for(case, noise_multiplier=2.0, max_grad_norm=0.5, grad_sample_mode=grad_sample_mode)
    engine.empty_step()
    noise = (theta0 - torch.cat([p.detach().reshape(-1) for p in case.trainable().values()])) * B
    assert abs(float(noise.std()) / (2.0 * 0.5) - 1) < 0.03
    assert engine.steps_taken == 1 and engine.accountant.history == [(2.0, 0.5, 1)]
    assert engine.epsilon(1e-5) > 0
    engine.step(case.losses(engine.module))  # a normal step still works after an empty one
    assert engine.steps_taken == 2


# ---------------------------------------------------------------- training behaviour

def test_lora_weights_move_after_a_private_step(records):
    case = make_case(records, "lora", 16, dtype=torch.float32, randomize_lora_b=False)
    lora = {n: p.detach().clone() for n, p in case.trainable().items() if "lora_" in n}
    assert lora and all(float(v.abs().sum()) == 0 for n, v in lora.items() if "lora_B" in n)  # peft's init
    engine = engine_for(case, lr=1e-2, optimizer="adam", noise_multiplier=1.0, max_grad_norm=1.0,
                        grad_prune_ratio=0.2)
    loss = engine.step(case.losses(engine.module))
    assert loss > 0
    for name, before in lora.items():
        assert not torch.equal(case.trainable()[name].detach(), before), name
    assert engine.last_kept_fraction == pytest.approx(0.8, abs=1e-4)


def test_update_pruning_with_ghost_clipping(records):
    case = make_case(records, "lora", 16, dtype=torch.float32)
    engine = engine_for(case, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                        grad_prune_ratio=0.3, prune_scope="per-tensor", lr=0.1)
    theta0 = {n: p.detach().clone() for n, p in case.trainable().items()}
    engine.step(case.losses(engine.module))
    moved = sum(int((p.detach() != theta0[n]).sum()) for n, p in case.trainable().items())
    total = sum(p.numel() for p in case.trainable().values())
    assert engine.last_kept_fraction == pytest.approx(0.7, abs=1e-3)
    assert moved / total == pytest.approx(engine.last_kept_fraction, abs=1e-3)  # SGD: pruned = unmoved


def _run(case, engine, plan):
    for kind in plan:
        engine.step(case.losses(engine.module)) if kind == "step" else engine.empty_step()


def test_resume_keeps_epsilon_and_the_exact_trajectory(records):
    settings = dict(lr=1e-2, optimizer="adam", noise_multiplier=1.1, max_grad_norm=1.0, grad_prune_ratio=0.2,
                    pruned_state="freeze", noise_seed=5, sample_rate=0.3)
    plan = ["step", "empty", "step", "step", "empty"]
    full_case = make_case(records, "lora", 16, dtype=torch.float32)
    full = engine_for(full_case, **settings)
    _run(full_case, full, plan)

    first_case = make_case(records, "lora", 16, dtype=torch.float32)
    first = engine_for(first_case, **settings)
    _run(first_case, first, plan[:3])
    saved_engine = copy.deepcopy(first.state_dict())
    saved_weights = {n: p.detach().clone() for n, p in first_case.trainable().items()}

    second_case = make_case(records, "lora", 16, dtype=torch.float32)
    with torch.no_grad():
        for n, p in second_case.trainable().items():
            p.copy_(saved_weights[n])
    second = engine_for(second_case, **(settings | dict(noise_seed=999)))  # the saved generator state wins
    second.load_state_dict(saved_engine)
    assert second.epsilon(1e-5) == first.epsilon(1e-5) > 0
    _run(second_case, second, plan[3:])

    assert second.steps_taken == full.steps_taken == len(plan)
    assert second.epsilon(1e-5) == full.epsilon(1e-5)
    for (n, p), q in zip(second_case.trainable().items(), full_case.trainable().values()):
        assert torch.equal(p.detach(), q.detach()), n
    with pytest.raises(RuntimeError, match="fresh engine"):
        second.load_state_dict(saved_engine)  # would drop the steps it has taken from the accounting


def test_a_checkpoint_from_another_device_type_resumes_with_fresh_secret_noise_or_refuses_a_seeded_run(records):
    # a GPU's noise generator state (Philox, 16 bytes) cannot go into a CPU generator (5056 bytes) and back
    cuda_shaped = torch.zeros(16, dtype=torch.uint8)
    case = make_case(records, "lora", 16, dtype=torch.float32)
    saved = engine_for(case, noise_multiplier=1.0, max_grad_norm=1.0).state_dict() | {"noise_generator": cuda_shaped}
    secret = engine_for(make_case(records, "lora", 16, dtype=torch.float32), noise_multiplier=1.0, max_grad_norm=1.0,
                        noise_seed=None)
    fresh = secret.generator.get_state().clone()
    with pytest.warns(UserWarning, match="fresh OS entropy"):
        secret.load_state_dict(saved)
    assert torch.equal(secret.generator.get_state(), fresh)   # kept its own 128-bit secret state
    seeded = engine_for(make_case(records, "lora", 16, dtype=torch.float32), noise_multiplier=1.0,
                        max_grad_norm=1.0, noise_seed=3)
    with pytest.raises(ValueError, match="saved on CUDA and this run is on CPU"):
        seeded.load_state_dict(saved)


# ---------------------------------------------------------------- clear errors

def test_bad_input_fails_clearly(records):
    case = make_case(records, "lora", 16, dtype=torch.float32)
    params = list(case.trainable().values())
    common = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B, sample_rate=0.5)
    with pytest.raises(ValueError, match="missing from the optimizer"):
        make_private(case.lm, torch.optim.SGD(params[1:], lr=0.1), **common)
    with pytest.raises(ValueError, match="do not belong"):
        make_private(case.lm, torch.optim.SGD(params + [nn.Parameter(torch.zeros(2))], lr=0.1), **common)
    for bad in [dict(noise_multiplier=-1.0), dict(max_grad_norm=0.0), dict(expected_batch_size=0),
                dict(sample_rate=0.0), dict(accountant="gdp"), dict(grad_sample_mode="ew"),
                dict(grad_prune_ratio=1.0), dict(pruned_state="skip"), dict(prune_scope="row")]:
        with pytest.raises(ValueError):
            make_private(case.lm, torch.optim.SGD(params, lr=0.1), **(common | bad))
    engine = make_private(case.lm, torch.optim.SGD(params, lr=0.1), **common)
    with pytest.raises(ValueError, match="1-D"):
        engine.step(case.losses(engine.module).mean())
    with pytest.raises(ValueError, match="empty_step"):
        engine.step(torch.zeros(0, requires_grad=True))
    with pytest.raises(ValueError, match="does not require grad"):
        engine.step(case.losses(engine.module).detach())
    with pytest.raises(ValueError, match="batch of 4"):
        engine.step(case.losses(engine.module)[:2])
    assert engine.steps_taken == 0 and engine.accountant.history == []
    engine.step(case.losses(engine.module))  # the engine is still usable after refused calls
    assert engine.steps_taken == 1
    assert engine.close() is case.lm  # hooks removed: the module can be wrapped again
    ghost = make_private(case.lm, torch.optim.SGD(params, lr=0.1), grad_sample_mode="ghost", **common)
    with pytest.raises(ValueError, match="batch of 4"):
        ghost.step(case.losses(ghost.module)[:2])
    ghost.step(case.losses(ghost.module))
    assert ghost.steps_taken == 1


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_noisy_sum_is_divided_by_the_expected_not_the_realised_batch_size(records, grad_sample_mode):
    """Poisson batches vary in size; the accountant's analysis holds for sum / (q·N), never sum / |batch|."""
    case = make_case(records, "lora", 16)
    plain = copy.deepcopy(case.lm)
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    # The non-private reference: the SUM of the per-example gradients of 2 records, divided by 8 by hand.
    per_example_loss(plain(case.feats[:2], case.batch["input_ids"][:2], case.batch["attention_mask"][:2]),
                     case.batch["labels"][:2]).sum().backward()
    engine = engine_for(case, lr=1.0, expected_batch_size=8, grad_sample_mode=grad_sample_mode)
    before = [p.detach().clone() for p in case.trainable().values()]
    engine.step(case.losses(engine.module, rows=slice(0, 2)))  # a realised batch of 2, expected 8
    for p, p0, ref in zip(case.trainable().values(), before, plain_params):
        torch.testing.assert_close(p0 - p.detach(), ref.grad / 8, atol=1e-10, rtol=1e-8)
