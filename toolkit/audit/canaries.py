"""The audit's canaries: noise images with one of 19 answers, the secret membership coins, and each canary's
loss under a model (see :mod:`toolkit.audit`)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from toolkit.config import TrainConfig
from toolkit.data import Collator, VQARecord
from toolkit.features import encode_records, make_pruner_for
from toolkit.forward import LlavaLM, per_example_loss
from toolkit.validation import check_int



# Answers of the canaries: 19 single-token number words (in the tiny presets' vocabulary and in real tokenizers).
CANARY_ANSWERS = tuple(str(i) for i in range(19))



# ------------------------------------------------------------------------------------------------ canaries

def make_canaries(m: int, image_size: int, question: str, rng: np.random.Generator,
                  answers: tuple[str, ...] = CANARY_ANSWERS) -> list[VQARecord]:
    """``m`` records, each a uniform-noise RGB image with ``question`` and an answer drawn uniformly from
    ``answers`` (see the module docstring for why this canary type)."""
    m = check_int("m (canaries)", m, minimum=2)
    if len(answers) < 2:
        raise ValueError(f"canaries need at least two possible answers, got {answers!r}")
    records = []
    for j in range(m):
        pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        answer = str(answers[int(rng.integers(len(answers)))])
        records.append(VQARecord(f"canary-{j}", Image.fromarray(pixels, mode="RGB"), question, answer,
                                 (f"canary-{j}",)))
    return records


def membership_coins(rng: np.random.Generator, canaries: list[VQARecord]) -> np.ndarray:
    """The secret coins ``S_i``: canary ``i`` joins the training set iff ``True``; fair, independent of each other
    and of the canaries themselves (their images and answers), drawn after them."""
    return rng.random(len(canaries)) < 0.5


def check_answers_known(tokenizer, answers) -> None:
    """Refuse answers the tokenizer cannot spell: they would all become ``<unk>`` and the audit would be blind."""
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = [a for a in answers
               if unk is not None and unk in tokenizer(" " + a, add_special_tokens=False)["input_ids"]]
    if unknown:
        raise ValueError(f"canary answers {unknown[:5]} are unknown to the tokenizer (they would all read as "
                         "<unk>); pass answers it can spell")


class _Scorer:
    """Per-canary loss under a model: the canaries' visual tokens are computed once (the tower is frozen) and
    reused for the starting and the trained model, so both see exactly the same inputs."""

    def __init__(self, bundle, config: TrainConfig, canaries: list[VQARecord], batch_size: int = 128):
        pruner = make_pruner_for(bundle, config)
        self.features = encode_records(bundle, pruner, canaries)
        self.collator = Collator(bundle.tokenizer, pruner.n_out, bundle.image_token_id, bundle.prompt_template)
        self.canaries, self.batch_size = canaries, batch_size

    @torch.no_grad()
    def __call__(self, bundle) -> np.ndarray:
        lm = LlavaLM(bundle).bind_collator(self.collator)
        was_training = lm.training
        lm.eval()
        device = next(lm.parameters()).device
        losses = []
        for start in range(0, len(self.canaries), self.batch_size):
            batch = self.collator(self.canaries[start:start + self.batch_size])
            features = self.features[start:start + self.batch_size].to(device)
            logits = lm(features, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            losses.append(per_example_loss(logits, batch["labels"].to(device)).float().cpu())
        lm.train(was_training)
        return torch.cat(losses).numpy().astype(float)


def canary_losses(bundle, config: TrainConfig, canaries: list[VQARecord]) -> np.ndarray:
    """Per-canary loss (mean cross-entropy over the answer tokens) under ``bundle``'s model."""
    return _Scorer(bundle, config.resolved(), canaries)(bundle)
