"""Held-out accuracy of a trained model: closed-set ranking of the candidate answers
(:func:`toolkit.forward.rank_candidates`), so accuracy does not depend on free generation."""
from __future__ import annotations

import torch

from toolkit.forward import rank_candidates


@torch.no_grad()
def evaluate(lm, features: torch.Tensor, records, collator, candidates, batch_size: int = 128) -> float:
    """Accuracy by ranking the closed set of candidate answers (log-likelihood); NaN for an empty set."""
    if len(records) == 0:
        return float("nan")
    tok = collator.tokenizer
    candidate_ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in candidates]
    was_training = lm.training
    lm.eval()
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = collator(chunk)
        pred = rank_candidates(lm, features[start:start + batch_size], batch, candidate_ids)
        gold = torch.tensor([candidates.index(r.answer) if r.answer in candidates else -1 for r in chunk])
        correct += int((pred.cpu() == gold).sum())
    lm.train(was_training)
    return correct / len(records)
