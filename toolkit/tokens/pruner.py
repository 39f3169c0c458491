"""The pruner: resolves a budget once, then applies a registered strategy to every example of a batch alone.

Token layout fed to the LLM (identical for every example of a pruner, so the collator can be built once):

    [ [CLS] ]  patches kept as themselves (ascending patch index)  fused tokens (cluster order)
      cls_slot  kept_slots                                           contextual_slots

Which features: the tower's ``hidden_states[vision_feature_layer]`` (what LLaVA feeds its projector).
Which score: the attention of encoder layer ``layer`` (0-based), recomputed from that layer's modules applied
to its input ``hidden_states[layer]``. Default ``layer``: the encoder layer whose *output* LLaVA takes its
features from (``vision_feature_layer = -2`` -> layer ``n_layers - 2``), VisionZip's choice; the paper is silent.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from toolkit.forward import tower_hidden_states
from toolkit.tokens.attention import cls_attention, encoder_layers, mean_received_attention
from toolkit.tokens.noise import _check_sigma, fusion_noise
from toolkit.tokens.registry import STRATEGIES, Budget, ExampleView, Selection, StrategySpec
import toolkit.tokens.strategies  # noqa: F401  (registers the built-in strategies)

GENERAL_OPTIONS = ("fusion_noise_std",)


@dataclass
class PruneOutput:
    """The pruned visual tokens of a batch and everything needed to draw or test them.

    Attributes:
        features: ``[B, n_out, d_vision]``, ready for ``LlavaLM(features, ...)``.
        kept_indices: ``[B, n_kept]`` long: per example, the patch indices (0..n_in-1) that survive as
            themselves, ascending (the dominant patches for ``dual-priv``); they sit at ``kept_slots``.
        scores: ``[B, n_in]`` float32 attention scores of every patch, or None for strategies without a score.
        clusters: ``[B, n_in]`` long: per example and patch, -1 if the patch is kept as itself or dropped, else
            the index (0..n_fused-1) of the fused token it went into (a centre belongs to its own cluster).
            Fused token i sits at ``contextual_slots[i]``.
        centre_indices: ``[B, n_fused]`` long patch indices of the fusion centres (``[B, 0]`` if the strategy
            fuses without centres, e.g. ``pool``).
        contextual_slots: ``[n_fused]`` long positions within the n_out tokens holding fused tokens: where
            fusion noise goes.
        kept_slots: ``[n_kept]`` long positions of the kept patches. ``cls_slot``: position of [CLS] or None.
        n_in: patches the tower produced; ``n_out``: visual tokens fed to the LLM.
        grid: (rows, cols) of the patch grid (patch j at row j // cols, column j % cols).
        layer: the 0-based scoring layer, or None.
    """

    strategy: str
    features: torch.Tensor
    kept_indices: torch.Tensor
    scores: torch.Tensor | None
    clusters: torch.Tensor
    centre_indices: torch.Tensor
    contextual_slots: torch.Tensor
    kept_slots: torch.Tensor
    cls_slot: int | None
    n_in: int
    n_out: int
    grid: tuple[int, int]
    layer: int | None

    @property
    def batch_size(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_dropped(self) -> int:
        """Patches neither kept as themselves nor fused (the same for every example)."""
        return int(((self.clusters[0] < 0).sum() - self.kept_indices.shape[1]).item()) if self.batch_size else 0

    def example(self, index: int) -> "PruneOutput":
        """The same output restricted to example ``index`` (batch of one), e.g. for a figure."""
        if not -self.batch_size <= index < self.batch_size:
            raise ValueError(f"example index {index} is outside the batch of {self.batch_size}")
        pick = slice(index, index + 1) if index >= 0 else slice(self.batch_size + index, self.batch_size + index + 1)
        return PruneOutput(
            strategy=self.strategy, features=self.features[pick], kept_indices=self.kept_indices[pick],
            scores=None if self.scores is None else self.scores[pick], clusters=self.clusters[pick],
            centre_indices=self.centre_indices[pick], contextual_slots=self.contextual_slots,
            kept_slots=self.kept_slots, cls_slot=self.cls_slot, n_in=self.n_in, n_out=self.n_out, grid=self.grid,
            layer=self.layer,
        )

    def to_dict(self, index: int = 0) -> dict:
        """JSON-ready description of one example (lists, no tensors)."""
        one = self.example(index)
        rows, cols = self.grid
        kept = one.kept_indices[0].tolist()
        return dict(
            strategy=self.strategy, n_in=self.n_in, n_out=self.n_out, grid=[rows, cols], layer=self.layer,
            n_kept=len(kept), n_contextual=int(self.contextual_slots.numel()), n_dropped=one.n_dropped,
            cls_slot=self.cls_slot, kept_indices=kept, kept_slots=self.kept_slots.tolist(),
            contextual_slots=self.contextual_slots.tolist(), clusters=one.clusters[0].tolist(),
            centre_indices=one.centre_indices[0].tolist(),
            scores=None if one.scores is None else [float(s) for s in one.scores[0].tolist()],
            kept_per_row=[sum(1 for j in kept if j // cols == r) for r in range(rows)],
            kept_per_column=[sum(1 for j in kept if j % cols == c) for c in range(cols)],
        )


def resolve_keep(strategy: str, n_patches: int, keep=None, token_prune_ratio=None) -> int | None:
    """The number of visual tokens to feed, from exactly one of ``keep`` or ``token_prune_ratio``.

    ``token_prune_ratio`` is the fraction of the ``n_patches`` patches removed:
    keep = n_patches - round(token_prune_ratio * n_patches) (Python's round: half to even), at least 1.
    Returns None when neither is given (only valid for ``none``).
    """
    if keep is not None and token_prune_ratio is not None:
        raise ValueError("give either keep or token_prune_ratio, not both")
    if keep is not None:
        keep = _integer(keep, f"keep must be an integer number of visual tokens, got {keep!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 visual token, got {keep}")
        if keep > n_patches:
            raise ValueError(f"keep={keep} is larger than the {n_patches} patches this vision tower produces")
        return keep
    if token_prune_ratio is not None:
        ratio = token_prune_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise ValueError(f"token_prune_ratio must be a number in [0, 1), got {ratio!r}")
        if not 0 <= ratio < 1:
            raise ValueError(f"token_prune_ratio must be in [0, 1) (the fraction of patches removed), got {ratio}")
        return max(1, n_patches - round(ratio * n_patches))
    if strategy == "none":
        return None
    raise ValueError(f"strategy {strategy!r} needs a budget: give keep (visual tokens fed) or token_prune_ratio")


def _integer(value, message: str) -> int:
    """``value`` as an int (numpy integers too), or ValueError(message); bools are refused."""
    if isinstance(value, bool):
        raise ValueError(message)
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(message) from None


def resolve_layer(layer, n_layers: int, default: int) -> int:
    """0-based encoder layer; negative counts from the end (-1 = last). Out of range -> ValueError."""
    if layer is None:
        return default
    layer = _integer(layer, f"layer must be an integer encoder layer index, got {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the vision tower's {n_layers} encoder layers "
                         f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
    return layer % n_layers


def default_scoring_layer(vision_feature_layer: int, n_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]`` (index 0 = embeddings)."""
    return max(0, vision_feature_layer % (n_layers + 1) - 1)


class TokenPruner:
    """Applies one strategy with a fixed budget to each example of a batch alone.

    Call it with the tuple from :func:`toolkit.forward.tower_hidden_states`. It keeps no state between calls
    (only references to the frozen scoring layer), and runs under ``torch.no_grad`` (the tower is frozen).
    """

    def __init__(self, spec: StrategySpec, bundle, budget: Budget, layer: int | None, fusion_noise_std: float | None):
        self.spec = spec
        self.strategy = spec.name
        self.budget = budget
        self.n_in = budget.n_patches
        self.grid = budget.grid
        self.layer = layer
        self.fusion_noise_std = fusion_noise_std
        vision_config = bundle.config.vision_config
        self.n_layers = int(vision_config.num_hidden_layers)
        self.hidden_size = int(vision_config.hidden_size)
        self.n_heads = int(vision_config.num_attention_heads)
        self.has_cls = bool(bundle.has_cls)
        self.cls_offset = 1 if self.has_cls else 0
        self.feature_layer = bundle.vision_feature_layer
        self._scoring_layer = encoder_layers(bundle.vision_tower)[layer] if spec.score else None
        self._set_layout(bundle)

    def _set_layout(self, bundle) -> None:
        """Learn the (constant) slot layout by running the strategy once on a blank example."""
        param = next(bundle.vision_tower.parameters())
        blank = torch.zeros(self.n_in, self.hidden_size, dtype=param.dtype, device=param.device)
        view = ExampleView(patches=blank, cls=blank[0] if self.has_cls else None,
                           scores=torch.zeros(self.n_in, device=param.device) if self.spec.score else None)
        selection = self.spec.select(view, self.budget)
        self.with_cls = selection.with_cls
        self.n_kept = int(selection.kept.numel())
        self.n_contextual = int(selection.fused.shape[0])
        self.n_out = int(self.with_cls) + self.n_kept + self.n_contextual
        expected = self.budget.keep
        if self.n_out != expected:
            raise RuntimeError(f"strategy {self.strategy!r} produced {self.n_out} tokens for a budget of {expected}")
        self.cls_slot = 0 if self.with_cls else None
        start = int(self.with_cls)
        self.kept_slots = torch.arange(start, start + self.n_kept)
        self.contextual_slots = torch.arange(start + self.n_kept, self.n_out)

    def __repr__(self) -> str:
        return (f"TokenPruner(strategy={self.strategy!r}, n_in={self.n_in}, n_out={self.n_out}, "
                f"n_kept={self.n_kept}, n_contextual={self.n_contextual}, cls={self.with_cls}, layer={self.layer})")

    def describe(self) -> dict:
        return dict(strategy=self.strategy, n_in=self.n_in, n_out=self.n_out, n_kept=self.n_kept,
                    n_contextual=self.n_contextual, cls=self.with_cls, layer=self.layer,
                    feature_layer=self.feature_layer, options=dict(self.budget.options),
                    fusion_noise_std=self.fusion_noise_std)

    # ------------------------------------------------------------------ applying
    def _check(self, hidden_states) -> tuple[torch.Tensor, ...]:
        if not isinstance(hidden_states, (tuple, list)) or not all(isinstance(h, torch.Tensor) for h in hidden_states):
            raise ValueError("hidden_states must be the tuple of tensors from toolkit.forward.tower_hidden_states")
        if len(hidden_states) != self.n_layers + 1:
            raise ValueError(f"expected {self.n_layers + 1} hidden states (embeddings + {self.n_layers} layers), "
                             f"got {len(hidden_states)}: were they computed by this model's tower?")
        tokens = self.n_in + self.cls_offset
        for h in hidden_states:
            if h.dim() != 3 or h.shape[1] != tokens or h.shape[2] != self.hidden_size:
                raise ValueError(f"hidden states must be [batch, {tokens}, {self.hidden_size}], got {list(h.shape)}")
        return tuple(hidden_states)

    def _score(self, layer_input: torch.Tensor) -> torch.Tensor:
        if self.spec.score == "cls-attention":
            return cls_attention(self._scoring_layer, layer_input, self.n_heads)
        return mean_received_attention(self._scoring_layer, layer_input, self.n_heads, self.n_in)

    def _select_one(self, features: torch.Tensor, layer_input: torch.Tensor | None,
                    seed: int | None) -> tuple[Selection, torch.Tensor | None]:
        view = ExampleView(
            patches=features[self.cls_offset:], cls=features[0] if self.has_cls else None,
            scores=self._score(layer_input) if self.spec.score else None, seed=seed,
        )
        selection = self.spec.select(view, self.budget)
        if (selection.with_cls != self.with_cls or selection.kept.numel() != self.n_kept
                or selection.fused.shape[0] != self.n_contextual):
            raise RuntimeError(f"strategy {self.strategy!r} changed its token layout between examples")
        return selection, view.scores

    def __call__(self, hidden_states, example_seeds=None) -> PruneOutput:
        """Prune a batch: ``hidden_states`` from ``tower_hidden_states``; ``example_seeds`` (optional, one int
        per example) seeds strategies that draw at random instead of the hash of the example's features."""
        hidden_states = self._check(hidden_states)
        features = hidden_states[self.feature_layer]
        batch = features.shape[0]
        if example_seeds is not None and len(example_seeds) != batch:
            raise ValueError(f"example_seeds has {len(example_seeds)} entries for a batch of {batch}")
        layer_inputs = hidden_states[self.layer] if self.spec.score else None
        rows, selections, scores = [], [], []
        with torch.no_grad():
            for i in range(batch):  # each example alone: nothing is computed across the batch
                one = features[i]
                layer_input = None if layer_inputs is None else layer_inputs[i]
                seed = None if example_seeds is None else int(example_seeds[i])
                selection, score = self._select_one(one, layer_input, seed)
                cls_part = [one[:1]] if selection.with_cls else []
                parts = cls_part + [one[self.cls_offset:][selection.kept], selection.fused.to(one.dtype)]
                rows.append(torch.cat(parts, dim=0))
                selections.append(selection)
                scores.append(score)
        device = features.device
        return PruneOutput(
            strategy=self.strategy,
            features=torch.stack(rows) if rows else features.new_zeros((0, self.n_out, self.hidden_size)),
            kept_indices=_stack([s.kept for s in selections], (0, self.n_kept), device),
            scores=_stack(scores, (0, self.n_in), device, torch.float32) if self.spec.score else None,
            clusters=_stack([s.clusters for s in selections], (0, self.n_in), device),
            centre_indices=_stack([s.centres for s in selections], (0, 0), device),
            contextual_slots=self.contextual_slots.to(device), kept_slots=self.kept_slots.to(device),
            cls_slot=self.cls_slot, n_in=self.n_in, n_out=self.n_out, grid=self.grid, layer=self.layer,
        )

    def from_pixels(self, bundle, pixel_values: torch.Tensor, example_seeds=None) -> PruneOutput:
        """Run the frozen tower on preprocessed ``pixel_values`` [B, 3, H, W], then prune."""
        return self(tower_hidden_states(bundle, pixel_values), example_seeds=example_seeds)

    def fusion_noise(self, batch_size: int, generator: torch.Generator | None = None, sigma: float | None = None,
                     device=None, dtype=None) -> torch.Tensor:
        """Heuristic per-example noise ``[B, n_out, d]`` on the contextual slots only (std: ``sigma`` or the
        pruner's ``fusion_noise_std``). Outside the DP guarantee: see :mod:`toolkit.tokens.noise`."""
        sigma = self.fusion_noise_std if sigma is None else sigma
        if sigma is None:
            raise ValueError("no fusion noise std: pass sigma or make the pruner with fusion_noise_std")
        return fusion_noise((batch_size, self.n_out, self.hidden_size), sigma, generator,
                            contextual_slots=self.contextual_slots, device=device, dtype=dtype)


def _stack(tensors: list, empty_shape: tuple[int, int], device, dtype=torch.long) -> torch.Tensor:
    if tensors:
        return torch.stack(tensors)
    return torch.zeros(empty_shape, dtype=dtype, device=device)


def make_pruner(strategy: str, bundle, keep: int | None = None, token_prune_ratio: float | None = None,
                layer: int | None = None, **options) -> TokenPruner:
    """Make a :class:`TokenPruner` for ``bundle``'s vision tower.

    Args:
        strategy: a name in ``STRATEGIES`` (``dual-priv``, ``mean-attention``, ``random``, ``uniform``, ``pool``,
            ``divprune``, ``none``).
        keep: visual tokens fed to the LLM (= ``pruner.n_out``), 1..n_patches. For ``dual-priv`` it counts
            1 [CLS] + K dominant + k contextual.
        token_prune_ratio: alternatively, the fraction of patches removed, in [0, 1):
            keep = n_patches - round(ratio * n_patches) (at least 1).
        layer: 0-based encoder layer whose attention scores the patches (negative: from the end). Default:
            the layer whose output LLaVA takes features from (``n_layers - 2`` for ``vision_feature_layer=-2``).
            Validated for every strategy, used only by those with an attention score (``pruner.layer`` is
            None otherwise).
        options: ``n_contextual`` (fusing strategies; ``dual-priv`` default max(1, keep // 8) when keep >= 3,
            ``mean-attention`` default 0), ``seed`` (``random``), ``fusion_noise_std`` (σ_fuse for
            :meth:`TokenPruner.fusion_noise`; a heuristic outside the DP guarantee).

    Raises:
        ValueError: unknown strategy or option, bad/missing/too large budget, layer outside the tower,
            ``dual-priv`` on a tower without [CLS], a grid budget that does not factor.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown token pruning strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    spec = STRATEGIES[strategy]
    allowed = set(spec.options) | set(GENERAL_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"strategy {strategy!r} does not take option(s) {unknown}; it takes {sorted(allowed)}")
    if spec.needs_cls and not bundle.has_cls:
        tower = getattr(bundle.config.vision_config, "model_type", "this")
        raise ValueError(f"strategy {strategy!r} scores patches by the [CLS] attention row, but the {tower} vision "
                         "tower has no [CLS] token; use 'mean-attention' (attention received) instead")
    vfl = bundle.config.vision_feature_layer
    if not isinstance(vfl, int):
        raise ValueError(f"vision_feature_layer {vfl!r} (several layers) is not supported by token pruning")
    n_layers = int(bundle.config.vision_config.num_hidden_layers)
    resolved_layer = resolve_layer(layer, n_layers, default_scoring_layer(vfl, n_layers))
    n_patches = bundle.n_patches
    hf_feeds_cls = bool(bundle.has_cls) and bundle.config.vision_feature_select_strategy == "full"
    keep = resolve_keep(strategy, n_patches, keep, token_prune_ratio)
    if spec.keeps_all:
        n_all = n_patches + int(hf_feeds_cls)
        if keep is not None and keep != n_all:
            raise ValueError(f"strategy 'none' feeds all {n_all} visual tokens; got a budget of {keep}")
        keep = n_all
    n_contextual = _resolve_contextual(spec, keep, options.pop("n_contextual", None))
    fusion_noise_std = options.pop("fusion_noise_std", None)
    if fusion_noise_std is not None:
        fusion_noise_std = _check_sigma(fusion_noise_std)
    if "seed" in options:
        seed = options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
            raise ValueError(f"seed must be a 64-bit integer, got {seed!r}")
    budget = Budget(keep=keep, n_patches=n_patches, grid=bundle.grid, n_contextual=n_contextual,
                    hf_feeds_cls=hf_feeds_cls, options=dict(options))
    return TokenPruner(spec, bundle, budget, resolved_layer if spec.score else None, fusion_noise_std)


def _resolve_contextual(spec: StrategySpec, keep: int, n_contextual) -> int:
    if spec.default_contextual is None:
        return 0
    if n_contextual is None:
        return spec.default_contextual(keep)
    if isinstance(n_contextual, bool):
        raise ValueError(f"n_contextual must be an integer, got {n_contextual!r}")
    try:
        n_contextual = operator.index(n_contextual)
    except TypeError:
        raise ValueError(f"n_contextual must be an integer, got {n_contextual!r}") from None
    reserved = 1 if spec.needs_cls else 0  # dual-priv spends one token on [CLS]
    if not 0 <= n_contextual <= keep - reserved:
        raise ValueError(f"n_contextual={n_contextual} must be in 0..{keep - reserved} for strategy {spec.name!r} "
                         f"with keep={keep}" + (" (one token is [CLS])" if reserved else ""))
    return n_contextual
