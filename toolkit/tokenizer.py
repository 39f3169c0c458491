"""Text in: the embedded presets' byte-level tokenizer and chat template, and a checkpoint's chat template read as
the toolkit's prompt template.

The embedded chat template renders exactly the token sequence the collator builds (``<s>user : <image> question
assistant :``, the answer after a space, then ``</s>``), so a Hugging Face processor given this template and the
same tokenizer feeds the model what training fed it (tested token for token).

Example::

    >>> tok = build_tokenizer()
    >>> tok.convert_ids_to_tokens(tok(" odd", add_special_tokens=False)["input_ids"])
    ['Ġodd']
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from toolkit.bundle import ModelLoadError

# Public text the embedded byte-level tokenizer learns its merges from: the prompt template, every question and
# answer of the embedded data sets (toolkit.data; repeated so that their merges come first), numbers, and a few
# common English words. It only decides which strings are single tokens; any other text is still encoded, byte
# by byte (never <unk>). 384 entries = 256 bytes + 5 special tokens + 123 merges, the smallest size at which
# every embedded question word and answer is one token (tested); a larger vocabulary only widens the LM head.
TOKENIZER_CORPUS = (
    "user : <image> what digit is this ? assistant :",
    " is the digit even or odd ? what is the left digit ? what is the right digit ?",
    " what is the sum of the two digits ? which number is it ? yes no , . !",
) * 4 + (" " + " ".join(str(i) for i in range(100)),) * 2 + (
    " the a an of in on at to from with and or not is are was it this that which what where who how many",
    " left right top bottom middle center up down image picture photo colour color red green blue yellow",
    " black white grey gray dark light large small big one two three four five six seven eight nine ten",
)
TOKENIZER_VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# The embedded presets' prompt, and the Jinja chat template that renders it (BOS first: the tokenizer adds none).
PRESET_PROMPT_TEMPLATE = "user : <image> {question} assistant :"
PRESET_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "user : "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if not loop.last or add_generation_prompt %} assistant :{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)
# LLaVA-1.5's prompt, used only when a local checkpoint has no chat template of its own.
LLAVA15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the spot on :data:`TOKENIZER_CORPUS` (public text, no download).

    Byte-level means every string is encodable: a word the merges never saw is spelled in bytes, so a user's
    answer is never ``<unk>``. The merges make every embedded question word and answer (with its leading space,
    as the collator encodes answers) a single token. Training is deterministic: the same corpus gives the same
    vocabulary in every process (the warm-start cache relies on it).

    Example::

        >>> tok = build_tokenizer()
        >>> tok.decode(tok(" Schloß Neuschwanstein", add_special_tokens=False)["input_ids"])
        ' Schloß Neuschwanstein'
    """
    core = Tokenizer(tokenizer_models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
    )
    core.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def read_chat_template(path: Path, tokenizer) -> tuple[str | None, str]:
    """A checkpoint's own chat template (Jinja text) and the file it came from, or ``(None, reason)``."""
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if file.is_file():
            text = file.read_text()
            return (json.loads(text).get("chat_template") if name.endswith(".json") else text), name
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "tokenizer_config.json"
    return None, "default (LLaVA-1.5)"


def render_prompt_template(template: str, tokenizer, where: str = "the chat template") -> str:
    """``template`` rendered for one user turn (image, then the question) and the assistant's reply prompt, as
    the toolkit's ``prompt_template`` (``<image>`` and ``{question}`` fields; a leading BOS is dropped, since the
    collator adds BOS itself)."""
    sentinel = "\x00QUESTION\x00"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentinel}]}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
    except Exception as err:  # a template is arbitrary Jinja: any failure means "cannot use it"
        raise ModelLoadError(f"{where} could not be rendered ({err})") from None
    if tokenizer.bos_token and rendered.startswith(tokenizer.bos_token):
        rendered = rendered[len(tokenizer.bos_token):]
    if rendered.count("<image>") != 1 or rendered.count(sentinel) != 1:
        raise ModelLoadError(f"{where} does not render one '<image>' and the question for a single user turn")
    # Braces in the rendered text are literal, except the question field.
    rendered = rendered.replace("{", "{{").replace("}", "}}").replace(sentinel, "{question}")
    return rendered.rstrip(" ")


def chat_prompt_template(path: Path, tokenizer) -> tuple[str, str]:
    """The checkpoint's chat template rendered by :func:`render_prompt_template`, and where it came from.
    LLaVA-1.5-hf's ``chat_template.json`` gives ``"USER: <image>\\n{question} ASSISTANT:"``."""
    template, source = read_chat_template(path, tokenizer)
    if not template:
        return LLAVA15_TEMPLATE, source
    return render_prompt_template(template, tokenizer, f"{str(path)!r}: the chat template ({source})"), source
