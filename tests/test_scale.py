"""Issue 11, "real scale": DP arithmetic in fp32 with bf16 parameters, logical batches in physical chunks (one
noise draw, one step, one accountant step), logits only at the answer positions, activation checkpointing with
per-example gradients, the LLaVA-1.5-7B-shaped preset (meta device only), and the config's checks."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import toolkit.bench as bench
from toolkit.checkpoint import load_checkpoint
from toolkit.config import TrainConfig
from toolkit.data import Collator, make_vqa, preprocess_images
from toolkit.forward import (LlavaLM, answer_losses, answer_positions, per_example_loss, per_example_token_loss,
                             select_features, tower_hidden_states)
from toolkit.models import apply_trainable, build_model, enable_activation_checkpointing
from toolkit.optimizers import NonPrivateOptimizer
from toolkit.precision import cast_for_training
from toolkit.privacy import make_private
from toolkit.privacy.update_pruning import per_example_clip_factors
from toolkit.train import train
from toolkit.zo import DPZeroOrder

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(scope="module")
def records():
    return make_vqa("parity", "private", image_size=32, limit=32).records


@dataclass
class Case:
    bundle: object
    lm: LlavaLM
    feats: torch.Tensor
    batch: dict

    def rows(self, rows) -> tuple[torch.Tensor, dict]:
        return self.feats[rows], {k: v[rows] for k, v in self.batch.items()}

    def losses(self, module=None, rows=slice(None), full_logits=False) -> torch.Tensor:
        module = module if module is not None else self.lm
        feats, batch = self.rows(rows)
        if full_logits:
            return per_example_loss(module(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"])
        return answer_losses(module, feats, batch)

    def trainable(self) -> dict:
        return {n: p for n, p in self.lm.named_parameters() if p.requires_grad}

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().double().reshape(-1) for p in self.trainable().values()])


def make_case(records, n=8, mode="lora", dtype=torch.float32, n_visual=16, checkpointing=False,
              trainable_dtype="model", lora_variant="standard") -> Case:
    bundle = build_model("tiny", seed=0)
    torch.manual_seed(0)
    apply_trainable(bundle, mode, lora_rank=4, lora_variant=lora_variant)
    with torch.no_grad():  # peft zero-inits lora_B, which would make every lora_A gradient exactly 0
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    cast_for_training(bundle.model, dtype, trainable_dtype)
    if checkpointing:
        enable_activation_checkpointing(bundle)
    recs = records[:n]
    pixels = preprocess_images([r.image for r in recs], bundle.image_size, bundle.image_mean, bundle.image_std)
    feats = select_features(bundle, tower_hidden_states(bundle, pixels))[:, :n_visual].detach()
    collator = Collator(bundle.tokenizer, feats.shape[1], bundle.image_token_id, bundle.prompt_template)
    return Case(bundle, LlavaLM(bundle).bind_collator(collator).train(), feats, collator(recs))


def engine_for(case: Case, **kwargs):
    params = list(case.trainable().values())
    kwargs = dict(noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=len(case.feats), sample_rate=0.25,
                  noise_seed=0) | kwargs
    return make_private(case.lm, torch.optim.SGD(params, lr=1.0), **kwargs)


def chunk_fns(case: Case, module, size: int):
    n = len(case.feats)
    return [lambda s=s: case.losses(module, rows=slice(s, min(s + size, n))) for s in range(0, n, size)]


# ---------------------------------------------------------------- 1. precision: DP arithmetic in >= fp32

def test_bf16_parameters_every_clipped_example_has_norm_at_most_C_in_fp32(records):
    """Each example alone through the optimizer's clipping: ‖c_i g_i‖ equals min(‖g_i‖, C) to fp32 precision.
    Opacus' own clip_and_accumulate (factors rounded to bf16, bf16 sum) is off by up to ~0.5 % and fails."""
    case = make_case(records, n=8, dtype=torch.bfloat16)
    engine = engine_for(case)
    case.losses(engine.module).mean().backward()
    optimizer = engine.optimizer
    grad_samples = [p.grad_sample.detach().clone() for p in optimizer.params]
    assert {g.dtype for g in grad_samples} == {torch.bfloat16}
    norms = torch.stack([torch.cat([g[i].double().reshape(-1) for g in grad_samples]).norm() for i in range(8)])
    C = 0.3 * float(norms.min())  # every example is clipped: the bound is active for all of them
    optimizer.max_grad_norm = C
    for i in range(8):
        for p, g in zip(optimizer.params, grad_samples):
            p.grad_sample, p.summed_grad = g[i:i + 1].clone(), None
        optimizer.clip_and_accumulate()
        assert {p.summed_grad.dtype for p in optimizer.params} == {torch.float32}  # the sum lives in fp32
        clipped = torch.cat([p.summed_grad.double().reshape(-1) for p in optimizer.params]).norm()
        assert float(clipped) <= C * (1 + 1e-6), (i, float(clipped) / C)
        assert float(clipped) == pytest.approx(C * float(norms[i]) / (float(norms[i]) + 1e-6), rel=1e-6)
    # the whole batch at once: Σ_i c_i g_i in fp32 equals the float64 reference
    for p, g in zip(optimizer.params, grad_samples):
        p.grad_sample, p.summed_grad = g.clone(), None
    optimizer.clip_and_accumulate()
    factors = torch.clamp(C / (norms + 1e-6), max=1.0)
    for p, g in zip(optimizer.params, grad_samples):
        expected = torch.einsum("i,i...", factors, g.double())
        scale = torch.einsum("i,i...", factors, g.double().abs())  # fp32 summation error is relative to Σ|c_i g_i|
        assert bool(((p.summed_grad.double() - expected).abs() <= 1e-6 * scale + 1e-15).all())
    torch.testing.assert_close(per_example_clip_factors(grad_samples, C).double(), factors, rtol=1e-6, atol=0)
    optimizer.zero_grad()


def test_bf16_parameters_noise_is_drawn_and_added_in_fp32(records):
    """The rounded bf16 gradient the inner optimizer sees is the correctly rounded fp32 noisy mean
    (Σ c_i g_i + N(0, σ²C²) drawn in fp32 from the seeded generator) / B_expected: within half a bf16 ulp of
    the float64 reference. Noise drawn (or added) in bf16 is up to a full ulp off and fails."""
    sigma, C, seed, b_expected = 1.3, 0.05, 7, 3  # B_expected = 3: the division is not exact in binary
    case = make_case(records, n=4, dtype=torch.bfloat16)
    engine = engine_for(case, noise_multiplier=sigma, max_grad_norm=C, noise_seed=seed,
                        expected_batch_size=b_expected)
    seen = {}

    clip = engine.optimizer.clip_and_accumulate

    def clip_and_record():  # the per-example gradients, before they are clipped (and freed)
        seen["grad_sample"] = [p.grad_sample.detach().clone() for p in engine.optimizer.params]
        clip()

    def record(optimizer, args, kwargs):  # inner optimizer's pre-hook: the noisy gradients
        seen["grad"] = [p.grad.detach().clone() for p in engine.optimizer.params]
        # the per-example gradients were freed once summed, before the noise (the step's memory peak)
        seen["freed"] = all(p.grad_sample.numel() == 0 for p in engine.optimizer.params)

    engine.optimizer.clip_and_accumulate = clip_and_record
    engine.optimizer.original_optimizer.register_step_pre_hook(record)
    engine.step(case.losses(engine.module))
    grad_samples = seen["grad_sample"]
    norms = torch.stack([torch.cat([g[i].double().reshape(-1) for g in grad_samples]).norm() for i in range(4)])
    factors = torch.clamp(C / (norms + 1e-6), max=1.0)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for g, got in zip(grad_samples, seen["grad"]):
        noise = torch.normal(0.0, sigma * C, size=g.shape[1:], generator=generator, dtype=torch.float32)
        expected = (torch.einsum("i,i...", factors, g.double()) + noise.double()) / b_expected
        assert got.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(expected.abs().clamp(min=1e-30))))
        err = ((got.double() - expected).abs() / ulp).max()
        worst = max(worst, float(err))
    assert worst <= 0.5 + 1e-3, worst
    assert seen["freed"]


@pytest.mark.parametrize("mode, lora_variant", [("lora", "standard"), ("lora", "ffa"), ("lora+head", "standard"),
                                                ("lm-full", "standard")])
def test_mixed_precision_trains_fp32_weights_beside_a_bf16_frozen_model(records, mode, lora_variant):
    """trainable_dtype='float32': every trained weight (and FFA's frozen LoRA A, which feeds B) is fp32, the rest
    bf16; bf16 activations reach the fp32 projector, adapters and head, and a DP-SGD step clips and noises fp32
    per-example gradients into fp32 updates."""
    case = make_case(records, n=4, mode=mode, dtype=torch.bfloat16, trainable_dtype="float32",
                     lora_variant=lora_variant)
    for name, p in case.bundle.model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad or "lora_" in name else torch.bfloat16), name
    assert case.bundle.vision_tower.dtype == torch.bfloat16
    engine = engine_for(case, noise_multiplier=1.0, max_grad_norm=1.0)
    seen = {}
    engine.optimizer.original_optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.update(grads=[p.grad for p in engine.optimizer.params]))
    engine.step(case.losses(engine.module))
    assert seen["grads"] and all(g.dtype == torch.float32 and bool(g.isfinite().all()) for g in seen["grads"])
    fresh = make_case(records, n=4, mode=mode, dtype=torch.bfloat16, trainable_dtype="float32",
                      lora_variant=lora_variant)
    engine_for(fresh, grad_sample_mode="ghost")  # fp32 trained weights: Opacus' ghost clipping is exact again


def test_an_update_below_bf16_resolution_moves_an_fp32_trained_weight_and_is_lost_in_pure_bf16(records):
    """Why fp32 trained weights are the default: an Adam step of lr 1e-6 moves every fp32 projector weight
    of size >= 2^-5 and leaves every such pure-bf16 weight where it was."""
    moved = {}
    for trainable_dtype in ("float32", "model"):
        case = make_case(records, n=4, mode="projector", dtype=torch.bfloat16, trainable_dtype=trainable_dtype)
        weight = case.bundle.model.model.multi_modal_projector.linear_1.weight
        before = weight.detach().clone()
        optimizer = torch.optim.Adam([weight], lr=1e-6)
        case.losses().mean().backward()
        optimizer.step()
        sizable = before.abs() >= 2 ** -5  # a bf16 ulp there is >= 2^-12 = 2.4e-4: a 1e-6 step rounds away
        moved[trainable_dtype] = float((weight.detach() != before)[sizable].double().mean())
    assert moved == {"float32": 1.0, "model": 0.0}


def test_a_dp_zo_step_restores_fp32_trained_weights_and_drifts_pure_bf16_ones(records):
    """DP-ZO perturbs θ by +μz, -2μz, +μz before its update: with lr 0 the step must leave θ where it was. fp32
    trained weights come back to within fp32 rounding; pure bf16 ones (``trainable_dtype="model"``) drift."""
    drift = {}
    for trainable_dtype in ("float32", "model"):
        case = make_case(records, n=4, mode="projector", dtype=torch.bfloat16, trainable_dtype=trainable_dtype)
        params = list(case.trainable().values())
        zo = DPZeroOrder(params, lr=0.0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                         sample_rate=0.25, seed=1, noise_seed=2, mu=1e-2)
        theta0 = case.flat()
        zo.step(lambda: case.losses())
        drift[trainable_dtype] = float(((case.flat() - theta0).abs() / theta0.abs().clamp(min=1e-3)).max())
    assert drift["float32"] < 1e-5, drift
    assert drift["model"] > 1e-3, drift


def test_ghost_clipping_refuses_bf16_parameters(records):
    case = make_case(records, n=2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ghost clipping with torch.bfloat16"):
        engine_for(case, grad_sample_mode="ghost")


def test_dtype_config_is_checked():
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(steps=1, dtype="float16").resolved()
    with pytest.raises(ValueError, match="trainable_dtype"):
        TrainConfig(steps=1, trainable_dtype="bfloat16").resolved()
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        TrainConfig(steps=1, max_physical_batch_size=0).resolved()
    with pytest.raises(ValueError, match="activation_checkpointing.*functorch"):
        TrainConfig(steps=1, method="dp-sgd", grad_sample_mode="functorch", activation_checkpointing=True).resolved()


# ---------------------------------------------------------------- 2. logical batch in physical chunks

@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost", "ghost-fp32"])
def test_chunks_of_8_equal_one_pass_of_32_with_one_noise_draw_and_one_accounted_step(records, grad_sample_mode):
    settings = dict(noise_multiplier=1.1, max_grad_norm=0.05, noise_seed=3, grad_prune_ratio=0.2,
                    grad_sample_mode=grad_sample_mode, expected_batch_size=32, sample_rate=0.25)
    whole, chunked = make_case(records, n=32), make_case(records, n=32)
    theta0 = whole.flat()
    one = engine_for(whole, **settings)
    many = engine_for(chunked, **settings)
    loss_one = one.step(lambda: whole.losses(one.module))
    loss_many = many.step(chunk_fns(chunked, many.module, 8))
    assert loss_many == pytest.approx(loss_one, rel=1e-6)
    update_one, update_many = theta0 - whole.flat(), theta0 - chunked.flat()
    assert float(update_one.abs().max()) > 1e-3  # a real update, noise included
    torch.testing.assert_close(update_many, update_one, atol=1e-6, rtol=0)
    for engine in (one, many):
        assert engine.steps_taken == 1
        assert engine.accountant.history == [(1.1, 0.25, 1)]  # one step at the logical batch's rate
    assert all(getattr(p, "summed_grad", None) is None for p in many.optimizer.params)


def test_a_failed_chunk_leaves_no_partial_clipped_sum_behind(records):
    """If chunk 2 fails, chunk 1's clipped sum must not leak into the next (accounted) step."""
    settings = dict(noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=8)
    case, fresh = make_case(records, n=8), make_case(records, n=8)
    theta0 = case.flat()
    engine, reference = engine_for(case, **settings), engine_for(fresh, **settings)

    def broken():
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        engine.step([lambda: case.losses(engine.module, rows=slice(0, 4)), broken])
    assert engine.steps_taken == 0 and engine.accountant.history == []
    assert torch.equal(case.flat(), theta0)
    engine.step(lambda: case.losses(engine.module, rows=slice(4, 8)))
    reference.step(lambda: fresh.losses(reference.module, rows=slice(4, 8)))
    torch.testing.assert_close(case.flat(), fresh.flat(), atol=1e-7, rtol=0)


def test_dp_zo_chunks_equal_one_pass(records):
    results = []
    for size in (None, 8):
        case = make_case(records, n=32)
        params = list(case.trainable().values())
        zo = DPZeroOrder(params, lr=0.5, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=32,
                         sample_rate=0.25, seed=1, noise_seed=2)
        theta0 = case.flat()
        fn = (lambda: case.losses()) if size is None else chunk_fns(case, case.lm, size)
        zo.step(fn)
        results.append((theta0 - case.flat(), zo.last_clipped_scalars, zo.accountant.history))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=0)
    assert results[0][2] == results[1][2] == [(1.0, 0.25, 1)]


def test_non_private_chunks_equal_one_pass(records):
    updates = []
    for size in (None, 8):
        case = make_case(records, n=32)
        opt = NonPrivateOptimizer(case.lm, torch.optim.SGD(list(case.trainable().values()), lr=1.0))
        theta0 = case.flat()
        opt.step((lambda: case.losses()) if size is None else chunk_fns(case, case.lm, size))
        updates.append(theta0 - case.flat())
    torch.testing.assert_close(updates[1], updates[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("trainable_dtype", ["float32", "model"])
def test_train_with_physical_batches_and_bf16_runs_every_method(trainable_dtype, tmp_path):
    """The trained weights train (and are checkpointed) in ``trainable_dtype``; the model a run returns is in the
    model's dtype throughout, so transformers' own forward runs on it."""
    fast = dict(steps=2, train_limit=32, eval_limit=16, warm_start_steps=0, expected_batch_size=8, progress=False)
    for method in ("non-private", "dual-priv", "dp-zo"):
        checkpoint = tmp_path / f"{method}.pt"
        result = train(TrainConfig(method=method, dtype="bfloat16", max_physical_batch_size=3, noise_seed=0,
                                   trainable_dtype=trainable_dtype, checkpoint_path=str(checkpoint), **fast))
        assert result.steps == 2 and 0 <= result.accuracy <= 1
        trained = load_checkpoint(checkpoint).trainable
        assert {t.dtype for t in trained.values()} == {
            torch.float32 if trainable_dtype == "float32" else torch.bfloat16}
        assert {p.dtype for p in result.bundle.model.parameters()} == {torch.bfloat16}
        bundle = result.bundle
        pixels = bundle.preprocess([make_vqa("parity", "test", bundle.image_size, limit=1).records[0].image])
        ids = torch.tensor([[bundle.image_token_id] * bundle.n_patches + [1]])
        with torch.no_grad():
            logits = bundle.model(input_ids=ids, pixel_values=pixels.to(torch.bfloat16)).logits
        assert bool(logits.isfinite().all())
        if method != "non-private":
            assert 0 < result.epsilon_spent <= 3.0


def test_an_interrupted_bf16_run_resumes_its_fp32_trained_weights_exactly(tmp_path):
    """The checkpoint keeps the fp32 trained weights and their optimizer state (the model a run returns is rounded
    to bf16 only after it is saved), so 2 steps + 2 resumed end where 4 uninterrupted steps do, bit for bit."""
    settings = dict(method="dual-priv", dtype="bfloat16", trainable_dtype="float32", noise_seed=3, steps=4,
                    train_limit=32, eval_limit=8, warm_start_steps=0, expected_batch_size=8, progress=False)
    train(TrainConfig(checkpoint_path=str(tmp_path / "whole.pt"), **settings))
    first = train(TrainConfig(checkpoint_path=str(tmp_path / "half.pt"), **settings),
                  callback=lambda row: row["step"] < 2)
    assert first.steps == 2
    train(TrainConfig(resume_from=str(tmp_path / "half.pt"), checkpoint_path=str(tmp_path / "resumed.pt"), **settings))
    whole, half, resumed = (load_checkpoint(tmp_path / f"{name}.pt").trainable for name in ("whole", "half", "resumed"))
    assert {t.dtype for t in resumed.values()} == {torch.float32}
    assert any(not torch.equal(half[name], whole[name]) for name in whole)   # the last two steps moved something
    for name, weight in whole.items():
        assert torch.equal(resumed[name], weight), name

# ---------------------------------------------------------------- 3. logits only where the labels are

def test_answer_positions_give_the_full_logits_loss_and_a_small_lm_head(records):
    case = make_case(records, n=8, dtype=torch.float64)
    positions, targets = answer_positions(case.batch["labels"])
    n_answer = (case.batch["labels"][:, 1:] != -100).sum(1)
    assert positions.shape[1] == int(n_answer.max()) < case.batch["input_ids"].shape[1] // 4
    seen = []
    hook = case.lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    fast = case.losses()
    hook.remove()
    assert seen == [(8, positions.shape[1], case.lm.lm_head.out_features)]  # never [B, T, V]
    torch.testing.assert_close(fast, case.losses(full_logits=True), atol=1e-12, rtol=1e-12)
    # rows with shorter answers are padded with ignored targets
    ragged = case.batch["labels"].clone()
    ragged[0, ragged[0] != -100] = torch.where(torch.arange(int((ragged[0] != -100).sum())) == 0, ragged[0][ragged[0] != -100], -100)
    pos, tgt = answer_positions(ragged)
    assert int((tgt[0] != -100).sum()) == 1 and int((tgt[1] != -100).sum()) == int(n_answer[1])
    logits = torch.randn(8, ragged.shape[1], 7, dtype=torch.float64)
    safe = ragged.clamp(max=6).masked_fill(ragged == -100, -100)
    _, tgt = answer_positions(safe)
    torch.testing.assert_close(per_example_token_loss(logits.gather(1, pos[..., None].expand(-1, -1, 7)), tgt),
                               per_example_loss(logits, safe))


@pytest.mark.parametrize("mode,checkpointing", [("lm-full", False), ("lora+head", False), ("lm-full", True)])
def test_per_example_gradients_through_the_answer_position_head_equal_micro_batches(records, mode, checkpointing):
    """Opacus' per-example gradients (LM head on the gathered answer positions; with activation checkpointing)
    equal ∇L_i from a forward/backward of row i alone, in float64."""
    case = make_case(records, n=4, mode=mode, dtype=torch.float64, checkpointing=checkpointing)
    reference = make_case(records, n=4, mode=mode, dtype=torch.float64)  # same weights, no checkpointing
    params = list(reference.trainable().values())
    assert case.lm.lm_head.weight.requires_grad
    expected = [torch.autograd.grad(reference.losses(rows=slice(i, i + 1))[0], params) for i in range(4)]
    engine = engine_for(case)
    case.losses(engine.module).mean().backward()
    for j, (name, p) in enumerate(case.trainable().items()):
        ref = torch.stack([g[j] for g in expected])
        torch.testing.assert_close(p.grad_sample, ref, atol=1e-9, rtol=1e-7, msg=name)
    assert any(float(g[j].abs().max()) > 1e-4 for g in expected for j in range(len(params)))
    engine.optimizer.zero_grad()


# ---------------------------------------------------------------- 4. activation checkpointing

def test_activation_checkpointing_ghost_norms_and_dp_sgd_update_are_unchanged(records):
    plain, ckpt = make_case(records, n=8, dtype=torch.float64), \
        make_case(records, n=8, dtype=torch.float64, checkpointing=True)
    updates, norms = [], []
    for case, mode in ((plain, "hooks"), (ckpt, "hooks")):
        theta0 = case.flat()
        engine = engine_for(case, max_grad_norm=0.05, grad_sample_mode=mode, noise_multiplier=0.5)
        engine.step(lambda: case.losses(engine.module))
        updates.append(theta0 - case.flat())
    torch.testing.assert_close(updates[1], updates[0], atol=1e-12, rtol=1e-9)
    for case in (make_case(records, n=8, dtype=torch.float64),
                 make_case(records, n=8, dtype=torch.float64, checkpointing=True)):
        engine = engine_for(case, max_grad_norm=0.05, grad_sample_mode="ghost")
        engine.step(lambda: case.losses(engine.module))
        norms.append(engine.module.per_sample_gradient_norms.clone())
    torch.testing.assert_close(norms[1], norms[0], atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------- 5. the paper's shapes

def test_llava_7b_shape_preset_has_llava_1_5_7b_shapes_on_the_meta_device():
    bundle = build_model("llava-7b-shape", dtype=torch.bfloat16, device="meta")  # no memory allocated
    model = bundle.model
    assert bundle.n_patches == 576 and bundle.has_cls and bundle.image_size == 336
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size, vision.patch_size) == \
        (1024, 24, 4096, 14)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.vocab_size) == (4096, 32, 32, 11008, 32000)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # CLIP ViT-L/14-336 tower 303.5M + Llama-2-7B 6.74B (vocab 32000) + 2-layer projector 21.0M
    n = sum(p.numel() for p in model.parameters())
    assert n == 303_507_456 + 6_738_415_616 + 20_979_712
    shallow = build_model("llava-7b-shape", dtype=torch.bfloat16, device="meta", lm_layers=2, vision_layers=2)
    assert shallow.model.config.text_config.num_hidden_layers == 2
    assert shallow.model.config.text_config.hidden_size == 4096
    with pytest.raises(ValueError, match="vision_layers"):
        build_model("tiny", vision_layers=1, device="meta")
    with pytest.raises(ValueError, match="name a device explicitly"):  # never 28 GB by accident on a CPU
        build_model("llava-7b-shape")


def test_blockwise_fp32_clipping_equals_the_float64_reference(monkeypatch):
    """Low-precision per-example gradients are promoted to fp32 block by block (bounded memory): with tiny blocks
    (many of them) the factors and the clipped sum still equal the float64 computation."""
    import toolkit.privacy.update_pruning as up

    monkeypatch.setattr(up, "_BLOCK_ELEMENTS", 64)
    torch.manual_seed(0)
    grads = [torch.randn(5, 37, 11).to(torch.bfloat16), torch.randn(5, 300).to(torch.bfloat16) * 3]
    norms = torch.stack([torch.cat([g[i].double().reshape(-1) for g in grads]).norm() for i in range(5)])
    C = float(norms.median())
    factors = up.per_example_clip_factors(grads, C)
    assert factors.dtype == torch.float32
    torch.testing.assert_close(factors.double(), torch.clamp(C / (norms + 1e-6), max=1.0), rtol=1e-6, atol=0)
    for g in grads:
        got = up.clipped_sum(g, factors, torch.float32)
        expected = torch.einsum("i,i...", factors.double(), g.double())
        scale = torch.einsum("i,i...", factors.double(), g.double().abs())
        assert got.shape == g.shape[1:] and bool(((got.double() - expected).abs() <= 1e-6 * scale + 1e-15).all())


def test_dtype_resolution_and_a_clear_warning_when_the_cpu_emulates_bf16(monkeypatch):
    import toolkit.precision as precision

    cpu = torch.device("cpu")
    assert precision.resolve_dtype("auto", cpu) == torch.float32
    assert precision.resolve_dtype("float32", cpu) == torch.float32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert precision.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        precision.resolve_dtype("float16", cpu)


def test_a_rank_with_an_empty_share_contributes_a_zero_clipped_sum():
    """An empty Poisson batch (or a data-parallel rank whose share is empty) clips to an exact zero sum."""
    import toolkit.privacy.update_pruning as up

    grads = [torch.zeros(0, 3, 4, dtype=torch.bfloat16), torch.zeros(0, 5, dtype=torch.bfloat16)]
    factors = up.per_example_clip_factors(grads, 1.0)
    assert factors.shape == (0,)
    assert torch.equal(up.clipped_sum(grads[0], factors, torch.float32), torch.zeros(3, 4))


def test_llava_7b_shape_bench_uses_the_lean_settings_without_flags(monkeypatch):
    """The 7B-shape preset's bench defaults are activation checkpointing, ghost-fp32 clipping and SGD with momentum,
    with trained weights in fp32 as training keeps them; other presets stay off / hooks / Adam; a flag overrides."""
    seen = []
    monkeypatch.setattr(bench, "measure_method", lambda **kw: seen.append(
        (kw["activation_checkpointing"], kw["grad_sample_mode"], kw["optimizer"], kw["trainable_dtype"])) or dict(
        method=kw["method"], peak_memory_mb=1.0, step_time_s=1.0, tokens_per_s=1.0))
    bench.run_bench(methods=("dual-priv",), preset="llava-7b-shape", isolate=False)
    bench.run_bench(methods=("dual-priv",), preset="tiny", isolate=False)
    bench.run_bench(methods=("dual-priv",), preset="llava-7b-shape", isolate=False, activation_checkpointing=False,
                    grad_sample_mode="hooks", optimizer="adam", trainable_dtype="model")
    assert seen == [(True, "ghost-fp32", "sgd", "float32"), (False, "hooks", "adam", "float32"),
                    (False, "hooks", "adam", "model")]


def test_the_bench_measures_the_optimizer_and_lora_variant_it_is_given():
    """Adam's two moments and LoRA's A matrices are part of a method's memory: the bench trains what it is told
    (SGD with momentum holds one moment, FFA-LoRA trains fewer parameters) and says so in its row."""
    rows = {(o, v): bench.measure_method("dual-priv", preset="tiny", batch_size=2, steps=3, optimizer=o, lora_variant=v)
            for o, v in (("adam", "standard"), ("sgd", "standard"), ("adam", "ffa"))}
    adam, sgd, ffa = rows[("adam", "standard")], rows[("sgd", "standard")], rows[("adam", "ffa")]
    assert (sgd["optimizer"], ffa["lora_variant"]) == ("sgd", "ffa")
    assert sgd["peak_memory_mb"] < adam["peak_memory_mb"]
    assert ffa["trainable_params"] < adam["trainable_params"]
    table = bench.run_bench(methods=("dual-priv",), preset="tiny", batch_size=2, steps=3, isolate=False, optimizer="sgd")
    assert table.iloc[0]["optimizer"] == "sgd"   # the table (and its JSON) says what was measured
    assert table.iloc[0]["grad_sample_mode"] == "hooks"   # the clipping mode moves memory and time as much


def _children_alive() -> int:
    """Processes whose parent is this one (Linux /proc): the isolated bench worker while it runs."""
    alive = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:   # the process ended while it was read
            continue
        alive += fields.get("PPid", "").strip() == str(os.getpid())
    return alive


def test_the_isolated_bench_tells_each_phase_while_its_worker_still_runs():
    """At the 7B shape on a CPU one step takes minutes and a method an hour: the bench says which phase it is in as
    it starts (model built, warm-up, peak-memory and timed steps), from inside the worker, not when it ends."""
    told = []
    before = _children_alive()    # a child left by another test must not pass for the worker
    table = bench.run_bench(methods=("dual-priv",), preset="tiny", batch_size=2, steps=4, isolate=True,
                            on_phase=lambda method, text: told.append((method, text, _children_alive())))
    assert [text for _, text, _ in told] == [
        told[0][1], "step 1 of 4 (warm-up)", "step 2 of 4 (peak memory)", "step 3 of 4 (timed)",
        "step 4 of 4 (timed)"]
    assert told[0][1].startswith("model built (2 LM / 3 vision layers")
    assert {method for method, _, _ in told} == {"dual-priv"}
    assert all(alive > before for _, _, alive in told)   # told while the worker ran, not after
    assert table.iloc[0]["peak_memory_mb"] > 0


def test_a_failing_bench_worker_raises_with_its_own_error_message():
    """What fails inside a worker (run_bench checks its arguments first; here the worker is called directly)."""
    with pytest.raises(RuntimeError, match="benchmark of dual-priv failed:(.|\n)*no-such-preset"):
        bench._measure_isolated(dict(method="dual-priv", preset="no-such-preset", batch_size=2, steps=3))


@pytest.mark.parametrize("bad, words", [
    (dict(steps=2), "steps must be an integer >= 3"),
    (dict(preset="bogus"), "unknown preset 'bogus'"),
    (dict(keep_tokens=1000), "larger than the 64 patches"),
    (dict(token_prune_ratio=1.5), "token_prune_ratio must be in [0, 1)"),
    (dict(grad_sample_mode="bogus"), "unknown grad_sample_mode 'bogus'"),
    (dict(dtype="bogus"), "unknown dtype 'bogus'"),
    (dict(vision_layers=1), "vision_layers must be an integer >= 2"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
])
def test_the_bench_refuses_a_bad_argument_by_name_before_any_worker_starts(bad, words, monkeypatch):
    """A bad argument is named at once, not by a worker's traceback after a model was built (an hour at 7B)."""
    started = []
    monkeypatch.setattr(bench, "_measure_isolated", lambda *a, **kw: started.append(a))
    kwargs = dict(methods=("non-private", "dual-priv"), preset="tiny", batch_size=2, steps=3, isolate=True,
                  keep_tokens=None, token_prune_ratio=0.75) | bad
    if "keep_tokens" in bad:
        kwargs["token_prune_ratio"] = None
    with pytest.raises(ValueError) as err:
        bench.run_bench(**kwargs)
    assert words in str(err.value) and started == []


@pytest.mark.parametrize("flags, value", [([], None), (["--activation-checkpointing"], True),
                                          (["--activation-checkpointing", "true"], True),
                                          (["--activation-checkpointing", "false"], False),
                                          (["--no-activation-checkpointing"], False)])
def test_bench_takes_activation_checkpointing_as_train_spells_it(flags, value):
    """Was: only the bare switch; ``bench --activation-checkpointing true`` (train's spelling, as in the README)
    failed with "unrecognized arguments: true"."""
    from toolkit.cli import build_parser

    args = build_parser().parse_args(["bench", "--methods", "dual-priv", *flags])
    assert args.activation_checkpointing is value


def test_measuring_a_cpu_peak_prints_nothing_on_stderr():
    """Was: kineto's "USDT ... profiler_start / profiler_stop" lines in every run's and sweep cell's log."""
    code = ("import os, torch; from toolkit.metering import measure_peak; "
            "print(measure_peak(lambda: torch.ones(1000).sum(), baseline_tensors=[]).peak_mb > 0, "
            "'KINETO_LOG_LEVEL' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True False", done.stderr   # the variable is not left set
    assert "profiler_start" not in done.stderr and "USDT" not in done.stderr, done.stderr
