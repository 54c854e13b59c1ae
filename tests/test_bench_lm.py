"""The LM quality track scores a model from cached lower-block states and a shared prompt prefix
(benchmarks/quality/lm.py). Those shortcuts must give what the whole model gives on the whole prompt: checked here
on a small random Llama built on the fly, against transformers' own forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality import lm  # noqa: E402

N_LAYERS, SPLIT = 4, 2


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def prompts_with_shared_prefix(n: int = 5) -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 97, (7,), generator=gen).tolist()
    rests = [torch.randint(3, 97, (int(k),), generator=gen).tolist() for k in torch.randint(1, 6, (n,), generator=gen)]
    return prefix, rests


def last_token_logits_of_whole_prompts(model, prefix, rests) -> torch.Tensor:
    """Reference: every prompt alone through the unmodified model."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([prefix + r])).logits[0, -1] for r in rests])


def lower_states(path: Path, prefix, rests) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What lm.FrozenPart caches: the states entering block SPLIT, for the shared prefix and for each remainder."""
    with torch.no_grad():
        lower = lm.blocks(lm.load_model(path), 0, SPLIT)
        prefix_states, kv = lm.run_prefix(lower, torch.tensor(prefix))
        hidden, _ = lm.run_rest(lower, kv, [torch.tensor(r) for r in rests])
    return prefix_states, [hidden[i, :len(r)] for i, r in enumerate(rests)]


def split_path_logits(path: Path, prefix, rests) -> torch.Tensor:
    """What lm.evaluate computes: the upper blocks from the cached states, the prefix run once."""
    prefix_states, states = lower_states(path, prefix, rests)
    with torch.no_grad():
        upper = lm.blocks(lm.load_model(path), SPLIT).eval()
        _, upper_kv = lm.run_prefix(upper, prefix_states)
        return lm.answer_logits(upper, upper_kv, states)


def test_cached_states_and_shared_prefix_give_the_whole_models_logits(tmp_path):
    model = tiny_llama()
    model.save_pretrained(str(tmp_path / "m"))
    prefix, rests = prompts_with_shared_prefix()
    expected = last_token_logits_of_whole_prompts(model, prefix, rests)
    got = split_path_logits(tmp_path / "m", prefix, rests)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradients_through_the_shared_prefix_match_the_whole_prompt(tmp_path):
    """Fine-tuning runs the prefix once per batch with gradients; the loss and its gradient must be the whole model's."""
    model = tiny_llama()
    model.save_pretrained(str(tmp_path / "m"))
    prefix, rests = prompts_with_shared_prefix(3)
    target = torch.tensor([5, 6, 7])

    model.train()
    whole = torch.stack([model(input_ids=torch.tensor([prefix + r])).logits[0, -1] for r in rests])
    torch.nn.functional.cross_entropy(whole, target).backward()
    expected = {n: p.grad for n, p in model.model.layers[SPLIT:].named_parameters()}

    prefix_states, states = lower_states(tmp_path / "m", prefix, rests)
    upper = lm.blocks(lm.load_model(tmp_path / "m"), SPLIT).train()
    _, upper_kv = lm.run_prefix(upper, prefix_states)
    logits = lm.answer_logits(upper, upper_kv, states)
    torch.nn.functional.cross_entropy(logits, target).backward()
    got = dict(upper.model.layers.named_parameters())
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_digest_sees_the_lower_blocks_only(tmp_path):
    model = tiny_llama()
    model.save_pretrained(str(tmp_path / "base"))
    model.save_pretrained(str(tmp_path / "copy"))
    with torch.no_grad():
        model.model.layers[N_LAYERS - 1].mlp.up_proj.weight.add_(1.0)
    model.save_pretrained(str(tmp_path / "upper_changed"))
    with torch.no_grad():
        model.model.layers[SPLIT - 1].input_layernorm.weight.add_(1e-3)
    model.save_pretrained(str(tmp_path / "lower_changed"))
    digest = {d: lm.frozen_digest(tmp_path / d, SPLIT) for d in ("base", "copy", "upper_changed", "lower_changed")}
    assert digest["base"] == digest["copy"] == digest["upper_changed"]
    assert digest["lower_changed"] != digest["base"]
