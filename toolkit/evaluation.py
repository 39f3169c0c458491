"""Held-out accuracy of a trained model, and the answers it gives.

Two ways to answer, both through the toolkit's own forward on the same (pruned) visual tokens as training:

* ``closed-set``: rank a small closed set of candidate answers by log-likelihood
  (:func:`toolkit.forward.rank_candidates`); accuracy does not depend on free generation. The embedded tasks
  use it with their public answer sets.
* ``generate``: greedy decoding (:func:`toolkit.forward.generate_greedy`, at most ``max_new_tokens``), scored
  by normalised exact match (:func:`normalize_answer`).

``eval_mode="auto"`` (:func:`choose_eval_mode`) ranks when the evaluation set's answers form a small closed
set: at most :data:`CLOSED_SET_MAX` distinct answers, each given on average by at least two records. The
candidates come from the *evaluation* set (or the task definition), never from the private training set,
whose list of distinct answers would be a release outside ε.

Example::

    >>> from toolkit.evaluation import normalize_answer, choose_eval_mode
    >>> normalize_answer("  The Temple! "), normalize_answer("top-left")
    ('temple', 'top left')
    >>> choose_eval_mode("auto", ["temple", "flower", "temple", "flower"])
    ('closed-set', ('flower', 'temple'))
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import torch

from toolkit.config import EVAL_MODES
from toolkit.forward import generate_greedy, rank_candidates

CLOSED_SET_MAX = 20
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles (a/an/the) dropped, whitespace collapsed (VQA/SQuAD style)."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def choose_eval_mode(mode: str, answers, candidates=None) -> tuple[str, tuple[str, ...]]:
    """(``"closed-set"`` with its candidates, or ``"generate"`` with none) for ``mode`` and the known answers.

    Declared ``candidates`` (a task's public answer set) are ranked whenever the mode is not ``generate``;
    otherwise the distinct ``answers`` (of the evaluation set) are the candidates, in ``auto`` mode only when
    they form a small closed set (see the module docstring).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown eval_mode {mode!r}; choose one of {EVAL_MODES}")
    if mode == "generate":
        return "generate", ()
    if candidates:
        return "closed-set", tuple(candidates)
    known = [a for a in answers if a is not None]
    derived = tuple(sorted(set(known)))
    if mode == "closed-set":
        if not derived:
            raise ValueError("eval_mode 'closed-set' needs candidate answers, and no record has an answer")
        return "closed-set", derived
    small = 0 < len(derived) <= CLOSED_SET_MAX and 2 * len(derived) <= len(known)
    return ("closed-set", derived) if small else ("generate", ())


@dataclass
class Answers:
    """What a model answered on a set of records, and how it was scored."""

    mode: str
    predictions: list[str]
    candidates: tuple = ()
    correct: list = field(default_factory=list)   # True/False per record, None where the answer is unknown
    ids: list = field(default_factory=list)       # the records' ids, in order

    @property
    def accuracy(self) -> float | None:
        """Share of correct answers among records with a known answer (None if no record has one)."""
        scored = [c for c in self.correct if c is not None]
        return sum(scored) / len(scored) if scored else None


@torch.no_grad()
def answer_records(lm, features: torch.Tensor, records, collator, *, mode: str, candidates=(),
                   max_new_tokens: int = 16, batch_size: int = 128) -> Answers:
    """Answer every record (``mode`` ``closed-set`` or ``generate``, already chosen) and score the known ones."""
    was_training = lm.training
    lm.eval()
    try:
        if mode == "closed-set":
            predictions = _rank(lm, features, records, collator, candidates, batch_size)
        elif mode == "generate":
            predictions = _generate(lm, features, records, collator, max_new_tokens, batch_size)
        else:
            raise ValueError(f"mode must be 'closed-set' or 'generate', got {mode!r}")
    finally:
        lm.train(was_training)
    if mode == "closed-set":
        correct = [None if r.answer is None else p == r.answer for p, r in zip(predictions, records)]
    else:
        correct = [None if r.answer is None else normalize_answer(p) == normalize_answer(r.answer)
                   for p, r in zip(predictions, records)]
    return Answers(mode, predictions, tuple(candidates) if mode == "closed-set" else (), correct,
                   [r.id for r in records])


def _rank(lm, features, records, collator, candidates, batch_size) -> list[str]:
    tok = collator.tokenizer
    candidate_ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in candidates]
    device = features.device
    predictions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        best = rank_candidates(lm, features[start:start + batch_size], batch, candidate_ids)
        predictions += [candidates[i] for i in best.tolist()]
    return predictions


def _generate(lm, features, records, collator, max_new_tokens, batch_size) -> list[str]:
    # Prompts of equal length are batched together: no padding, so the KV-cached decoding stays exact.
    prompts = [collator.prompt_ids(r.question, tuple(r.history)) for r in records]
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(i)
    predictions = [""] * len(records)
    tok = collator.tokenizer
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk])
            feats = features[torch.tensor(chunk, device=features.device)]
            for i, new in zip(chunk, generate_greedy(lm, feats, ids, max_new_tokens, tok.eos_token_id)):
                predictions[i] = tok.decode(new, skip_special_tokens=True).strip()
    return predictions


@torch.no_grad()
def evaluate(lm, features: torch.Tensor, records, collator, candidates, batch_size: int = 128) -> float:
    """Accuracy by ranking the closed set of candidate answers (log-likelihood); NaN for an empty set."""
    if len(records) == 0:
        return float("nan")
    return answer_records(lm, features, records, collator, mode="closed-set", candidates=tuple(candidates),
                          batch_size=batch_size).accuracy
