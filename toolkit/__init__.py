"""Differentially private fine-tuning of LLaVA-style models with Dual-Priv Pruning.

Public API (see README.md for a runnable tour)::

    from toolkit.models import build_model, load_model, save_model, apply_trainable
    from toolkit.data import make_vqa, load_llava_json, Collator
    from toolkit.tokens import make_pruner, STRATEGIES
    from toolkit.train import TrainConfig, train
"""
__version__ = "0.1.0"
