"""The model card (``README.md``) of an export: what the model is, its privacy guarantee in numbers, what it does
not cover, how a photo becomes its input, and how to load it with transformers alone.

Example::

    >>> from toolkit.model_card import loading_snippet
    >>> "LlavaForConditionalGeneration.from_pretrained" in loading_snippet(dict(export_format="merged"))
    True
"""
from __future__ import annotations

import math

from toolkit.privacy.release import privacy_history_lines
from toolkit.vocabulary import format_epsilon, method_label

EXPORT_FILE = "dualpriv_export.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

MERGED_SNIPPET = '''from transformers import AutoProcessor, LlavaForConditionalGeneration
processor = AutoProcessor.from_pretrained(out)
model = LlavaForConditionalGeneration.from_pretrained(out).eval()'''
ADAPTER_SNIPPET = '''from peft import PeftModel
from transformers import AutoProcessor, LlavaForConditionalGeneration
processor = AutoProcessor.from_pretrained(out)
base = LlavaForConditionalGeneration.from_pretrained(BASE)
model = PeftModel.from_pretrained(base, out).eval()       # or: peft.AutoPeftModel.from_pretrained(out)'''
REMOTE_SNIPPET = '''from transformers import AutoModelForImageTextToText, AutoProcessor
processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()'''
ASK_SNIPPET = '''from PIL import Image
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which photo is this ?"}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=Image.open("photo.jpg"), text=prompt, return_tensors="pt")
answer = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
print(processor.decode(answer, skip_special_tokens=True).strip())'''


def loading_snippet(meta: dict) -> str:
    """Runnable code that loads this export with transformers (and peft) alone; ``out`` is the folder."""
    if meta.get("inference") == "remote-code":
        body = REMOTE_SNIPPET
    elif meta["export_format"] == "adapter":
        base = meta.get("adapter_base") or "out + '/base_model'"
        body = ADAPTER_SNIPPET.replace("BASE", base if base.startswith("out") else repr(base))
    else:
        body = MERGED_SNIPPET
    max_new = (meta.get("eval") or {}).get("max_new_tokens") or 8
    return body + "\n" + ASK_SNIPPET.replace("max_new_tokens=8", f"max_new_tokens={max_new}")


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return format_epsilon(value)
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def model_card(meta: dict) -> str:
    """The export's README.md: what the model is, its privacy guarantee in numbers, and what it does not cover."""
    p, t, e = meta["privacy"], meta["training"], meta["eval"]
    pruner = meta["train_pruner"] or {}
    lines = [
        f"# {method_label(p['method'])} fine-tuned LLaVA ({meta['export_format']} export)",
        "",
        f"Made with the Dual-Priv Pruning toolkit {meta['toolkit_version']}. Trained on `{t['train_data']}`; "
        f"what trained: `{meta['trainable']}`." + (" The run was stopped early (cancelled)." if t["cancelled"] else ""),
        "",
        "## Privacy guarantee",
    ]
    pruning = [
        f"| visual tokens | {t['visual_tokens']} of {t['visual_tokens_in']} (strategy {t['token_strategy']}, "
        f"scoring layer {pruner.get('layer')}, {pruner.get('n_contextual', 0)} fused) |",
        f"| update pruning | {_number(t['grad_prune_ratio'])} of the noisy gradient's coordinates zeroed |",
    ]
    if p["private"]:
        lines += [
            f"(ε, δ)-differential privacy with **ε = {_number(p['epsilon_spent'])}** spent "
            f"(target {_number(p['epsilon'])}), **δ = {_number(p['delta'])}**.",
            "",
            "| what | value |", "|---|---|",
            f"| privacy unit | {p['privacy_unit']} |",
            f"| N (records, declared) | {p['n_records']} |",
            f"| sampling | {p['sampling']}, rate q = {_number(p['sample_rate'])} "
            f"(expected batch {p['expected_batch_size']}) |",
            f"| noise multiplier σ | {_number(p['noise_multiplier'])} |",
            f"| steps | {p['steps']} |",
            f"| accountant | {p['accountant']} |",
            f"| clipping norm C | {_number(p['max_grad_norm'])} |",
            f"| method | {method_label(p['method'])} ({p['method']}) |",
        ] + pruning
    else:
        lines += ["**None.** This model was trained without differential privacy (method non-private).", "",
                  "| what | value |", "|---|---|", f"| steps | {p['steps']} |"] + pruning
    lines += privacy_history_lines(p.get("segments", []))
    lines += ["", "### Outside the guarantee"]
    lines += [f"- {note}" for note in p["outside_the_guarantee"]]
    released = p["released_training_stats"]
    lines += [f"- released training statistics: {', '.join(released) if released else 'none'}",
              "- the evaluation below (its data is not covered by ε; its score is released as it is)",
              "- the base model and its public warm-start data (public by assumption)", ""]
    lines += [
        "## Evaluation",
        f"{e['mode'] or 'none'} on `{e['data']}` ({e['records']} records): accuracy "
        f"{_number(e['accuracy'])}" + (f", ranking {len(e['candidates'])} candidate answers (taken from the "
                                       "evaluation set, never from the training set; stored in "
                                       f"`{EXPORT_FILE}` for prediction)" if e["mode"] == "closed-set" else ""),
        "",
        "## Use it",
        "```bash",
        "python -m toolkit predict --model THIS_FOLDER --data FILE.json --image-folder DIR --json predictions.json",
        "```",
        "```python",
        "from toolkit.export import load_trained",
        "model = load_trained('THIS_FOLDER')",
        "```",
    ]
    lines += ["", "## Load it with transformers alone (offline, no toolkit)", "", "```python", "out = 'THIS_FOLDER'",
              loading_snippet(meta), "```", ""]
    if meta["export_format"] == "adapter":
        base = meta["base_model"]
        where = "`base_model/` in this folder" if base["kind"] == "copy" else f"`{base['path']}` (not copied)"
        lines += [f"peft adapter (`{ADAPTER_CONFIG}`, `{ADAPTER_WEIGHTS}`) on the base model {where}; the adapter "
                  f"file also holds the trained {', '.join(meta['modules_to_save']) or 'nothing else'}. The adapter "
                  f"config names the base as `{meta.get('adapter_base')}` (what `AutoPeftModel` loads); peft has no "
                  "task type for LLaVA, so the adapter config carries an `auto_mapping` to "
                  "`LlavaForConditionalGeneration` instead.", ""]
    else:
        plain = ("A plain LLaVA: `LlavaForConditionalGeneration.from_pretrained` (or `AutoModelForImageTextToText`) "
                 "loads it.")
        if meta.get("inference") == "remote-code":
            plain = ("`LlavaForConditionalGeneration.from_pretrained` also loads these weights, but then feeds all "
                     "visual tokens (see Inputs below).")
        lines += [plain, ""]
    lines += inputs_section(meta)
    return "\n".join(lines)




def inputs_section(meta: dict) -> list[str]:
    """How a photo and a question become the model's input: the prompt convention and the image processor."""
    tokens = meta.get("image_tokens")
    lines = [
        "## Inputs",
        f"- Prompt: `{meta['prompt_template']}` (the chat template in `chat_template.jinja` renders it; the image "
        "comes first, before the question, as in LLaVA's training). The processor expands `<image>` into "
        f"{tokens if tokens is not None else 'one placeholder per visual token'} placeholder tokens; the sequence "
        "starts with one BOS token (from the chat template or the tokenizer, never both). Answers are trained "
        "after a space and end with the EOS token.",
        f"- Image: {meta.get('preprocessing') or 'the image processor in this folder'} "
        f"(the image processor in `processor_config.json`; the toolkit feeds exactly its `pixel_values`).",
    ]
    if meta.get("inference_note"):
        lines.append(f"- Visual tokens: {meta['inference_note']}")
    return lines + [""]
