"""The merged model's chat template (mergekit's `chat_template:`): a built-in name, `auto`, or a Jinja string.

As mergekit does, the tokenizer is loaded from the folder the output's tokenizer files come from, given the
template, and saved again with transformers (which writes the template to chat_template.jinja). `auto` takes the
template most of the inputs share (ties: the first in recipe order, base first). The built-in templates are the
ones mergekit 0.1.5 ships (mergekit/_data/chat_templates, LGPL-3.0), byte for byte, so the same name gives the
same template.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from malleable.errors import InputError, RecipeError

BUILTIN = {
    "alpaca": (
        "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if (messages|selectattr("
        "'role', 'equalto', 'system')|list) else '' }}\n\n{% for message in messages %}\n{% if message['role'] == "
        "'user' %}\n### Instruction:\n{{ message['content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n"
        "{% elif message['role'] == 'assistant' %}\n### Response:\n{{ message['content']|trim -}}\n{% if not "
        "loop.last %}\n\n\n{% endif %}\n{% elif message['role'] == 'user_context' %}\n### Input:\n{{ message["
        "'content']|trim -}}\n{% if not loop.last %}\n\n\n{% endif %}\n{% endif %}\n{% endfor %}\n{% if "
        "add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n### Response:\n{% endif %}\n"),
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}\n"),
    "exaone": (
        "{% for message in messages %}\n    {% if loop.first and message['role'] != 'system' %}\n        "
        "{{ '[|system|][|endofturn|]\\n' }}\n    {% endif %}\n    {{ '[|' + message['role'] + '|]' + "
        "message['content'] }}\n    {% if message['role'] == 'user' %}\n        {{ '\\n' }}\n    {% else %}\n"
        "        {{ '[|endofturn|]\\n' }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n    "
        "{{ '[|assistant|]' }}\n{% endif %}\n"),
    "llama3": (
        "{% set loop_messages = messages %}\n{% for message in loop_messages %}\n{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}\n{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n"
        "{{ content }}\n{% endfor %}\n{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
        "<|end_header_id|>\\n\\n' }}{% endif %}\n"),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    "
        "{%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == "
        "'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, "
        "conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if "
        "message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            "
        "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n"
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif "
        "message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"),
}


def check(spec: str, donor: Path) -> None:
    """Refuse, before any work, a template mergekit would refuse or that has no tokenizer to go with."""
    if not (donor / "tokenizer_config.json").is_file():
        raise RecipeError(f"chat_template: {donor} has no tokenizer (tokenizer_config.json) to attach it to")
    if spec != "auto" and spec not in BUILTIN and (len(spec) < 20 or "{" not in spec):
        raise RecipeError(f"chat_template: '{spec:.40}' is neither a built-in name ({', '.join(BUILTIN)}, auto) "
                          "nor a Jinja template")


def _own_template(folder: Path) -> str | None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 (an input without a loadable tokenizer has no vote, as in mergekit)
        return None
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if template else None


def resolve(spec: str, folders: list[Path]) -> str | None:
    """The template text for `spec`; for `auto`, the most common among `folders` (None: none has one)."""
    if spec == "auto":
        votes = [t for t in (_own_template(f) for f in folders) if t]
        return Counter(votes).most_common(1)[0][0] if votes else None
    return BUILTIN.get(spec, spec)


def write(spec: str, donor: Path, folders: list[Path], out: Path) -> None:
    """Re-save `donor`'s tokenizer into `out` with the chat template `spec`, as mergekit does."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(donor)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{donor}: cannot load its tokenizer to set the chat template ({e})") from None
    template = resolve(spec, folders)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(out)
