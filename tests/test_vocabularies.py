"""Merging models whose vocabularies differ: `tokenizer_source: union | base | MODEL` and the `tokenizer:` block.

Three tiny Llama models with real WordLevel tokenizers (built with the `tokenizers` library) whose vocabularies
differ: `a` reorders the base's ids and adds a token, `b` lacks one of the base's tokens and adds a plain and a
special token. The expected output rows are written out token by token from mergekit 0.1.5's rules
(docs/methods.md, Vocabularies): each model's own row where it has the token, else the token's fill row; the merge
itself is `linear` (a weighted mean of the permuted rows) or `task_arithmetic`, computed here from those rows.
The `peers` test runs mergekit 0.1.5 itself on the same configs and compares every tensor and the vocabulary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_user_error, run_cli

from distmerge.architecture import llama_config
from distmerge.config import TokenEmbedding, TokenizerSettings, parse_config
from distmerge.synthetic import random_base, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<unk>", "<s>", "</s>"]
BASE_VOCAB = SPECIALS + ["a", "b", "c", "d", "e"]
A_VOCAB = SPECIALS + ["e", "b", "c", "d", "a", "f"]  # a and e swap ids; f is new
B_VOCAB = SPECIALS + ["a", "b", "c", "e", "g"]  # no d; g is new; and the special <tool> after them
B_ADDED = ["<tool>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def write_tokenizer(path: Path, vocab: list[str], added: list[str] = ()) -> None:
    """A WordLevel tokenizer with `vocab` at ids 0.. and `added` special tokens after them."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + list(added)])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


def write_model(path: Path, vocab: list[str], added: list[str] = (), seed: int = 0,
                tie: bool = False) -> dict[str, torch.Tensor]:
    """A tiny Llama whose embedding and head have one row per token; returns its tensors (float32)."""
    config = llama_config(hidden=16, intermediate=32, layers=2, heads=4, kv_heads=2, vocab=len(vocab) + len(added),
                          tie=tie)
    tensors = random_base(config, seed)
    save_checkpoint(path, tensors, config, dtype=torch.float32, tokenizer=False)
    write_tokenizer(path, vocab, added)
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (path, tensors, token -> row)} for the base, a and b."""
    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for seed, (name, vocab, added) in enumerate((("base", BASE_VOCAB, []), ("a", A_VOCAB, []),
                                                 ("b", B_VOCAB, B_ADDED))):
        tensors = write_model(root / name, vocab, added, seed)
        out[name] = (root / name, tensors, {token: i for i, token in enumerate(vocab + added)})
    return out


def merge(tmp_path: Path, models: dict, method: str, weights: dict, **top) -> Path:
    doc = {"merge_method": method, **({"base_model": str(models["base"][0])} if method != "linear" else {}),
           "models": [{"model": str(models[name][0]), "parameters": {"weight": w}} for name, w in weights.items()],
           "dtype": "float32", **top}
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    run_cli("merge", cfg, "-o", out, "--quiet")
    return out


def rows(models: dict, name: str, tensor: str, table: dict[str, object], size: int) -> torch.Tensor:
    """Model `name`'s expected rows: for each output token, its own row or the fill row `table` gives (a model
    name: that model's row of the token; ("row", model, token): that model's row of another token; "zero"), then
    padding rows, each the mean of the rows above them."""
    _, tensors, vocab = models[name]
    weight = tensors[tensor]
    out = []
    for token, fill in table.items():
        if fill is None:
            out.append(weight[vocab[token]])
        elif fill == "zero":
            out.append(torch.zeros(weight.shape[1]))
        elif isinstance(fill, tuple):
            _, model, other = fill
            out.append(models[model][1][tensor][models[model][2][other]])
        else:
            out.append(models[fill][1][tensor][models[fill][2][token]])
    out = torch.stack(out)
    padding = out.mean(dim=0).expand(size - len(out), -1)
    return torch.cat([out, padding])


def output_vocab(out: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out)).get_vocab()


def load(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def check_loads(out: Path, size: int) -> None:
    from transformers import AutoModelForCausalLM

    assert json.loads((out / "config.json").read_text())["vocab_size"] == size
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == size


# Each output token's fill row per model, where it lacks the token (None: it has it). Inputs in mergekit's order:
# a, b (listed), then the base.
UNION = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "g", "<tool>"]  # the base's, a's f, b's g, <tool>
UNION_FILLS = {
    "base": {"f": "a", "g": "b", "<tool>": "b"},  # only one model has each: its row
    "a": {"g": "b", "<tool>": "b"},
    "b": {"d": "base", "f": "a"},  # d: a and the base have it, the base's row wins over the mean
}


def table(order: list[str], fills: dict[str, object]) -> dict[str, object]:
    return {token: fills.get(token) for token in order}


@pytest.mark.parametrize("pad", [None, 8])
def test_union_permutes_rows_and_fills_missing_tokens(tmp_path, models, pad):
    top = ({"tokenizer": {"source": "union", "pad_to_multiple_of": pad}} if pad else {"tokenizer_source": "union"})
    out = merge(tmp_path, models, "task_arithmetic", {"a": 1.0, "b": 0.5}, **top)
    size = 16 if pad else 11
    assert output_vocab(out) == {token: i for i, token in enumerate(UNION)}
    merged = load(out)
    for tensor in (EMBED, HEAD):
        base, a, b = (rows(models, name, tensor, table(UNION, UNION_FILLS[name]), size) for name in ("base", "a", "b"))
        assert merged[tensor].shape == (size, 16)
        torch.testing.assert_close(merged[tensor], base + 1.0 * (a - base) + 0.5 * (b - base), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["model.norm.weight"],
                               sum(w * models[n][1]["model.norm.weight"] for n, w in (("base", -0.5), ("a", 1.0),
                                                                                       ("b", 0.5))),
                               rtol=0, atol=1e-6)
    check_loads(out, size)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out))("a f g <tool>")["input_ids"] == [3, 8, 9, 10]


def test_the_plan_counts_the_rows_read_for_fills(tmp_path, models):
    """Reading an input's embedding (or head) reads those of the inputs its fill rows come from: the base takes
    rows from a and b, a from b, b from the base and a (the union's fills above). Other tensors: once per input."""
    from distmerge.estimates import bytes_read
    from distmerge.plan import build_plan

    doc = {"merge_method": "task_arithmetic", "base_model": str(models["base"][0]),
           "models": [{"model": str(models[n][0])} for n in "ab"], "tokenizer_source": "union"}
    plan = build_plan(parse_config(yaml.safe_dump(doc)))
    row = 16 * 4
    vocabulary_rows = (8 + 9 + 9) + (9 + 9) + (9 + 8 + 9)  # base + a + b, a + b, b + base + a
    others = sum(t.numel() * 4 for name, t in models["base"][1].items() if name not in (EMBED, HEAD))
    assert bytes_read(plan) == 2 * vocabulary_rows * row + 3 * others


def test_a_models_tokenizer(tmp_path, models):
    """`tokenizer_source: a`: a's 9 tokens at a's ids; the base and b lack f (only a has it), b lacks d (a and the
    base have it: the base's row)."""
    out = merge(tmp_path, models, "task_arithmetic", {"a": 2.0, "b": 1.0}, tokenizer_source=str(models["a"][0]))
    assert output_vocab(out) == {token: i for i, token in enumerate(A_VOCAB)}
    merged = load(out)
    fills = {"base": {"f": "a"}, "a": {}, "b": {"d": "base", "f": "a"}}
    for tensor in (EMBED, HEAD):
        base, a, b = (rows(models, name, tensor, table(A_VOCAB, fills[name]), 9) for name in ("base", "a", "b"))
        torch.testing.assert_close(merged[tensor], base + 2 * (a - base) + (b - base), rtol=0, atol=1e-6)
    check_loads(out, 9)


def test_without_a_base_several_models_share_a_mean(tmp_path, models):
    """No base model: d, which a and the base (here a plain model) have and b lacks, gets their mean in b."""
    out = merge(tmp_path, models, "linear", {"a": 1.0, "b": 1.0, "base": 1.0}, tokenizer_source="union")
    merged = load(out)
    a_d, base_d = (models[name][1][EMBED][models[name][2]["d"]] for name in ("a", "base"))
    want_d = (a_d + (a_d + base_d) / 2 + base_d) / 3
    # the union starts from the first model's tokenizer (a's) when there is no base
    vocab = output_vocab(out)
    assert [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])] == A_VOCAB + ["g", "<tool>"]
    torch.testing.assert_close(merged[EMBED][vocab["d"]], want_d, rtol=0, atol=1e-6)


def test_tokenizer_block_tokens_source_and_force(tmp_path, models):
    """The block: the base's vocabulary plus f and <new>; f's fill is b's row of g (a keeps its own f), a is forced
    to b's row of a in every model, c forced to row 0 of a, <new> is zeros; padded to a multiple of 4."""
    tokens = {"f": {"source": {"kind": "model_token", "model": str(models["b"][0]), "token": "g"}},
              "a": {"source": str(models["b"][0]), "force": True},
              "c": {"source": {"kind": "model_token", "model": str(models["a"][0]), "token_id": 0}, "force": True},
              "<new>": {"source": {"kind": "zero"}}}
    out = merge(tmp_path, models, "task_arithmetic", {"a": 0.7, "b": 0.4},
                tokenizer={"source": "base", "tokens": tokens, "pad_to_multiple_of": 4})
    order = BASE_VOCAB + ["f", "<new>"]
    assert output_vocab(out) == {token: i for i, token in enumerate(order)}
    forced = {"a": "b", "c": ("row", "a", "<unk>"), "<new>": "zero"}
    fills = {"base": {**forced, "f": ("row", "b", "g")}, "a": forced,
             "b": {**forced, "d": "base", "f": ("row", "b", "g")}}
    merged = load(out)
    for tensor in (EMBED, HEAD):
        base, a, b = (rows(models, name, tensor, table(order, fills[name]), 12) for name in ("base", "a", "b"))
        torch.testing.assert_close(merged[tensor], base + 0.7 * (a - base) + 0.4 * (b - base), rtol=0, atol=1e-6)
    check_loads(out, 12)


def test_matching_vocabularies_keep_todays_bytes(tmp_path, models):
    """`tokenizer_source: base` on models that share the base's vocabulary changes nothing: the same tensors and
    config as without it, and the base's tokenizer files copied as they are."""
    root = tmp_path / "same"
    for seed, name in enumerate(("base", "x", "y")):
        write_model(root / name, BASE_VOCAB, seed=seed)
    outs = {}
    for label, top in (("plain", {}), ("base", {"tokenizer_source": "base"}), ("union", {"tokenizer_source": "union"})):
        doc = {"merge_method": "ties", "base_model": str(root / "base"),
               "models": [{"model": str(root / n), "parameters": {"weight": 1.0, "density": 0.5}} for n in "xy"],
               **top}
        cfg = tmp_path / f"{label}.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        outs[label] = tmp_path / label
        run_cli("merge", cfg, "-o", outs[label], "--quiet", "--no-write-model-card")
    for label in ("base", "union"):
        for name in ("model-00001-of-00001.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (outs[label] / name).read_bytes() == (outs["plain"] / name).read_bytes(), (label, name)
    assert (outs["base"] / "tokenizer.json").read_bytes() == (root / "base" / "tokenizer.json").read_bytes()


def test_tied_embeddings_and_a_chat_template(tmp_path):
    """Tied models: only the embedding is laid out and merged (the loader ties the head to it); the output
    tokenizer carries the chat template as transformers saves one, also with --no-copy-tokenizer."""
    for seed, (name, vocab, added) in enumerate((("base", BASE_VOCAB, []), ("a", A_VOCAB, []),
                                                 ("b", B_VOCAB, B_ADDED))):
        write_model(tmp_path / name, vocab, added, seed, tie=True)
    models = {name: (tmp_path / name, load(tmp_path / name), {t: i for i, t in enumerate(vocab)})
              for name, vocab in (("base", BASE_VOCAB), ("a", A_VOCAB), ("b", B_VOCAB + B_ADDED))}
    doc = {"merge_method": "linear", "models": [{"model": str(tmp_path / n)} for n in ("a", "b")],
           "tokenizer_source": "union", "chat_template": "chatml"}
    cfg = tmp_path / "tied.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    run_cli("merge", cfg, "-o", out, "--quiet", "--no-copy-tokenizer")
    merged = load(out)
    assert HEAD not in merged
    order = A_VOCAB + ["g", "<tool>"]  # no base: the union starts from a's tokenizer
    a, b = (rows(models, name, EMBED, table(order, fills), 11) for name, fills in
            (("a", {"g": "b", "<tool>": "b"}), ("b", {"d": "a", "f": "a"})))
    torch.testing.assert_close(merged[EMBED], (a + b) / 2, rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    check_loads(out, 11)
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_a_frankenmerge_takes_the_embedding_from_the_first_slice_and_the_head_from_the_last(tmp_path, models):
    """passthrough of the base's layer 0 and a's layer 1 over the union of their vocabularies (the base's, then
    a's f): the embedding is the base's alone, so f, which it lacks and no other input of that tensor has, is zeros;
    the head is a's alone, which has every token."""
    base, a = str(models["base"][0]), str(models["a"][0])
    doc = {"merge_method": "passthrough", "tokenizer_source": "union",
           "slices": [{"sources": [{"model": base, "layer_range": [0, 1]}]},
                      {"sources": [{"model": a, "layer_range": [1, 2]}]}]}
    cfg = tmp_path / "franken.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    run_cli("merge", cfg, "-o", out, "--quiet")
    order = BASE_VOCAB + ["f"]
    assert output_vocab(out) == {token: i for i, token in enumerate(order)}
    merged = load(out)
    assert torch.equal(merged[EMBED], rows(models, "base", EMBED, table(order, {"f": "zero"}), 9))
    assert torch.equal(merged[HEAD], rows(models, "a", HEAD, table(order, {}), 9))
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], models["a"][1]["model.layers.1.mlp.up_proj.weight"])
    check_loads(out, 9)


def test_bad_token_settings_are_refused(tmp_path, models):
    for tokens, wanted in (({"d": {"force": True}}, "tokenizer.tokens.d`: not every model has this token"),
                           ({"d": {"source": str(models["b"][0])}}, f"model {models['b'][0]} does not have this"),
                           ({"g": {"source": {"kind": "model_token", "model": str(models["a"][0]), "token": "zz"}}},
                            "has no token 'zz'"),
                           ({"g": {"source": {"kind": "nothing"}}}, "kind: 'nothing'` is not allowed")):
        doc = {"merge_method": "linear", "models": [{"model": str(models[n][0])} for n in ("base", "a", "b")],
               "tokenizer": {"source": "union", "tokens": tokens}}
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet", check=False), wanted)
    doc = {"merge_method": "linear", "models": [{"model": str(models[n][0])} for n in ("base", "a")],
           "tokenizer_source": "union", "tokenizer": {"source": "union"}}
    cfg.write_text(yaml.safe_dump(doc))
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet", check=False),
                      "gives both `tokenizer_source` and `tokenizer`")
    doc = {"merge_method": "linear", "models": [{"model": str(models[n][0])} for n in ("base", "a")]}
    cfg.write_text(yaml.safe_dump(doc))
    assert_user_error(run_cli("merge", cfg, "-o", tmp_path / "out", "--quiet", check=False),
                      "lm_head.weight has shape [9, 16]", "set `tokenizer_source` (union, base or a model)")


def test_the_block_reads_back_from_the_model_card_yaml():
    text = """
merge_method: linear
models: [{model: x}, {model: y}]
tokenizer:
  source: y
  pad_to_multiple_of: 64
  tokens:
    <a>: {source: {kind: zero}}
    <b>: {source: x, force: true}
    <c>: {source: {kind: model_token, model: y, token_id: 3}}
    <d>: {source: {kind: model_token, model: x, token: hi}}
"""
    config = parse_config(text)
    assert config.tokenizer == TokenizerSettings("y", (
        ("<a>", TokenEmbedding("zero")), ("<b>", TokenEmbedding("model", "x", force=True)),
        ("<c>", TokenEmbedding("model_token", "y", token_id=3)), ("<d>", TokenEmbedding("model_token", "x", "hi"))),
        64)
    assert parse_config(config.to_yaml()).tokenizer == config.tokenizer


@pytest.mark.peers
def test_same_tensors_and_vocabulary_as_mergekit(tmp_path, models):
    """union, a model's tokenizer, the block with tokens, force and padding, and slices (TIES, a frankenmerge)
    through `mergekit-yaml` (0.1.5, its scratch venv) and distmerge: the same tokenizer.json, every tensor the same
    bytes (round-off for linear). The models are the base, a and c (b without its plain new token g): mergekit
    orders the models of a union as a Python set, so where two models bring new tokens their ids change from run
    to run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from peers.venvs import MERGEKIT, ensure_peer_venv

    peer_python, _ = ensure_peer_venv(MERGEKIT)
    c = tmp_path / "c"
    write_model(c, SPECIALS + ["a", "b", "c", "e"], B_ADDED, seed=7)  # b without g
    base, a, b = (str(models[n][0]) for n in ("base", "a", "b"))
    # mergekit 0.1.5 fails on `source: base` with tokens the base lacks (KeyError in PermutedVocabulary: it adds them
    # to the base's own tokenizer, whose vocab_size then excludes them), so the block's case is a union
    tokens = {"f": {"source": {"kind": "model_token", "model": str(c), "token": "e"}},
              "a": {"source": str(c), "force": True}, "<new>": {"source": {"kind": "zero"}}}
    ties = {"weight": 1.0, "density": 0.5}
    cases = {
        "union": ("ties", [a, str(c)], {"tokenizer_source": "union"}),
        # padding rows are copies of one row, so their magnitudes tie exactly: TIES's top-k would then keep different
        # copies (distmerge breaks ties by position, README "Coming from mergekit"); task arithmetic keeps them all
        "union padded": ("task_arithmetic", [a, str(c)], {"tokenizer": {"source": "union", "pad_to_multiple_of": 8}}),
        "model": ("linear", [base, a, b], {"tokenizer_source": a}),
        "block": ("task_arithmetic", [a, str(c)], {"tokenizer": {"source": "union", "tokens": tokens,
                                                                 "pad_to_multiple_of": 4}}),
        # slices: the embedding merged over the first slice's sources, the head over the last's
        "ties slices": ("ties", [{"sources": [{"model": m, "layer_range": [0, 1], "parameters": ties}
                                              for m in (base, a, str(c))]},
                                 {"sources": [{"model": m, "layer_range": [1, 2], "parameters": ties}
                                              for m in (base, str(c), a)]}], {"tokenizer_source": "union"}),
        "frankenmerge": ("passthrough", [{"sources": [{"model": str(c), "layer_range": [0, 2]}]},
                                         {"sources": [{"model": a, "layer_range": [1, 2]}]}],
                         # a model's tokenizer: with no base model, mergekit's union starts from a model of a set
                         {"tokenizer": {"source": str(c), "pad_to_multiple_of": 8}}),
    }
    for label, (method, paths, top) in cases.items():
        doc = {"merge_method": method, **({"base_model": base} if method not in ("linear", "passthrough") else {}),
               "dtype": "float32", **top}
        if isinstance(paths[0], dict):
            doc["slices"] = paths
        else:
            doc["models"] = [{"model": p, "parameters": {"weight": w, **({"density": 0.5} if method == "ties" else {})}}
                             for p, w in zip(paths, (1.0, 0.7, 0.4))]
        cfg = tmp_path / f"{label}.yaml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        theirs_dir, ours_dir = tmp_path / f"mk-{label}", tmp_path / f"dm-{label}"
        subprocess.run([str(peer_python.parent / "mergekit-yaml"), str(cfg), str(theirs_dir), "--no-lazy-unpickle",
                        "--quiet", "--no-write-model-card"], check=True, capture_output=True, timeout=600)
        run_cli("merge", cfg, "-o", ours_dir, "--quiet")
        assert output_vocab(ours_dir) == output_vocab(theirs_dir), label
        for key in ("vocab_size", "tie_word_embeddings"):
            assert (json.loads((ours_dir / "config.json").read_text())[key]
                    == json.loads((theirs_dir / "config.json").read_text())[key]), (label, key)
        assert (ours_dir / "tokenizer.json").read_bytes() == (theirs_dir / "tokenizer.json").read_bytes(), label
        ours, theirs = load(ours_dir), load(theirs_dir)
        assert set(ours) == set(theirs), label
        for name in theirs:
            if method == "linear":  # its weighted mean rounds differently in every tensor, vocabularies or not
                torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=f"{label}: {name}")
            else:
                assert torch.equal(ours[name], theirs[name]), f"{label}: {name} differs from mergekit's"


def write_bpe_model(path: Path, corpus: list[str], special: list[str], seed: int) -> None:
    """A tiny Llama with a byte-level BPE tokenizer (GPT-2's, Llama 3's and Qwen's kind) trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", *special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    config = llama_config(hidden=16, intermediate=32, layers=2, heads=4, kv_heads=2, vocab=tokenizer.get_vocab_size())
    save_checkpoint(path, random_base(config, seed), config, dtype=torch.float32, tokenizer=False)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>"}))


@pytest.mark.peers
def test_a_union_of_bpe_vocabularies_has_mergekits_rows_per_token(tmp_path):
    """Byte-level BPE tokenizers trained on different text (dozens of tokens new in each model), merged with TIES
    over their union by `mergekit-yaml` and distmerge: the same tokens, and every token's embedding and head rows
    the same bytes. Their ids differ: mergekit adds a model's new tokens in its vocabulary's hash-map order (and
    the models in set order), distmerge by id and in `models:` order."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from peers.venvs import MERGEKIT, ensure_peer_venv

    peer_python, _ = ensure_peer_venv(MERGEKIT)
    corpora = {"base": ["the cat sat on the mat", "a dog ran far away"],
               "a": ["the cat sat on the mat", "quantum physics rocks", "merging models is fun"],
               "b": ["a dog ran far away", "the cat sat", "zebra xylophone"]}
    for seed, (name, corpus) in enumerate(corpora.items()):
        write_bpe_model(tmp_path / name, corpus * 20, ["<|im_start|>"] if name == "b" else [], seed)
    doc = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "float32",
           "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0, "density": 0.5}} for n in "ab"],
           "tokenizer_source": "union"}
    cfg = tmp_path / "bpe.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    subprocess.run([str(peer_python.parent / "mergekit-yaml"), str(cfg), str(tmp_path / "mk"), "--no-lazy-unpickle",
                    "--quiet", "--no-write-model-card"], check=True, capture_output=True, timeout=600)
    run_cli("merge", cfg, "-o", tmp_path / "dm", "--quiet")
    ours_vocab, theirs_vocab = output_vocab(tmp_path / "dm"), output_vocab(tmp_path / "mk")
    assert set(ours_vocab) == set(theirs_vocab) and len(ours_vocab) > 300
    ours, theirs = load(tmp_path / "dm"), load(tmp_path / "mk")
    tokens = sorted(theirs_vocab)
    for name in theirs:
        if name in (EMBED, HEAD):
            rows_of = [ours_vocab[t] for t in tokens], [theirs_vocab[t] for t in tokens]
            assert torch.equal(ours[name][rows_of[0]], theirs[name][rows_of[1]]), name
        else:
            assert torch.equal(ours[name], theirs[name]), name
