"""Export a trained model to a folder, and load it back exactly: :func:`save_trained` / :func:`load_trained`.

Two formats (``export_format``):

* ``adapter`` (the default when LoRA trained, ``auto``): peft's own files, ``adapter_config.json`` +
  ``adapter_model.safetensors``, holding the LoRA weights and full copies of whatever else trained (the
  projector, the LM head: peft's ``modules_to_save``). They load with plain peft onto the base model::

      from peft import PeftModel
      from transformers import LlavaForConditionalGeneration
      base = LlavaForConditionalGeneration.from_pretrained(f"{out}/base_model")   # or your own llava-1.5-7b-hf
      model = PeftModel.from_pretrained(base, out)

  The base is the model the run started from: copied into ``base_model/`` for an embedded preset (a few MB),
  referenced by its path for a local checkpoint (no 14 GB copy).
* ``merged``: LoRA folded into the weights, a plain LLaVA that ``LlavaForConditionalGeneration.from_pretrained``
  loads with nothing else (the default when no LoRA trained).

Both add the tokenizer (and a checkpoint's image processor), ``dualpriv_export.json`` (what prediction needs:
the token pruner settings, the prompt template, the evaluation mode and candidates, the public run config) and
a model card ``README.md`` with the privacy guarantee and what it does not cover. Never written: the noise
generator, the Poisson sampler's state, optimizer state, checkpoints, a ``noise_seed`` (the secret state of a
run, which would let anyone strip the noise; a checkpoint holds it, an export never does).

Loading back checks every weight: a trained weight left uninitialised is an error, never a warning.

Example (a few seconds)::

    >>> import tempfile
    >>> from toolkit.train import TrainConfig, train
    >>> from toolkit.export import load_trained
    >>> result = train(TrainConfig(method="dual-priv", steps=2, train_limit=16, eval_limit=8, warm_start_steps=0,
    ...                            expected_batch_size=8, progress=False))
    >>> out = result.save(tempfile.mkdtemp() + "/model")
    >>> load_trained(out).metadata["export_format"]
    'adapter'
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

import toolkit
from toolkit.config import TrainConfig
from toolkit.features import make_pruner_for
from toolkit.model_card import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_FILE, model_card
from toolkit.models import LORA_TARGETS, LlavaBundle, ModelLoadError, has_lora, load_model, save_model
from toolkit.privacy.release import guarantee_lost
from toolkit.processor import describe_preprocessing, make_processor, save_processor
from toolkit.remote_export import add_remote_model, add_remote_processor, inference_plan
from toolkit.validation import check_output_dir
from toolkit.warmstart import starting_model

BASE_FOLDER = "base_model"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
# What trains besides LoRA in each LoRA mode (toolkit.models.apply_trainable): saved whole (peft modules_to_save).
MODULES_TO_SAVE = {"lora": ("multi_modal_projector",), "lora+head": ("multi_modal_projector", "lm_head")}
# LoRA on the language model's linears only: the vision tower has q/k/v projections too, and stays frozen.
TARGET_REGEX = r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")"
AUTO_MAPPING = {"base_model_class": "LlavaForConditionalGeneration", "parent_library": "transformers"}


@dataclass
class Exported:
    """A loaded export: the model bundle (ready for :mod:`toolkit.predict`) and its metadata."""

    bundle: LlavaBundle
    metadata: dict
    path: Path

    @property
    def config(self) -> TrainConfig:
        """The run's public config. A field this toolkit version does not know (an export from a newer one) is
        named in a warning, not dropped silently."""
        return TrainConfig.from_dict(self.metadata["config"], unknown="warn")


def resolve_format(export_format: str, model) -> str:
    if export_format not in ("auto", "adapter", "merged"):
        raise ValueError(f"unknown export_format {export_format!r}; choose 'adapter', 'merged' or 'auto'")
    lora = has_lora(model)
    if export_format == "adapter" and not lora:
        raise ValueError("export_format 'adapter' needs LoRA training (trainable lora or lora+head): use 'merged'")
    if export_format == "auto":
        return "adapter" if lora else "merged"
    return export_format


# ------------------------------------------------------------------------------------------------ weights

def lora_modules(model) -> dict:
    """name -> peft LoRA layer, for every layer holding a LoRA adapter."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of a plain LLaVA equal to ``model`` with its LoRA folded in: W + (B A)·scaling.

    The model itself is not changed (merging in place and unmerging would not restore W bit for bit)."""
    layers = lora_modules(model)
    state = {}
    for key, tensor in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    for name, layer in layers.items():
        if getattr(layer, "merged", False):
            raise ValueError(f"LoRA layer {name!r} is already merged into its weight")
        weight = layer.get_base_layer().weight
        delta = sum(layer.get_delta_weight(adapter) for adapter in layer.lora_A)
        state[f"{name}.weight"] = (weight + delta.to(weight.dtype)).detach()
    return state


def merged_model(model):
    """A new plain ``LlavaForConditionalGeneration`` holding :func:`merged_state_dict` (built on the meta device,
    then given the merged tensors: no second random initialisation of a large model)."""
    state = merged_state_dict(model)
    with torch.device("meta"):
        fresh = LlavaForConditionalGeneration(model.config)
    fresh.load_state_dict(state, strict=True, assign=True)
    return fresh.eval()


def adapter_state_dict(model, modules_to_save) -> dict[str, torch.Tensor]:
    """The trained weights under peft's file names: LoRA A/B (adapter name dropped) and whole trained modules."""
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            state[PEFT_PREFIX + re.sub(r"\.(lora_[AB])\.default\.", r".\1.", name)] = param.detach().contiguous()
        elif any(name.startswith(f"{m}.") or name.startswith(f"model.{m}.") for m in modules_to_save):
            state[PEFT_PREFIX + name] = param.detach().contiguous()
    return state


def lora_settings(model) -> dict:
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    ranks = {layer.r["default"] for layer in layers.values()}
    alphas = {layer.lora_alpha["default"] for layer in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"LoRA layers with different ranks {sorted(ranks)} or alphas {sorted(alphas)}")
    return dict(r=int(first.r["default"]), lora_alpha=int(first.lora_alpha["default"]), target_modules=TARGET_REGEX,
                layers=sorted(layers))


def _lora_config(settings: dict, modules_to_save, base: str | None):
    config = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"],
                        lora_dropout=0.0, bias="none", modules_to_save=list(modules_to_save) or None,
                        base_model_name_or_path=base)
    # peft has no task type for LLaVA (AutoModelForCausalLM refuses its config): AutoPeftModel finds the class here.
    config.auto_mapping = AUTO_MAPPING
    return config


def adapter_base_name(base_model: str | None, copied: Path | None) -> str:
    """What ``adapter_config.json`` names as the base: the user's choice (an existing path is made absolute, else
    it is taken as a Hub id), else the absolute path of the copied or referenced base: never cwd-relative."""
    if base_model:
        candidate = Path(base_model).expanduser()
        return str(candidate.resolve()) if candidate.exists() else str(base_model)
    return str(copied.resolve())


# ------------------------------------------------------------------------------------------------ save

def save_trained(result, path: str | os.PathLike, export_format: str = "auto", base_model: str | None = None) -> Path:
    """Write ``result`` (a :class:`toolkit.train.TrainResult`) to the new folder ``path``; return the path.

    ``base_model`` (adapter format): the path or Hub id that ``adapter_config.json`` names as the base, for
    ``AutoPeftModel`` (default: the absolute path of ``path/base_model`` for a preset, of the local checkpoint
    otherwise). The toolkit itself always loads the base from the folder or the local path it recorded.

    The folder is written beside ``path`` under a temporary name and renamed when complete: a failure leaves
    nothing half-written. ``path`` must not exist or be empty.
    """
    if not (hasattr(result, "bundle") and hasattr(result, "config")):   # e.g. save_trained("model", "out")
        raise TypeError(f"save_trained needs the TrainResult that train returns, got {type(result).__name__}")
    path = Path(path)
    check_output_dir(path, "output_dir")
    bundle, config = result.bundle, result.config
    if bundle is None:
        raise ValueError("this result holds no model (result.bundle is None)")
    fmt = resolve_format(export_format, bundle.model)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "merged":
            save_model(dataclasses.replace(bundle, model=merged_model(bundle.model)), tmp)
            base, lora, saved = None, None, []
        else:
            base, lora, saved = _save_adapter(bundle, config, tmp, path, base_model)
        save_processor(bundle, tmp)  # tokenizer, processor_config.json, chat_template.jinja
        plan = _carry_inference_path(bundle, config, fmt, base, tmp)
        meta = export_metadata(result, fmt, base, lora, saved, plan)
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2, default=str))
        (tmp / "README.md").write_text(model_card(meta))
        if path.is_dir():
            path.rmdir()  # checked empty above
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _carry_inference_path(bundle, config: TrainConfig, fmt: str, base, folder: Path) -> dict:
    """Add the remote-code files where the model answers on pruned visual tokens (:mod:`toolkit.remote_export`)."""
    pruner = make_pruner_for(bundle, config, None if config.prune_at_eval else "none")
    copied = fmt == "merged" or base["kind"] == "copy"
    inference, settings, note = inference_plan(pruner, copied, fmt)
    if settings is not None:
        model_folder = folder if fmt == "merged" else folder / BASE_FOLDER
        add_remote_model(model_folder, settings)
        for processor_folder in {folder, model_folder}:
            add_remote_processor(processor_folder, settings)
    tokens = settings["n_out"] if settings is not None else _image_tokens(bundle)
    return dict(inference=inference, inference_note=note, pruning=settings, image_tokens=tokens)


def _save_adapter(bundle, config: TrainConfig, folder: Path, final: Path, base_model: str | None):
    modules_to_save = MODULES_TO_SAVE.get(config.trainable, ())
    settings = lora_settings(bundle.model)
    start = bundle.info.get("start") or {}
    if start.get("model_dir"):
        base = dict(kind="reference", path=start["model_dir"])
        named = adapter_base_name(base_model, Path(start["model_dir"]))
    else:
        # the embedded starting model, re-created from its (deterministic, cached) recipe and copied
        original = starting_model(None, start.get("preset") or config.preset, start.get("warm_start_steps"),
                                  progress=False, curriculum=start.get("curriculum") or "digit")
        _check_same_frozen_weights(original.model, bundle.model, modules_to_save)
        save_model(original, folder / BASE_FOLDER)
        base = dict(kind="copy", path=BASE_FOLDER)
        named = adapter_base_name(base_model, final / BASE_FOLDER)
    base["adapter_base"] = named
    folder.mkdir(parents=True, exist_ok=True)
    _lora_config(settings, modules_to_save, named).save_pretrained(folder)
    save_file(adapter_state_dict(bundle.model, modules_to_save), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return base, settings, list(modules_to_save)


def _check_same_frozen_weights(original, trained, modules_to_save) -> None:
    """The re-created base must equal the trained model outside what trained, or the adapter would not
    reproduce it."""
    trained_state = {k.replace(".base_layer.", "."): v for k, v in trained.state_dict().items() if "lora_" not in k}
    for key, tensor in original.state_dict().items():
        if any(key.startswith(f"{m}.") or key.startswith(f"model.{m}.") for m in modules_to_save):
            continue
        if key not in trained_state or not torch.equal(trained_state[key].cpu(), tensor.cpu()):
            raise ValueError(f"the re-created base model differs from the trained one at {key!r}: "
                             "export with export_format='merged'")


def _public_config(config: TrainConfig) -> dict:
    """The run's config without its secret: a noise_seed would let anyone re-create the noise and batches."""
    public = config.to_dict()
    public["noise_seed"] = None
    return public


def _image_tokens(bundle) -> int:
    """``<image>`` placeholders the exported processor writes for one image."""
    return int(make_processor(bundle)._get_num_multimodal_tokens(image_sizes=[[1, 1]]).num_image_tokens[0])


def export_metadata(result, fmt: str, base, lora, modules_to_save, plan: dict) -> dict:
    summary = result.summary()
    segments = summary.get("privacy_segments", [])
    config = result.config
    eval_pruner = make_pruner_for(result.bundle, config, None if config.prune_at_eval else "none")
    answers = result.eval_answers
    bundle = result.bundle
    return dict(
        format_version=FORMAT_VERSION, toolkit_version=toolkit.__version__, export_format=fmt,
        base_model=base, trainable=config.trainable, lora=lora, modules_to_save=modules_to_save,
        adapter_base=(base or {}).get("adapter_base"), **plan,
        preprocessing=describe_preprocessing(bundle.image_processor),
        prompt_template=bundle.prompt_template, image_size=bundle.image_size,
        image_mean=list(bundle.image_mean), image_std=list(bundle.image_std),
        train_pruner=summary.get("pruner"), eval_pruner=eval_pruner.describe(), prune_at_eval=config.prune_at_eval,
        eval=dict(mode=answers.mode if answers is not None else None,
                  candidates=list(answers.candidates) if answers is not None else [],
                  max_new_tokens=config.max_new_tokens, accuracy=summary["accuracy"],
                  records=summary.get("eval_records"), data=summary.get("eval_data")),
        privacy=dict(
            method=config.method, private=config.private, epsilon=summary["epsilon"], delta=config.delta,
            epsilon_spent=summary["epsilon_spent"], noise_multiplier=summary["noise_multiplier"],
            sample_rate=summary["sample_rate"], steps=summary["steps"], accountant=config.accountant,
            max_grad_norm=config.max_grad_norm, expected_batch_size=config.expected_batch_size,
            n_records=summary.get("n_records"), privacy_unit=summary.get("privacy_unit"),
            sampling=config.sampling,
            noise_seed_given=config.noise_seed is not None or guarantee_lost(segments)["noise_seed_given"],
            segments=segments,
            outside_the_guarantee=[note.replace(f"noise_seed={config.noise_seed}", "a noise_seed (not saved here)")
                                   for note in summary["outside_the_guarantee"]],
            released_training_stats=summary["released_training_stats"],
        ),
        training=dict(train_data=summary.get("train_data"), visual_tokens=summary["visual_tokens"],
                      visual_tokens_in=summary["visual_tokens_in"], grad_prune_ratio=config.grad_prune_ratio,
                      token_strategy=config.token_strategy, trainable_params=summary["trainable_params"],
                      cancelled=summary["cancelled"]),
        config=_public_config(config),
    )


# ------------------------------------------------------------------------------------------------ load

def load_trained(path: str | os.PathLike) -> Exported:
    """Load a folder written by :func:`save_trained`; every trained weight must be found, or ``ModelLoadError``."""
    path = Path(path).expanduser()
    meta_file = path / EXPORT_FILE
    if not path.is_dir():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist")
    if not meta_file.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a toolkit export (no {EXPORT_FILE}); a plain LLaVA folder is "
                             "loaded with toolkit.models.load_model")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{str(path)!r}: export format {meta.get('format_version')!r} is not supported "
                             f"(this toolkit reads {FORMAT_VERSION})")
    if meta["export_format"] == "merged":
        bundle = load_model(path)
    else:
        bundle = _load_adapter(path, meta)
    return Exported(bundle, meta, path)


def _load_adapter(path: Path, meta: dict) -> LlavaBundle:
    base = meta["base_model"]
    base_path = path / base["path"] if base["kind"] == "copy" else Path(base["path"])
    bundle = load_model(base_path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"{str(path)!r} has no {ADAPTER_WEIGHTS}")
    settings = meta["lora"]
    inject_adapter_in_model(_lora_config(settings, (), None), bundle.model)
    injected = sorted(lora_modules(bundle.model))
    if injected != sorted(settings["layers"]):
        raise ModelLoadError(f"{str(path)!r}: the base model at {str(base_path)!r} does not have the adapter's LoRA "
                             f"layers ({len(injected)} found, {len(settings['layers'])} expected)")
    state = {}
    for key, tensor in load_file(path / ADAPTER_WEIGHTS).items():
        if not key.startswith(PEFT_PREFIX):
            raise ModelLoadError(f"{str(path)!r}: unexpected adapter weight {key!r}")
        state[re.sub(r"\.(lora_[AB])\.", r".\1.default.", key[len(PEFT_PREFIX):])] = tensor
    expected = {name for name, _ in bundle.model.named_parameters()
                if "lora_" in name or any(name.startswith(f"{m}.") or name.startswith(f"model.{m}.")
                                          for m in meta["modules_to_save"])}
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(f"{str(path)!r}: {len(missing)} trained weight(s) missing from {ADAPTER_WEIGHTS} "
                             f"(e.g. {missing[0]!r}); they would be left uninitialised")
    result = bundle.model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelLoadError(f"{str(path)!r}: {ADAPTER_WEIGHTS} holds weights the model does not have "
                             f"(e.g. {result.unexpected_keys[0]!r})")
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    bundle.model.eval()
    return bundle
