"""`chat_template:` in a merge config: the chat template the merged model's tokenizer gets.

`auto` takes the template most of the input models have (the base first, then `models:` in order, on a tie);
a built-in name takes one of `BUILTIN`; anything else is a Jinja template itself. The template is written as
transformers 5 saves one: `chat_template.jinja` beside the tokenizer, and no `chat_template` key left in
`tokenizer_config.json` to contradict it.

The built-in templates are distmerge's own, each rendering its format as the model family defines it. mergekit
0.1.5 ships templates of the same names; chatml and mistral render the same text as mergekit's, and alpaca,
exaone and llama3 the same text except for whitespace (docs/methods.md says where).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import CheckpointError, ConfigError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

BUILTIN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('after an optional system message, roles must alternate user/assistant') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% set prefix = system_message + '\\n\\n' if loop.first and system_message is defined else '' %}"
        "{{ ' [INST] ' + prefix + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles, and a first system message') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% if system %}{{ system[-1]['content'] | trim + '\\n\\n' }}{% endif %}"
        "{% set sections = {'user': 'Instruction', 'user_context': 'Input', 'assistant': 'Response'} %}"
        "{% set turns = messages | rejectattr('role', 'equalto', 'system') | list %}"
        "{% for message in turns %}"
        "{% if message['role'] in sections %}"
        "{{ '### ' + sections[message['role']] + ':\\n' + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and turns and turns[-1]['role'] != 'assistant' %}"
        "{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def model_chat_template(directory: Path, ref: str) -> str | None:
    """The default chat template of the tokenizer in `directory`, as transformers finds it: chat_template.jinja
    first, else `chat_template` in tokenizer_config.json (a string, or named templates whose `default` counts)."""
    from .checkpoint import checkpoint_file

    jinja = checkpoint_file(ref, directory, TEMPLATE_FILE)
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    config_file = checkpoint_file(ref, directory, TOKENIZER_CONFIG)
    if config_file is None:
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"model {ref}: {directory / TOKENIZER_CONFIG} is not a JSON object") from None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) else None


def resolve_chat_template(value: str, inputs: list[tuple[str, Path]]) -> str | None:
    """The template `chat_template: value` means; `inputs` are (reference, directory) of the base and the models
    in config order. None for `auto` when no input model has a template."""
    if value == "auto":
        found = [t.strip() for t in (model_chat_template(path, ref) for ref, path in inputs) if t]
        if not found:
            return None
        counts = Counter(found)
        return max(found, key=lambda t: counts[t])  # max keeps the first of equals: the base, then models: order
    if value in BUILTIN:
        return BUILTIN[value]
    if "{" not in value or len(value) < 20:
        raise ConfigError(f"`chat_template: {value!r}` is neither auto, a built-in template "
                          f"({', '.join(sorted(BUILTIN))}) nor a Jinja template")
    return value


def tokenizer_files_with_template(template: str, tokenizer_config: Path | None) -> dict[str, bytes]:
    """The output's chat_template.jinja, and its tokenizer_config.json without a `chat_template` key."""
    files = {TEMPLATE_FILE: template.encode("utf-8")}
    if tokenizer_config is not None:
        config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        config.pop("chat_template", None)
        files[TOKENIZER_CONFIG] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files
