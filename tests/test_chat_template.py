"""`chat_template:` gives the merged model's tokenizer its template, checked through transformers itself:
the output tokenizer, loaded with AutoTokenizer, renders a conversation as each format is defined (expected
strings written by hand here), `auto` takes the template most input models have, and a Jinja string is kept as
given. With mergekit installed, the built-in templates render the same text as mergekit's, up to whitespace."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_user_error, run_cli, write_config

from distmerge.chat_templates import BUILTIN
from distmerge.synthetic import make_family

transformers = pytest.importorskip("transformers")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
EXPECTED = {  # the tokenizer's bos and eos are <s> and </s>
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] 2+2? [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n"
              "### Response:\n",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"
              "[|user|]2+2?\n[|assistant|]",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    return make_family(tmp_path_factory.mktemp("chat"), n_experts=2, config=TINY, dtype=torch.float32)


def merge_with(tmp_path: Path, family: dict, chat_template, models=None, **top) -> Path:
    cfg = write_config(tmp_path / "cfg.yaml", "task_arithmetic", family, models=models,
                       **({"chat_template": chat_template} if chat_template is not None else {}), **top)
    run_cli("merge", cfg, tmp_path / "out", "--quiet", "--force")
    return tmp_path / "out"


def rendered(out: Path, messages=CONVERSATION) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_builtin_template_renders_its_format(tmp_path, family, name):
    out = merge_with(tmp_path, family, name)
    assert rendered(out) == EXPECTED[name]
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_a_jinja_string_is_kept_as_given_and_replaces_the_sources_template(tmp_path, family):
    """The tokenizer source's own template (here a chat_template.jinja) is replaced, not left to win."""
    source = tmp_path / "source"
    shutil.copytree(family["base"], source)
    (source / "chat_template.jinja").write_text("{{ 'old template' }}")
    template = "{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + ';' }}{% endfor %}"
    out = merge_with(tmp_path, family, template, tokenizer_source=str(source))
    assert (out / "chat_template.jinja").read_text() == template
    assert rendered(out) == "s:Be brief.;u:Hi there;a:Hello!;u:2+2?;"


def with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return dst


def test_auto_takes_the_template_most_models_have(tmp_path, family):
    one, two = "{{ 'one' }}", "{{ 'two' }}"
    experts = [with_template(family["experts"][0], tmp_path / "e1", two),
               with_template(family["experts"][1], tmp_path / "e2", two),
               with_template(family["experts"][1], tmp_path / "e3", one)]
    out = merge_with(tmp_path, family, "auto", models=[{"model": str(path)} for path in experts])
    assert rendered(out) == "two"  # two models against one; the base has none
    base = with_template(family["base"], tmp_path / "base", one)
    tie = merge_with(tmp_path, {**family, "base": base}, "auto", models=[{"model": str(experts[1])}])
    assert rendered(tie) == "one"  # one each: the base's


def test_auto_without_any_template_leaves_the_tokenizer_as_it_is(tmp_path, family):
    out = merge_with(tmp_path, family, "auto")
    assert not (out / "chat_template.jinja").exists()
    assert json.loads((out / "tokenizer_config.json").read_text()) == json.loads(
        (Path(family["base"]) / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("value, args, fragments", [
    ("chatmlx", [], ["chat_template: 'chatmlx'", "built-in template (alpaca, chatml"]),
    ("chatml", ["--no-copy-tokenizer"], ["chat_template", "--no-copy-tokenizer"]),
    (7, [], ["chat_template: 7"]),
])
def test_bad_chat_templates_are_one_error(tmp_path, family, value, args, fragments):
    cfg = write_config(tmp_path / "cfg.yaml", "task_arithmetic", family, chat_template=value)
    assert_user_error(run_cli("merge", cfg, tmp_path / "out", *args, check=False), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.peers
def test_builtin_templates_render_mergekits_text_up_to_whitespace():
    """mergekit 0.1.5's templates of the same names, read from its installed package: chatml and mistral render
    the same text; alpaca, exaone and llama3 the same text once whitespace is removed (mergekit's put newlines
    and indentation where the formats have none, see docs/methods.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from peers.venvs import MERGEKIT, ensure_peer_venv

    python, _ = ensure_peer_venv(MERGEKIT, MERGEKIT.default_venv, log=lambda message: None)
    script = ("import importlib.resources, json, mergekit._data.chat_templates as t\n"
              f"print(json.dumps({{n: importlib.resources.files(t).joinpath(n + '.jinja').read_text() "
              f"for n in {sorted(BUILTIN)!r}}}))")
    theirs = json.loads(subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                                       check=True).stdout)
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(template: str) -> str:
        return render_jinja_template([CONVERSATION], chat_template=template, add_generation_prompt=True,
                                     bos_token="<s>", eos_token="</s>")[0][0]

    for name in sorted(BUILTIN):
        ours, mergekits = render(BUILTIN[name]), render(theirs[name])
        assert ours == EXPECTED[name]
        if name in ("chatml", "mistral"):
            assert ours == mergekits, name
        else:
            assert re.sub(r"\s", "", ours) == re.sub(r"\s", "", mergekits), name
