"""Differential privacy for the toolkit: accounting, Poisson sampling, mechanism 2, and the DP engine (on Opacus).

* :mod:`.accounting`: ``calibrate_noise`` (σ for a target (ε, δ)), accountants, save/restore.
* :mod:`.sampling`: ``PoissonSampler`` (private runs), ``FixedBatchSampler`` (non-private), ``check_sampling``.
* :mod:`.update_pruning`: mechanism 2 — mask the smallest coordinates of the *noisy* gradient.
* :mod:`.update_masks`: where the update goes: the paper's post-noise mask, or masks fixed before the noise.
* :mod:`.engine`: ``make_private(module, optimizer, ...) -> DPEngine`` with ``step`` / ``empty_step`` /
  ``epsilon`` / ``state_dict``.

Example (a private step on the tiny LLaVA)::

    >>> import torch
    >>> from toolkit.models import build_model, apply_trainable
    >>> from toolkit.data import make_vqa, Collator, preprocess_images
    >>> from toolkit.forward import LlavaLM, tower_hidden_states, select_features, per_example_loss
    >>> from toolkit.privacy import calibrate_noise, make_private, PoissonSampler, sample_rate_for
    >>> bundle = build_model("tiny"); _ = apply_trainable(bundle, "lora")
    >>> data = make_vqa("parity", "private", image_size=32, limit=16)
    >>> collator = Collator(bundle.tokenizer, bundle.n_patches, bundle.image_token_id, bundle.prompt_template)
    >>> q = sample_rate_for(expected_batch_size=4, n_records=len(data))
    >>> sigma = calibrate_noise(8.0, 1e-5, sample_rate=q, steps=4)
    >>> lm = LlavaLM(bundle).bind_collator(collator)
    >>> engine = make_private(lm, torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=1e-3),
    ...                       noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=4, sample_rate=q,
    ...                       grad_prune_ratio=0.2, noise_seed=0)
    >>> for idx in PoissonSampler(len(data), q, seed=0, steps=4):
    ...     if len(idx) == 0:
    ...         engine.empty_step(); continue
    ...     records = [data[i] for i in idx.tolist()]
    ...     batch = collator(records)
    ...     pixels = preprocess_images([r.image for r in records], bundle.image_size)
    ...     feats = select_features(bundle, tower_hidden_states(bundle, pixels))
    ...     logits = engine.module(feats, batch["input_ids"], batch["attention_mask"])
    ...     _ = engine.step(per_example_loss(logits, batch["labels"]))
    >>> engine.steps_taken, engine.epsilon(1e-5) <= 8.0
    (4, True)
"""
from .accounting import (
    ACCOUNTANTS,
    PrivacyBudgetError,
    accountant_state,
    calibrate_continuation,
    calibrate_noise,
    epsilon_for,
    epsilon_spent,
    history_epsilon,
    make_accountant,
    restore_accountant,
)
from .engine import GRAD_SAMPLE_MODES, DPEngine, PrivateTrainer, make_private
from .sampling import (
    SAMPLINGS,
    FixedBatchSampler,
    FixedBatchesInPrivateModeError,
    PoissonSampler,
    check_sampling,
    sample_rate_for,
)
from .update_masks import UPDATE_MASKS, PreNoiseMask, make_pre_noise_mask, magnitude_mask
from .update_pruning import (
    PRUNE_SCOPES,
    PRUNED_STATES,
    UpdatePruningDPOptimizer,
    UpdatePruningDPOptimizerFastGradientClipping,
    noisy_gradient_mask,
)

__all__ = [
    "ACCOUNTANTS", "PrivacyBudgetError", "accountant_state", "calibrate_continuation", "calibrate_noise", "epsilon_for", "epsilon_spent", "history_epsilon",
    "make_accountant", "restore_accountant",
    "GRAD_SAMPLE_MODES", "DPEngine", "PrivateTrainer", "make_private",
    "SAMPLINGS", "FixedBatchSampler", "FixedBatchesInPrivateModeError", "PoissonSampler", "check_sampling",
    "sample_rate_for",
    "PRUNE_SCOPES", "PRUNED_STATES", "UpdatePruningDPOptimizer", "UpdatePruningDPOptimizerFastGradientClipping",
    "noisy_gradient_mask", "UPDATE_MASKS", "PreNoiseMask", "make_pre_noise_mask", "magnitude_mask",
]
