"""Mechanism 1: visual token pruning (toolkit.tokens). Names say the behaviour each test protects."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from toolkit.data import Collator, make_vqa, preprocess_images
from toolkit.forward import LlavaLM, per_example_loss, select_features, tower_hidden_states
from toolkit.models import apply_trainable, build_model
from toolkit.tokens import (
    STRATEGIES, Budget, ExampleView, encoder_layers, fuse_contextual, fusion_noise, make_pruner,
    matched_fusion_sigma, cls_attention,
)

PRUNING = sorted(set(STRATEGIES) - {"none"})
CLS_FREE = sorted(set(PRUNING) - {"dual-priv"})



def _pixels(bundle, n=4):
    records = make_vqa("digit", "test", image_size=bundle.image_size, limit=n).records
    return preprocess_images([r.image for r in records], bundle.image_size, bundle.image_mean, bundle.image_std)


@pytest.fixture(scope="module")
def digit_pixels():
    """4 real digit images on the tiny presets' 32 x 32 canvas (mean = std = 0.5 for every preset)."""
    return _pixels(build_model("tiny", seed=0))


@pytest.fixture(scope="module")
def clip(digit_pixels):
    """A read-only tiny CLIP LLaVA (64 patches + [CLS]) and the hidden states of the 4 digit images."""
    bundle = build_model("tiny", seed=0)
    return bundle, tower_hidden_states(bundle, digit_pixels)


@pytest.fixture(scope="module")
def siglip(digit_pixels):
    bundle = build_model("tiny-siglip", seed=0)
    return bundle, tower_hidden_states(bundle, digit_pixels)


@pytest.fixture(scope="module")
def llava576():
    """LLaVA-1.5's token count: 24 x 24 = 576 patches."""
    bundle = build_model("llava576", seed=0)
    return bundle, tower_hidden_states(bundle, _pixels(bundle, n=2))


def _check_consistent(out, n_patches):
    """Kept patches are distinct and in range; fused patches are disjoint from kept; slots tile n_out."""
    n_kept = out.kept_indices.shape[1]
    assert n_kept <= n_patches
    n_fused = out.contextual_slots.numel()
    assert int(out.cls_slot is not None) + n_kept + n_fused == out.n_out == out.features.shape[1]
    for b in range(out.batch_size):
        kept = out.kept_indices[b]
        assert kept.unique().numel() == n_kept and bool((kept >= 0).all()) and bool((kept < n_patches).all())
        assert torch.equal(kept, kept.sort().values)
        fused_patches = torch.nonzero(out.clusters[b] >= 0).flatten()
        assert not set(fused_patches.tolist()) & set(kept.tolist())
        if n_fused:
            assert set(out.clusters[b][fused_patches].tolist()) <= set(range(n_fused))


# ------------------------------------------------------------------------------------------------ budgets

@pytest.mark.parametrize("strategy", PRUNING)
@pytest.mark.parametrize("keep", [4, 16, 24, 64])
def test_every_strategy_feeds_exactly_keep_tokens(clip, strategy, keep):
    bundle, hidden = clip
    pruner = make_pruner(strategy, bundle, keep=keep)
    out = pruner(hidden)
    assert pruner.n_out == out.n_out == keep
    assert out.features.shape == (4, keep, bundle.config.vision_config.hidden_size)
    _check_consistent(out, bundle.n_patches)


@pytest.mark.parametrize("strategy", PRUNING)
@pytest.mark.parametrize("ratio, expected", [(0.0, 64), (0.5, 32), (0.75, 16), (0.9, 6)])
def test_token_prune_ratio_removes_that_fraction_of_patches(clip, strategy, ratio, expected):
    bundle, hidden = clip
    out = make_pruner(strategy, bundle, token_prune_ratio=ratio)(hidden)
    assert out.n_out == out.features.shape[1] == expected
    _check_consistent(out, bundle.n_patches)


@pytest.mark.parametrize("strategy", ["dual-priv", "pool", "random"])
@pytest.mark.parametrize("keep", [64, 128, 192])
def test_llava_576_patches_prune_to_paper_budgets(llava576, strategy, keep):
    bundle, hidden = llava576
    out = make_pruner(strategy, bundle, keep=keep)(hidden)
    assert bundle.n_patches == out.n_in == 576
    assert out.features.shape == (2, keep, 64)
    _check_consistent(out, 576)


@pytest.mark.parametrize("keep, n_contextual", [(1, 0), (2, 0), (3, 1), (16, 2), (64, 8)])
def test_dual_priv_splits_keep_into_cls_dominant_and_contextual(clip, keep, n_contextual):
    bundle, hidden = clip
    pruner = make_pruner("dual-priv", bundle, keep=keep)
    assert (pruner.n_contextual, pruner.n_kept) == (n_contextual, keep - 1 - n_contextual)
    out = pruner(hidden)
    assert out.cls_slot == 0 and out.contextual_slots.tolist() == list(range(keep - n_contextual, keep))
    # With fusion, every patch is either dominant or in a cluster: nothing is dropped.
    assert out.n_dropped == (0 if n_contextual else 64 - (keep - 1))


def test_dual_priv_places_cls_then_dominant_patches_then_fused_tokens(clip):
    bundle, hidden = clip
    out = make_pruner("dual-priv", bundle, keep=16, n_contextual=3)(hidden)
    features = hidden[bundle.vision_feature_layer]
    for b in range(4):
        assert torch.equal(out.features[b, 0], features[b, 0])
        assert torch.equal(out.features[b, out.kept_slots], features[b, 1:][out.kept_indices[b]])
    assert out.contextual_slots.tolist() == [13, 14, 15]


# ------------------------------------------------------------------------------------------------ attention

def _eager_attentions(bundle, pixels):
    eager = copy.deepcopy(bundle.vision_tower)
    eager.config._attn_implementation = "eager"  # the attention modules share this config object
    with torch.no_grad():
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
    return out.attentions


def test_recomputed_cls_attention_matches_eager_attention_at_every_layer(clip, digit_pixels):
    bundle, hidden = clip
    attentions = _eager_attentions(bundle, digit_pixels)
    layers = encoder_layers(bundle.vision_tower)
    for layer in range(bundle.n_vision_layers):
        eager_row = attentions[layer][:, :, 0, 1:].mean(dim=1)  # mean over heads of the [CLS] row
        with torch.no_grad():
            mine = cls_attention(layers[layer], hidden[layer], n_heads=4)
        assert (mine - eager_row).abs().max().item() < 1e-6


@pytest.mark.parametrize("layer", [None, 0, 2])
def test_dominant_patches_are_top_k_of_the_eager_cls_attention(clip, digit_pixels, layer):
    bundle, hidden = clip
    pruner = make_pruner("dual-priv", bundle, keep=16, layer=layer)
    out = pruner(hidden)
    eager_row = _eager_attentions(bundle, digit_pixels)[pruner.layer][:, :, 0, 1:].mean(dim=1)
    assert pruner.layer == (bundle.n_vision_layers - 2 if layer is None else layer)
    k = pruner.n_kept
    error = (out.scores - eager_row).abs().max().item()
    assert error < 1e-6
    for b in range(4):
        ranked = torch.sort(eager_row[b], descending=True, stable=True)
        assert torch.equal(out.kept_indices[b], ranked.indices[:k].sort().values)
        # scores off by at most `error` cannot reorder the cut when the gap there exceeds 2 * error
        assert (ranked.values[k - 1] - ranked.values[k]).item() > 2 * error


def test_mean_attention_on_siglip_matches_eager_attention_received(siglip, digit_pixels):
    bundle, hidden = siglip
    pruner = make_pruner("mean-attention", bundle, keep=16)
    out = pruner(hidden)
    eager = _eager_attentions(bundle, digit_pixels)[pruner.layer].mean(dim=(1, 2))  # heads, queries
    assert torch.allclose(out.scores, eager, atol=1e-6)
    for b in range(4):
        top = torch.sort(eager[b], descending=True, stable=True).indices[:16]
        assert torch.equal(out.kept_indices[b], top.sort().values)


def test_encoder_layers_are_found_by_structure_not_by_path(clip, siglip):
    for bundle, _ in (clip, siglip):
        layers = encoder_layers(bundle.vision_tower)
        assert len(layers) == bundle.n_vision_layers
    with pytest.raises(ValueError, match="could not find encoder layers"):
        encoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------------------ fusion

def test_fused_token_is_centre_plus_mean_of_its_cosine_members():
    tokens = torch.tensor([[2.0, 0.0],   # centre of cluster 0 (position 0; stride 6 // 2 = 3)
                           [1.0, 0.1],   # -> 0
                           [0.0, 3.0],   # -> 1
                           [0.0, 1.0],   # centre of cluster 1 (position 3)
                           [0.1, 2.0],   # -> 1
                           [3.0, 0.2]])  # -> 0
    fused, assignment, centres = fuse_contextual(tokens, 2)
    assert centres.tolist() == [0, 3]
    assert assignment.tolist() == [0, 0, 1, 1, 1, 0]
    expected = torch.tensor([[2.0 + (1.0 + 3.0) / 2, 0.0 + (0.1 + 0.2) / 2],
                             [0.0 + (0.0 + 0.1) / 2, 1.0 + (3.0 + 2.0) / 2]])
    assert torch.allclose(fused, expected)


def test_fused_token_without_members_is_its_centre():
    tokens = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    fused, assignment, centres = fuse_contextual(tokens, 2)
    assert torch.equal(fused, tokens) and assignment.tolist() == [0, 1] and centres.tolist() == [0, 1]


def test_dual_priv_strategy_on_a_hand_made_example():
    # 8 patches on a 2 x 4 grid; patches 1 and 5 get the highest [CLS] attention.
    patches = torch.tensor([[1.0, 0.0], [9.0, 9.0], [0.0, 1.0], [1.0, 0.2], [0.0, 2.0], [7.0, 7.0],
                            [2.0, 0.1], [0.1, 3.0]])
    scores = torch.tensor([0.1, 0.9, 0.1, 0.1, 0.1, 0.5, 0.1, 0.1])
    view = ExampleView(patches=patches, cls=torch.zeros(2), scores=scores)
    selection = STRATEGIES["dual-priv"].select(view, Budget(keep=5, n_patches=8, grid=(2, 4), n_contextual=2))
    assert selection.with_cls and selection.kept.tolist() == [1, 5]
    # remaining patches [0, 2, 3, 4, 6, 7]; stride 6 // 2 = 3 -> centres are patches 0 and 4
    assert selection.centres.tolist() == [0, 4]
    assert selection.clusters.tolist() == [0, -1, 1, 0, 1, -1, 0, 1]
    expected = torch.stack([patches[0] + (patches[3] + patches[6]) / 2, patches[4] + (patches[2] + patches[7]) / 2])
    assert torch.allclose(selection.fused, expected)


def test_score_ties_keep_the_lowest_patch_index():
    view = ExampleView(patches=torch.ones(6, 2), cls=None, scores=torch.tensor([0.2, 0.5, 0.5, 0.5, 0.1, 0.5]))
    selection = STRATEGIES["mean-attention"].select(view, Budget(keep=3, n_patches=6, grid=(2, 3)))
    assert selection.kept.tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ determinism, batches

@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_pruning_twice_gives_identical_results(clip, strategy):
    bundle, hidden = clip
    keep = None if strategy == "none" else 16
    first = make_pruner(strategy, bundle, keep=keep)(hidden)
    second = make_pruner(strategy, bundle, keep=keep)(hidden)
    for name in ("features", "kept_indices", "clusters", "centre_indices", "contextual_slots"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert (first.scores is None and second.scores is None) or torch.equal(first.scores, second.scores)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_batch_gives_exactly_each_example_pruned_alone(clip, strategy):
    bundle, hidden = clip
    pruner = make_pruner(strategy, bundle, keep=None if strategy == "none" else 16)
    batch = pruner(hidden)
    for b in range(4):
        alone = pruner(tuple(h[b:b + 1] for h in hidden))
        assert torch.equal(batch.features[b:b + 1], alone.features)
        assert torch.equal(batch.kept_indices[b:b + 1], alone.kept_indices)
        assert torch.equal(batch.clusters[b:b + 1], alone.clusters)
        assert torch.equal(batch.centre_indices[b:b + 1], alone.centre_indices)
        if batch.scores is not None:
            assert torch.equal(batch.scores[b:b + 1], alone.scores)


def test_random_strategy_is_seeded_by_the_image_not_by_its_batch_position(clip):
    bundle, hidden = clip
    pruner = make_pruner("random", bundle, keep=16)
    forward = pruner(hidden)
    reverse = pruner(tuple(h.flip(0) for h in hidden))
    assert torch.equal(forward.kept_indices, reverse.kept_indices.flip(0))
    assert len({tuple(row.tolist()) for row in forward.kept_indices}) == 4  # different images, different draws
    reseeded = make_pruner("random", bundle, keep=16, seed=1)(hidden)
    assert not torch.equal(forward.kept_indices, reseeded.kept_indices)
    explicit = pruner(hidden, example_seeds=[7, 7, 7, 7])
    assert all(torch.equal(explicit.kept_indices[0], row) for row in explicit.kept_indices)


# ------------------------------------------------------------------------------------------------ towers, none

def test_none_feeds_exactly_hf_select_features(clip, siglip):
    for bundle, hidden in (clip, siglip):
        out = make_pruner("none", bundle)(hidden)
        assert torch.equal(out.features, select_features(bundle, hidden))
        assert out.n_out == bundle.n_patches and out.kept_indices.shape == (4, bundle.n_patches)


def test_none_keeps_cls_when_hf_feeds_it():
    bundle = build_model("tiny", seed=0)
    bundle.config.vision_feature_select_strategy = "full"
    hidden = tower_hidden_states(bundle, _pixels(bundle, n=2))
    out = make_pruner("none", bundle)(hidden)
    assert out.n_out == 65 and torch.equal(out.features, select_features(bundle, hidden))


@pytest.mark.parametrize("strategy", CLS_FREE)
def test_strategies_without_cls_work_on_a_siglip_tower(siglip, strategy):
    bundle, hidden = siglip
    out = make_pruner(strategy, bundle, keep=16)(hidden)
    assert out.features.shape == (4, 16, 64) and out.cls_slot is None
    _check_consistent(out, 64)


def test_mean_attention_can_fuse_the_rest_like_dual_priv(siglip):
    bundle, hidden = siglip
    out = make_pruner("mean-attention", bundle, keep=16, n_contextual=4)(hidden)
    assert out.kept_indices.shape == (4, 12) and out.contextual_slots.tolist() == [12, 13, 14, 15]
    assert out.n_dropped == 0


def test_dual_priv_refuses_a_tower_without_cls(siglip):
    bundle, _ = siglip
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        make_pruner("dual-priv", bundle, keep=16)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="nope", keep=16), "unknown token pruning strategy"),
    (dict(strategy="random", keep=0), "keep must be >= 1"),
    (dict(strategy="random", keep=-3), "keep must be >= 1"),
    (dict(strategy="random", keep=65), "larger than the 64 patches"),
    (dict(strategy="random", keep=2.5), "keep must be an integer"),
    (dict(strategy="random", keep=True), "keep must be an integer"),
    (dict(strategy="random", token_prune_ratio=1.0), r"token_prune_ratio must be in \[0, 1\)"),
    (dict(strategy="random", token_prune_ratio=-0.1), r"token_prune_ratio must be in \[0, 1\)"),
    (dict(strategy="random", token_prune_ratio=float("nan")), "token_prune_ratio must be a number"),
    (dict(strategy="random", keep=16, token_prune_ratio=0.5), "not both"),
    (dict(strategy="random"), "needs a budget"),
    (dict(strategy="dual-priv", keep=16, layer=3), "layer 3 is outside the vision tower's 3 encoder layers"),
    (dict(strategy="dual-priv", keep=16, layer=-4), "layer -4 is outside"),
    (dict(strategy="dual-priv", keep=16, layer=1.5), "layer must be an integer"),
    (dict(strategy="random", keep=16, colour="red"), "does not take option"),
    (dict(strategy="random", keep=16, n_contextual=2), "does not take option"),
    (dict(strategy="dual-priv", keep=8, n_contextual=8), "n_contextual=8 must be in 0..7"),
    (dict(strategy="dual-priv", keep=8, n_contextual=-1), "n_contextual=-1 must be in"),
    (dict(strategy="pool", keep=13), "keep=13 must be rows x cols"),
    (dict(strategy="uniform", keep=11), "nearest valid budgets: 10 or 12"),
    (dict(strategy="none", keep=10), "feeds all 64 visual tokens"),
    (dict(strategy="dual-priv", keep=16, fusion_noise_std=-1.0), "fusion noise std must be"),
    (dict(strategy="random", keep=16, seed="a"), "seed must be"),
])
def test_bad_pruner_arguments_raise_a_clear_value_error(clip, kwargs, message):
    bundle, _ = clip
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=message):
        make_pruner(kwargs.pop("strategy"), bundle, **kwargs)


def test_hidden_states_from_another_model_are_refused(clip, siglip):
    bundle, hidden = clip
    pruner = make_pruner("dual-priv", bundle, keep=16)
    with pytest.raises(ValueError, match="expected 4 hidden states"):
        pruner(hidden[:-1])
    with pytest.raises(ValueError, match=r"hidden states must be \[batch, 65, 64\]"):
        pruner(siglip[1])
    with pytest.raises(ValueError, match="tuple of tensors"):
        pruner(hidden[0])


# ------------------------------------------------------------------------------------------------ fusion noise

def test_fusion_noise_lands_on_contextual_slots_only(clip):
    bundle, hidden = clip
    pruner = make_pruner("dual-priv", bundle, keep=16, n_contextual=4, fusion_noise_std=0.5)
    out = pruner(hidden)
    noise = fusion_noise(out, 0.5, torch.Generator().manual_seed(0))
    assert noise.shape == out.features.shape
    other = torch.ones(16, dtype=torch.bool)
    other[out.contextual_slots] = False
    assert torch.count_nonzero(noise[:, other]) == 0 and bool((noise[:, out.contextual_slots] != 0).all())
    assert not torch.equal(noise[0], noise[1])  # independent per example
    same = pruner.fusion_noise(4, torch.Generator().manual_seed(0))
    assert torch.equal(noise, same)  # the pruner's own std and slots give the same draw
    big = pruner.fusion_noise(4000, torch.Generator().manual_seed(1))[:, out.contextual_slots]
    assert abs(big.std().item() - 0.5) < 0.01 and abs(big.mean().item()) < 0.01
    assert torch.count_nonzero(fusion_noise(out, 0.0)) == 0
    with pytest.raises(ValueError, match="contextual_slots"):
        fusion_noise((2, 16, 64), 0.5)
    with pytest.raises(ValueError, match="no fusion noise std"):
        make_pruner("dual-priv", bundle, keep=16).fusion_noise(2)


def test_matched_fusion_sigma_is_the_per_coordinate_std_of_the_averaged_dp_noise():
    assert math.isclose(matched_fusion_sigma(1.1, 1.0, 128), 1.1 * 1.0 / 128)
    assert math.isclose(matched_fusion_sigma(2.0, 0.5, 64, feature_scale=3.0), 3.0 * 2.0 * 0.5 / 64)
    for bad in (dict(noise_multiplier=-1, max_grad_norm=1, expected_batch_size=8),
                dict(noise_multiplier=1, max_grad_norm=0, expected_batch_size=8),
                dict(noise_multiplier=1, max_grad_norm=1, expected_batch_size=0),
                dict(noise_multiplier=float("inf"), max_grad_norm=1, expected_batch_size=8)):
        with pytest.raises(ValueError):
            matched_fusion_sigma(**bad)


# ------------------------------------------------------------------------------------------------ training

@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # inputs (frozen features) need no grad
def test_pruned_model_trains_and_gives_per_example_gradients_under_opacus():
    from opacus import GradSampleModule

    bundle = build_model("tiny", seed=0)
    apply_trainable(bundle, "lora", lora_rank=4)
    records = make_vqa("parity", "private", image_size=32, limit=3).records
    pixels = preprocess_images([r.image for r in records], 32, bundle.image_mean, bundle.image_std)
    pruner = make_pruner("dual-priv", bundle, keep=16, fusion_noise_std=0.1)
    out = pruner(tower_hidden_states(bundle, pixels))
    collator = Collator(bundle.tokenizer, n_visual_tokens=pruner.n_out, image_token_id=bundle.image_token_id,
                        prompt_template=bundle.prompt_template)
    batch = collator(records)
    noise = pruner.fusion_noise(3, torch.Generator().manual_seed(0))
    lm = LlavaLM(bundle).bind_collator(collator).train()
    loss = per_example_loss(lm(out.features, batch["input_ids"], batch["attention_mask"], fusion_noise=noise),
                            batch["labels"])
    assert loss.shape == (3,) and bool(torch.isfinite(loss).all())
    loss.sum().backward()
    trainable = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any(n.startswith("projector") for n in trainable)
    for name, p in trainable.items():
        if "lora_B" in name or name.startswith("projector"):  # lora_A's grad is 0 while lora_B starts at 0
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    expected = {n: p.grad.clone() for n, p in trainable.items()}
    single = {}
    for i in range(3):  # example i alone: its gradient, to compare with Opacus's per-sample gradient
        lm.zero_grad()
        per_example_loss(lm(out.features[i:i + 1], batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1],
                            fusion_noise=noise[i:i + 1]), batch["labels"][i:i + 1]).sum().backward()
        single[i] = {n: p.grad.clone() for n, p in trainable.items()}
    lm.zero_grad()

    gsm = GradSampleModule(lm, loss_reduction="sum")
    loss = per_example_loss(gsm(out.features, batch["input_ids"], batch["attention_mask"], fusion_noise=noise),
                            batch["labels"])
    loss.sum().backward()
    for name, p in gsm._module.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad_sample is not None and p.grad_sample.shape == (3, *p.shape), name
        assert torch.allclose(p.grad_sample.sum(0), expected[name], atol=1e-5), name
        for i in range(3):
            assert torch.allclose(p.grad_sample[i], single[i][name], atol=1e-5), name
