"""What a checkpoint holds, from its config.json: tensor names and shapes, and which weights are stored
transposed.

Used to generate synthetic checkpoints and to plan a merge from config.json alone (no weights present): any
architecture transformers knows (read from a model built on the meta device), else the Llama family's table.
"""

from __future__ import annotations

import fnmatch
import functools
import json

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}

# Linear layers stored [in, out] instead of nn.Linear's [out, in]: GPT-2's (and OpenAI GPT's) Conv1D.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt"}
CONV1D_WEIGHTS = ("*.c_attn.weight", "*.q_attn.weight", "*.c_proj.weight", "*.c_fc.weight")


def stored_transposed(config: dict, name: str) -> bool:
    """Whether tensor `name` of a checkpoint with this config.json is a linear layer's weight stored [in, out]."""
    return config.get("model_type") in CONV1D_MODEL_TYPES and any(
        fnmatch.fnmatchcase(name, pattern) for pattern in CONV1D_WEIGHTS)


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape for every tensor of a checkpoint with this config.json (`shapes_from_config`; the experts
    of a merge usually share their base's config, which is then built once)."""
    return dict(_shapes_of(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _shapes_of(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(shapes_from_config(json.loads(config_json)).items())


def shapes_from_config(config: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape for every tensor a checkpoint with this config.json holds, as transformers'
    `save_pretrained` writes it (tied weights once, mixture-of-experts weights one matrix per expert, as the
    original checkpoints are published). Built on the meta device: no memory, no weights. Without transformers,
    or for a model type it does not know, the Llama family's table (`llama_tensor_shapes`)."""
    try:
        import transformers
    except ImportError:
        return llama_tensor_shapes(config)
    if config.get("model_type") not in transformers.CONFIG_MAPPING:
        return llama_tensor_shapes(config)
    names = config.get("architectures") or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise ValueError(f"its architecture {names[0] if names else None!r} is not one transformers "
                         f"{transformers.__version__} has")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config warnings about a model that is only being measured
    try:
        return _saved_shapes(model_class, transformers.AutoConfig.for_model(**config))
    except Exception as exc:  # whatever transformers raises for a config it cannot build
        raise ValueError(f"transformers cannot build {names[0]} from it: {exc}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _saved_shapes(model_class, hf_config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = model_class(hf_config)
    state = model.state_dict()
    for name in model._keys_to_ignore_on_save or ():
        state.pop(name, None)
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def llama_config(hidden: int = 64, intermediate: int = 176, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 vocab: int = 256, tie: bool = False, dtype: str = "bfloat16", max_positions: int = 256) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": tie, "torch_dtype": dtype, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    }


def llama_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape for every tensor a LlamaForCausalLM-style checkpoint holds."""
    if config.get("model_type") not in LLAMA_FAMILY:
        raise ValueError(f"model_type {config.get('model_type')!r} is not a Llama-family decoder")
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
        if config.get("attention_bias") or config.get("model_type") == "qwen2":
            shapes.update({
                p + "self_attn.q_proj.bias": (heads * head_dim,),
                p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
            })
        if config.get("model_type") == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes
