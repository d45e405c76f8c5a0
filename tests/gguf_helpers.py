"""A tiny GGUF file written from the tiny test Llama and tokenizer, as llama.cpp's
converter would write it (F32 tensors, q/k rows permuted for llama.cpp's rotary layout,
the tokenizer as a sentencepiece-style vocabulary with its merges)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a q or k projection (transformers undoes it on load)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path
) -> Path:
    """Write `model` and `tokenizer` to the GGUF file `path` and return it."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])]
    added = {token["id"]: token["content"] for token in state["added_tokens"]}
    for index, content in added.items():
        tokens[index] = content
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    writer.add_token_merges(
        [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
    )
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    for name, tensor in model.state_dict().items():
        if name in _TENSORS:
            gguf_name = _TENSORS[name]
        else:
            _, _, layer, *rest = name.split(".")
            kind = ".".join(rest[:-1])
            gguf_name = f"blk.{layer}.{_LAYER_TENSORS[kind]}.weight"
            if kind == "self_attn.q_proj":
                tensor = _rotary_permute(tensor, config.num_attention_heads)
            elif kind == "self_attn.k_proj":
                tensor = _rotary_permute(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
