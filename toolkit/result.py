"""What a training run produced: :class:`TrainResult`: metrics, history, the model.

``TrainResult.summary()`` is the JSON-ready record the CLI and the sweeps write; what a private run withholds is
already absent from it (:mod:`toolkit.privacy.release`), and ``outside_the_guarantee`` names what it released.

Example::

    >>> from toolkit.train import TrainConfig, train
    >>> result = train(TrainConfig(method="non-private", steps=1, train_limit=16, eval_limit=8,
    ...                            warm_start_steps=0, progress=False))
    >>> result.summary()["epsilon_spent"]
    inf
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from toolkit.config import TrainConfig
from toolkit.export import save_trained
from toolkit.privacy.release import outside_the_guarantee
from toolkit.quiet import transformers_progress_bars

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    """What a run produced. ``summary()`` is the JSON-ready record (the CLI writes it); ``bundle`` the model."""

    config: TrainConfig
    history: pd.DataFrame
    accuracy: float
    epsilon_spent: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    peak_memory_mb: float
    memory_method: str
    step_time_s: float
    trainable_params: int
    visual_tokens: int
    visual_tokens_in: int
    wall_time_s: float
    cancelled: bool = False
    released_stats: tuple = ()
    extra: dict = field(default_factory=dict)
    bundle: object = field(default=None, repr=False)
    eval_answers: object = field(default=None, repr=False)  # toolkit.evaluation.Answers on the eval set

    def save(self, path, export_format: str | None = None):
        """Export the trained model, its tokenizer, what prediction needs and a model card to the new folder
        ``path`` (see :func:`toolkit.export.save_trained`); ``export_format`` defaults to the config's, and
        transformers' "Writing model shards" bar is shown as the run's ``progress`` says."""
        with transformers_progress_bars(self.config.progress):
            return save_trained(self, path, export_format or self.config.export_format)

    def summary(self) -> dict:
        c = self.config
        return dict(
            method=c.method, epsilon=c.epsilon if c.private else math.inf, delta=c.delta,
            epsilon_spent=self.epsilon_spent, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            steps=self.steps, accuracy=self.accuracy, peak_memory_mb=self.peak_memory_mb,
            memory_method=self.memory_method, step_time_s=self.step_time_s, visual_tokens=self.visual_tokens,
            visual_tokens_in=self.visual_tokens_in, trainable_params=self.trainable_params,
            wall_time_s=self.wall_time_s, cancelled=self.cancelled, token_strategy=c.token_strategy,
            grad_prune_ratio=c.grad_prune_ratio, seed=c.seed,
            task=None if c.train_data else c.task,   # a run on your own data trained on no embedded task
            released_training_stats=list(self.released_stats),
            outside_the_guarantee=outside_the_guarantee(c, self.released_stats,
                                                        self.extra.get("privacy_segments", ())),
            config=c.to_dict(), **self.extra,
        )

