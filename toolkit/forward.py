"""The toolkit's own LLaVA forward: frozen vision tower -> (pruned) visual tokens -> projector -> LLM.

Why not ``LlavaForConditionalGeneration.forward``: it scatters image features into placeholder positions with a
data-dependent count check, which breaks ``torch.func.vmap`` and fixes the token count to the unpruned one.
Here the collator puts the image block at the same position in every row, so the features are concatenated
in place. With nothing pruned the logits equal the HF forward's (tested).

Example::

    >>> import torch
    >>> from toolkit.models import build_model
    >>> from toolkit.forward import LlavaLM, tower_hidden_states, select_features
    >>> bundle = build_model("tiny")
    >>> hidden = tower_hidden_states(bundle, torch.zeros(1, 3, 32, 32))
    >>> select_features(bundle, hidden).shape
    torch.Size([1, 64, 64])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def tower_hidden_states(bundle, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the frozen vision tower; return every hidden state (embeddings output first)."""
    tower = bundle.vision_tower
    param = next(tower.parameters())
    out = tower(pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True, return_dict=True)
    return tuple(out.hidden_states)


def select_features(bundle, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The features LLaVA would feed its projector: the ``vision_feature_layer`` state, [CLS] dropped if
    ``vision_feature_select_strategy == "default"``."""
    feats = hidden_states[bundle.vision_feature_layer]
    if bundle.config.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return feats


class LlavaLM(nn.Module):
    """The trainable half of LLaVA (projector + language model + LM head) taking visual features directly.

    It holds references to the bundle's own submodules (no copies), so training it trains the bundle's model.
    This is the module handed to Opacus: every trainable parameter of the run lives under it.
    """

    def __init__(self, bundle):
        super().__init__()
        self.projector = bundle.model.model.multi_modal_projector
        self.language_model = bundle.model.model.language_model
        self.lm_head = bundle.model.lm_head
        self.image_token_id = bundle.image_token_id
        self.image_start = None  # set by bind_collator; the image block's first position

    def bind_collator(self, collator) -> "LlavaLM":
        self.image_start = collator.image_start
        return self

    def check_placeholders(self, image_features: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Raise if the placeholders in ``input_ids`` do not match the visual tokens about to be fed."""
        n_visual = image_features.shape[1]
        n_placeholders = (input_ids == self.image_token_id).sum(dim=1)
        block = input_ids[:, self.image_start:self.image_start + n_visual]
        if not bool((n_placeholders == n_visual).all()) or not bool((block == self.image_token_id).all()):
            raise ValueError(
                f"image placeholders per row {n_placeholders.tolist()} do not match the {n_visual} visual tokens "
                f"fed at position {self.image_start}: build the collator with n_visual_tokens={n_visual}"
            )

    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                fusion_noise: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``[B, T, V]``, or ``[B, K, V]`` at ``positions`` (``[B, K]`` indices into T, e.g. from
        :func:`answer_positions`): the LM head then runs on those K hidden states only, so the logits cost
        ``B·K·V`` instead of ``B·T·V`` (T includes every visual token). The gathered hidden states keep the batch
        dimension first, so Opacus' per-example gradient of the LM head stays exact (tested).

        ``fusion_noise`` (optional) is added to the projected-from features before the projector, per example
        (it is the heuristic fusion noise of mechanism 1). Inputs of another dtype are cast to the projector's and
        the head's (bf16 features into an fp32 projector: :func:`toolkit.precision.cast_for_training`)."""
        embeds = self.embed(image_features, input_ids, fusion_noise)
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if positions is not None:
            index = positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            hidden = hidden.gather(1, index)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))  # a trained fp32 head beside a bf16 LM

    def embed(self, image_features: torch.Tensor, input_ids: torch.Tensor,
              fusion_noise: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's input embeddings: text embeddings with the projected visual tokens in the image block."""
        if self.image_start is None:
            raise RuntimeError("call bind_collator(collator) before forward so the image block position is known")
        if fusion_noise is not None:
            image_features = image_features + fusion_noise
        image_embeds = self.projector(image_features.to(self.projector_dtype))
        text_embeds = self.language_model.get_input_embeddings()(input_ids)
        n_visual = image_embeds.shape[1]
        start = self.image_start
        return torch.cat([text_embeds[:, :start], image_embeds.to(text_embeds.dtype),
                          text_embeds[:, start + n_visual:]], dim=1)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loss is: ``(positions [B, K], targets [B, K])``.

    Position ``t`` predicts token ``t + 1``, so the positions are those ``t`` with ``labels[:, t + 1] != -100``
    (the answer tokens), in order, and ``targets[b, k] = labels[b, positions[b, k] + 1]``. Rows with fewer than
    ``K = max answer length`` targets are padded with a position whose target is ``-100`` (ignored by the loss,
    so its backprop is zero and it adds nothing to any per-example gradient).
    """
    shifted = labels[:, 1:]
    valid = shifted != -100
    k = max(1, int(valid.sum(dim=1).max())) if labels.shape[0] else 1
    # stable sort puts each row's answer positions first, in their original order
    positions = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :k]
    return positions, shifted.gather(1, positions)


def per_example_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, K, V]`` against ``targets [B, K]`` (``-100`` ignored) per example:
    ``L_i = Σ_k CE_ik / #{k : target_ik ≠ -100}``, shape ``[B]``."""
    # At least fp32 (bf16 logits lose the loss), never a downcast (float64 gradient checks).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's answer tokens from full logits ``[B, T, V]``: ``[B]``."""
    return per_example_token_loss(logits[:, :-1], labels[:, 1:])


def answer_losses(module: nn.Module, image_features: torch.Tensor, batch: dict,
                  fusion_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example losses ``[B]`` with logits computed only where the answer is (see :func:`answer_positions`);
    equal to ``per_example_loss(module(...), labels)`` (tested) at a fraction of the logits' memory.
    ``module`` is a :class:`LlavaLM` or Opacus' wrapper of one."""
    positions, targets = answer_positions(batch["labels"])
    logits = module(image_features, batch["input_ids"], batch["attention_mask"], fusion_noise=fusion_noise,
                    positions=positions)
    return per_example_token_loss(logits, targets.to(logits.device))


@torch.no_grad()
def rank_candidates(lm: LlavaLM, image_features: torch.Tensor, batch: dict, candidate_ids: list[list[int]]) -> torch.Tensor:
    """Index of the most likely candidate answer for each example: ``[B]``.

    Each candidate is scored by the summed log-probability of its tokens after the prompt (a closed-set
    ranking, so accuracy does not depend on free generation). Single-token candidates take one forward.
    """
    input_ids, mask, prompt_lengths = batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"]
    device = image_features.device
    input_ids, mask, prompt_lengths = input_ids.to(device), mask.to(device), prompt_lengths.to(device)
    rows = torch.arange(input_ids.shape[0], device=device)
    if all(len(c) == 1 for c in candidate_ids):
        # the LM head only at each row's last prompt position (not over every visual token)
        last = lm(image_features, input_ids, mask, positions=(prompt_lengths - 1).unsqueeze(1))[:, 0].float()
        return last[:, torch.tensor([c[0] for c in candidate_ids], device=device)].argmax(dim=1)
    scores = []
    for cand in candidate_ids:
        ids = input_ids.clone()
        width = int(prompt_lengths.max()) + len(cand)
        ids = torch.nn.functional.pad(ids, (0, max(0, width - ids.shape[1])), value=0)[:, :width]
        am = torch.zeros_like(ids)
        for i, p in enumerate(prompt_lengths.tolist()):
            ids[i, p:p + len(cand)] = torch.tensor(cand, device=device)
            am[i, : p + len(cand)] = 1
        logp = lm(image_features, ids, am).float().log_softmax(-1)
        total = torch.zeros(ids.shape[0], device=device)
        for j, tok in enumerate(cand):
            total += logp[rows, prompt_lengths - 1 + j, tok]
        scores.append(total)
    return torch.stack(scores, dim=1).argmax(dim=1)


@torch.no_grad()
def generate_greedy(lm: LlavaLM, image_features: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None) -> list[list[int]]:
    """Greedy decoding through the toolkit's forward, with a KV cache: the same (pruned) visual tokens as in
    training, placed in the same image block. Every row of ``prompt_ids`` ``[B, P]`` must be a full prompt of
    the same length (no padding: group prompts by length). Returns each row's new tokens, EOS excluded.

    Example::

        >>> import torch
        >>> from toolkit.models import build_model
        >>> from toolkit.data import Collator
        >>> from toolkit.forward import LlavaLM, generate_greedy
        >>> bundle = build_model("tiny")
        >>> collator = Collator(bundle.tokenizer, 4, bundle.image_token_id, bundle.prompt_template)
        >>> lm = LlavaLM(bundle).bind_collator(collator).eval()
        >>> prompt = torch.tensor([collator.prompt_ids("what colour ?")])
        >>> len(generate_greedy(lm, torch.zeros(1, 4, 64), prompt, 3, None)[0])
        3
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = image_features.device
    prompt_ids = prompt_ids.to(device)
    out = lm.language_model(inputs_embeds=lm.embed(image_features, prompt_ids), use_cache=True)
    past, rows = out.past_key_values, prompt_ids.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        next_ids = lm.lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1)
        tokens.append(next_ids)
        if eos_token_id is not None:
            finished |= next_ids == eos_token_id
        if bool(finished.all()) or len(tokens) == max_new_tokens:
            break
        step = lm.language_model.get_input_embeddings()(next_ids[:, None])
        out = lm.language_model(inputs_embeds=step, past_key_values=past, use_cache=True)
        past = out.past_key_values
    generated = torch.stack(tokens, dim=1).tolist()
    if eos_token_id is not None:
        generated = [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in generated]
    return generated
