"""LLaVA that feeds its language model the pruned visual tokens it was fine-tuned on (Dual-Priv token pruning).

Loaded by transformers' custom-architecture mechanism: this file sits in the model folder, ``config.json`` and
``processor_config.json`` name its classes in ``auto_map``, and ::

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

give a stock ``LlavaForConditionalGeneration`` whose image features are the pruned tokens (``generate`` and
everything else are the parent's), and a stock ``LlavaProcessor`` that writes one ``<image>`` placeholder per
pruned token. Without ``trust_remote_code`` the same folder loads as plain LLaVA, feeding every visual token.

The pruning (``config.dualpriv_token_pruning``) is computed from each image alone:

* score: the attention of vision encoder layer ``layer`` recomputed from its ``layer_norm1``, ``q_proj`` and
  ``k_proj`` on its input: the [CLS] row (``cls-attention``) or the mean attention each patch receives
  (``mean-attention``), averaged over heads;
* keep ``[CLS]`` (``with_cls``), the ``n_kept`` best-scored patches (ascending patch index, ties to the lower
  index), then ``n_contextual`` tokens fused from the rest: centres at a uniform stride, every other token joins
  its most cosine-similar centre, fused = centre + mean(members).

It imports torch and transformers only.
"""
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaProcessor
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

# transformers saves LLaVA weights under their legacy names and renames them on load for its own classes only:
# register the same renaming for these subclasses (the public registration API), so their weights load.
register_checkpoint_conversion_mapping("DualPrivLlavaForConditionalGeneration",
                                       get_checkpoint_conversion_mapping("llava"), overwrite=True)


def _attention_scores(layer, hidden, n_heads, kind, n_patches):
    """[B, n_patches] float32 scores from one encoder layer's attention on its input ``hidden`` [B, T, d]."""
    x = layer.layer_norm1(hidden)
    queries = layer.self_attn.q_proj(x[:, :1] if kind == "cls-attention" else x)
    keys = layer.self_attn.k_proj(x)
    batch, width = hidden.shape[0], hidden.shape[-1]
    head = width // n_heads

    def split(t):
        return t.reshape(batch, t.shape[1], n_heads, head).transpose(1, 2)

    probs = (split(queries).float() @ split(keys).float().transpose(-1, -2) * head ** -0.5).softmax(dim=-1)
    if kind == "cls-attention":
        return probs[:, :, 0, 1:].mean(dim=1)
    received = probs.mean(dim=(1, 2))
    return received[:, received.shape[-1] - n_patches:]


def _fuse(tokens, n_contextual):
    """``n_contextual`` tokens fused from ``tokens`` [R, d]: centre + mean of the members most similar to it."""
    n_remaining = tokens.shape[0]
    step = max(1, n_remaining // n_contextual)
    centres = torch.arange(0, n_remaining, step, device=tokens.device)[:n_contextual]
    is_centre = torch.zeros(n_remaining, dtype=torch.bool, device=tokens.device)
    is_centre[centres] = True
    members = tokens[~is_centre]
    unit = F.normalize(tokens.float(), dim=-1)
    cluster = (unit[~is_centre] @ unit[centres].T).argmax(dim=1)
    one_hot = F.one_hot(cluster, n_contextual).to(tokens.dtype)
    counts = one_hot.sum(dim=0).clamp(min=1)
    return tokens[centres] + (one_hot.T @ members) / counts[:, None]


def prune_visual_tokens(hidden_states, encoder_layers, settings, n_heads):
    """The pruned visual tokens [B, n_out, d] of a batch, each image on its own."""
    features = hidden_states[settings["feature_layer"]]
    offset = 1 if settings["has_cls"] else 0
    n_patches = features.shape[1] - offset
    scores = _attention_scores(encoder_layers[settings["layer"]], hidden_states[settings["layer"]], n_heads,
                               settings["score"], n_patches)
    rows = []
    for i in range(features.shape[0]):
        patches = features[i, offset:]
        order = torch.sort(scores[i], descending=True, stable=True).indices
        kept, rest = torch.sort(order[:settings["n_kept"]]).values, torch.sort(order[settings["n_kept"]:]).values
        parts = [features[i, :1]] if settings["with_cls"] else []
        parts.append(patches[kept])
        if settings["n_contextual"] > 0:
            parts.append(_fuse(patches[rest], settings["n_contextual"]).to(patches.dtype))
        rows.append(torch.cat(parts, dim=0))
    return torch.stack(rows)


class DualPrivLlavaModel(LlavaModel):
    """LLaVA's model whose image features are the pruned visual tokens, projected."""

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           image_sizes=None, **kwargs):
        settings = self.config.dualpriv_token_pruning
        tower = self.vision_tower
        outputs = tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIP/SigLIP vision model, or its inner one
        n_heads = self.config.vision_config.num_attention_heads
        with torch.no_grad():
            tokens = prune_visual_tokens(outputs.hidden_states, layers, settings, n_heads)
        outputs.pooler_output = list(self.multi_modal_projector(tokens))
        return outputs


class DualPrivLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` fed the pruned visual tokens (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = DualPrivLlavaModel(config)
        self.post_init()


class DualPrivLlavaProcessor(LlavaProcessor):
    """``LlavaProcessor`` writing ``num_image_tokens`` placeholders per image: one per pruned visual token."""

    def __init__(self, image_processor=None, tokenizer=None, patch_size=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", num_additional_image_tokens=0, num_image_tokens=None,
                 **kwargs):
        self.num_image_tokens = num_image_tokens
        super().__init__(image_processor, tokenizer, patch_size=patch_size,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs)

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        return self.image_token * int(self.num_image_tokens)
