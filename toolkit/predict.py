"""Answer questions about images with an exported model: :class:`Predictor` and :func:`predict`.

The exported model answers the way it was evaluated after training: the same token pruner (the same visual
tokens as training, ``prune_at_eval``), the same prompt template, and the same mode: ranking the saved closed
set of candidates, or greedy free-text generation (``max_new_tokens``) scored by normalised exact match.

Example (a few seconds: a two-step run on a small photo set, exported, then asked)::

    >>> import tempfile
    >>> from toolkit.predict import predict
    >>> from toolkit.samples import make_photo_dataset
    >>> from toolkit.train import TrainConfig, train
    >>> folder = tempfile.mkdtemp()
    >>> paths = make_photo_dataset(folder, n_train=16, n_test=4)
    >>> _ = train(TrainConfig(method="dual-priv", steps=2, warm_start_steps=0, expected_batch_size=8,
    ...                       progress=False, feature_cache=False, train_data=paths["train"],
    ...                       eval_data=paths["test"], output_dir=folder + "/model"))
    >>> out = predict(folder + "/model", paths["test"])
    >>> out["mode"], sorted(out["predictions"][0])
    ('closed-set', ['answer', 'correct', 'id', 'prediction', 'question'])

Command line::

    python -m toolkit predict --model model --data photos/test.json --image-folder photos --json predictions.json
"""
from __future__ import annotations

import os

import torch

from toolkit.config import check_device
from toolkit.data import Collator, VQADataset
from toolkit.evaluation import Answers, answer_records, choose_eval_mode
from toolkit.export import Exported, load_trained
from toolkit.feature_cache import cached_features
from toolkit.features import make_pruner_for
from toolkit.forward import LlavaLM
from toolkit.quiet import transformers_progress_bars
from toolkit.userdata import load_llava_json
from toolkit.validation import check_choice, check_int

MODES = ("saved", "closed-set", "generate")


class Predictor:
    """An exported model ready to answer: its pruner, collator and forward, on ``device``."""

    def __init__(self, exported: Exported, device: str | torch.device = "cpu"):
        self.exported = exported
        self.metadata = exported.metadata
        bundle = exported.bundle
        bundle.model.to(torch.device(device))
        config = exported.config
        self.pruner = make_pruner_for(bundle, config, None if self.metadata["prune_at_eval"] else "none")
        saved = {k: v for k, v in (self.metadata.get("eval_pruner") or {}).items() if k != "fusion_noise_std"}
        rebuilt = {k: v for k, v in self.pruner.describe().items() if k != "fusion_noise_std"}
        if saved and saved != rebuilt:
            raise ValueError(f"the token pruner re-created from the export differs from the one it was evaluated "
                             f"with: {rebuilt} != {saved}")
        self.collator = Collator(bundle.tokenizer, self.pruner.n_out, bundle.image_token_id, bundle.prompt_template)
        self.lm = LlavaLM(bundle).bind_collator(self.collator).eval()
        self.bundle = bundle
        self.max_new_tokens = int(self.metadata["eval"]["max_new_tokens"])

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Predictor":
        return cls(load_trained(path), device)

    def mode_for(self, dataset: VQADataset, mode: str = "saved") -> tuple[str, tuple]:
        """The answering mode: the export's own (``saved``), or ``closed-set`` / ``generate`` asked for."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        saved_mode, saved_candidates = self.metadata["eval"]["mode"], tuple(self.metadata["eval"]["candidates"])
        if mode == "saved":
            if saved_mode == "closed-set":
                return "closed-set", saved_candidates
            if saved_mode == "generate":
                return "generate", ()
            mode = "auto"  # the run evaluated nothing: decide from this data set's answers
        return choose_eval_mode(mode, [r.answer for r in dataset], saved_candidates or None)

    @torch.no_grad()
    def answer(self, dataset: VQADataset, mode: str = "saved", batch_size: int = 64,
               use_cache: bool = True) -> Answers:
        """Answer every record of ``dataset`` (and score those with a known answer)."""
        chosen, candidates = self.mode_for(dataset, mode)
        features = cached_features(self.bundle, self.pruner, dataset.records, use_cache=use_cache)
        return answer_records(self.lm, features, dataset.records, self.collator, mode=chosen, candidates=candidates,
                              max_new_tokens=self.max_new_tokens, batch_size=batch_size)


def predictions_table(dataset: VQADataset, answers: Answers) -> list[dict]:
    """One row per record: id, question, prediction, and the answer and correctness where the answer is known."""
    rows = []
    for record, prediction, correct in zip(dataset.records, answers.predictions, answers.correct):
        row = dict(id=record.id, question=record.question, prediction=prediction)
        if record.answer is not None:
            row.update(answer=record.answer, correct=bool(correct))
        rows.append(row)
    return rows


def predict(model: str | os.PathLike | Predictor, data: str | os.PathLike | VQADataset,
            image_folder: str | os.PathLike | None = None, mode: str = "saved", limit: int | None = None,
            batch_size: int = 64, device: str = "cpu", progress: bool = True) -> dict:
    """Predict an answer for every record of a LLaVA JSON/JSONL file (or a data set) with an exported model.

    A record may end with its question (no ``gpt`` answer): it gets a prediction and no score. Returns
    ``dict(model, data, mode, candidates, accuracy, records, predictions)``. ``progress=False`` hides
    transformers' "Loading weights" bar.
    """
    # every argument, then the data (cheap), before the model is loaded
    check_choice("mode", mode, MODES)
    check_int("batch_size", batch_size, minimum=1)
    if limit is not None:
        check_int("limit", limit, minimum=1)
    if not isinstance(model, Predictor) and not isinstance(device, torch.device):
        check_device(device)
    dataset = data if isinstance(data, VQADataset) else load_llava_json(
        data, image_folder, privacy_unit=False, limit=limit, require_answers=False)
    with transformers_progress_bars(progress):
        predictor = model if isinstance(model, Predictor) else Predictor.from_folder(model, device)
    answers = predictor.answer(dataset, mode, batch_size)
    return dict(model=str(predictor.exported.path), data=dataset.name, mode=answers.mode,
                candidates=list(answers.candidates), accuracy=answers.accuracy, records=len(dataset),
                predictions=predictions_table(dataset, answers))
