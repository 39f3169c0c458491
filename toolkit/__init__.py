"""Differentially private fine-tuning of LLaVA-style models with Dual-Priv Pruning.

Public API (see README.md for a runnable tour)::

    from toolkit.models import build_model, load_model, save_model, apply_trainable
    from toolkit.data import make_vqa, Collator
    from toolkit.userdata import load_llava_json          # your LLaVA JSON/JSONL + image folder
    from toolkit.tokens import make_pruner, STRATEGIES
    from toolkit.train import TrainConfig, train          # TrainConfig(train_data=..., eval_data=..., image_folder=...)
    from toolkit.export import save_trained, load_trained # result.save(dir): peft adapter or merged + model card
    from toolkit.predict import predict
"""
__version__ = "0.1.0"
