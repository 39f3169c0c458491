"""A practitioner's client: answer a LLaVA-JSON file with an exported model using transformers, peft, PIL and torch
only (no toolkit import, Hub offline). Run as a script by tests/test_real_client.py:

    HF_HUB_OFFLINE=1 python tests/real_client.py JOBS.json OUT.json

JOBS.json: a list of ``{"out", "data", "image_folder", "how", "max_new_tokens"}``; OUT.json gets one answer list
per job, the toolkit modules found imported (none expected) and each model's class.

HOW: ``merged`` (LlavaForConditionalGeneration), ``auto`` (AutoModelForImageTextToText), ``adapter``
(PeftModel.from_pretrained on the base that adapter_config.json names), ``auto-peft`` (peft's AutoPeftModel),
``remote`` / ``remote-adapter`` (the same with trust_remote_code=True).
"""
import json
import os
import sys
from pathlib import Path

import torch
from peft import AutoPeftModel, PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration


def load(out: Path, how: str):
    remote = how.startswith("remote")
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=remote)
    if how == "merged":
        model = LlavaForConditionalGeneration.from_pretrained(out)
    elif how in ("auto", "remote"):
        model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=remote)
    elif how == "auto-peft":
        model = AutoPeftModel.from_pretrained(out)
    else:
        base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = AutoModelForImageTextToText.from_pretrained(base_path, trust_remote_code=remote)
        model = PeftModel.from_pretrained(base, out)
    return processor, model.eval()


def answer(out, data, image_folder, how, max_new_tokens):
    processor, model = load(Path(out), how)
    answers = []
    for record in json.loads(Path(data).read_text()):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        with Image.open(Path(image_folder) / record["image"]) as image:
            inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return dict(answers=answers, model_class=type(model).__name__)


def main(jobs_file, result_file):
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise SystemExit("run with HF_HUB_OFFLINE=1")
    results = [answer(**job) for job in json.loads(Path(jobs_file).read_text())]
    imported = sorted(name for name in sys.modules if name == "toolkit" or name.startswith("toolkit."))
    Path(result_file).write_text(json.dumps(dict(results=results, toolkit_modules=imported)))


if __name__ == "__main__":
    main(*sys.argv[1:])
