"""Tensor names and shapes of Llama-family decoders (Llama, Mistral, Qwen2) from their config.json.

Used to generate synthetic checkpoints and to plan a merge from config.json alone (no weights present).
"""

from __future__ import annotations

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}


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
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes
