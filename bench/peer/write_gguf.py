#!/usr/bin/env python3
"""Writes a Hugging Face Qwen3 or Llama directory (config.json, model.safetensors) as a GGUF file,
so llama.cpp runs the very weights troupe runs. The vocabulary is a placeholder of the model's
size (`tokenizer.ggml.model = "no_vocab"`): the benchmarks feed token ids, and llama.cpp's own
converter refuses tokenizers it does not know.

    python3 bench/peer/write_gguf.py --gguf-py LLAMA_CPP/gguf-py DIR OUT.gguf [--type f32|f16|q8_0]

For Qwen3, llama.cpp takes HF's layout unpermuted (it applies rotate-half RoPE itself); for Llama
its own converter permutes the q and k rows, and so does this script. Needs numpy; reads
safetensors (bf16, f16 or f32) without the safetensors package.
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


def read_safetensors(path):
    """Every tensor of a .safetensors file as an f32 numpy array, by name."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = data[base + start : base + end].view(DTYPES[meta["dtype"]])
        if meta["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float32).reshape(meta["shape"])
    return out


def tensors(dir):
    index = dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(read_safetensors(dir / f))
    return out


def permute(w, heads):
    """HF's rotate-half q/k rows into the interleaved order llama.cpp's Llama expects."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--gguf-py", type=Path, required=True, help="llama.cpp's gguf-py directory")
    p.add_argument("--type", choices=["f32", "f16", "q8_0"], default="f32")
    a = p.parse_args()
    sys.path.insert(0, str(a.gguf_py))
    import gguf  # noqa: E402 (found through --gguf-py)

    c = json.loads((a.dir / "config.json").read_text())
    arch = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}[c["architectures"][0]]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    theta = c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta", 10000.0)

    w = gguf.GGUFWriter(str(a.out), arch)
    w.add_context_length(c.get("max_position_embeddings", 4096))
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    w.add_tokenizer_model("no_vocab")
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[a.type]
    )

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in tensors(a.dir).items():
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.get("tie_word_embeddings"):
                continue
            out = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module...>.weight
            module = ".".join(parts[3:-1])
            out = f"blk.{parts[2]}.{names[module]}.{parts[-1]}"
            if arch == "llama" and module == "self_attn.q_proj":
                t = permute(t, heads)
            if arch == "llama" and module == "self_attn.k_proj":
                t = permute(t, kv_heads)
        # Norms stay f32; matrices take the chosen width (Q8_0: blocks of 32 along each row, as
        # llama.cpp's own quantizer writes them, the embedding included).
        if a.type == "f16" and t.ndim == 2:
            t = t.astype(np.float16)
        if a.type == "q8_0" and t.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            t = gguf.quants.quantize(np.ascontiguousarray(t, dtype=np.float32), q8)
            w.add_tensor(out, t, raw_dtype=q8)
            continue
        w.add_tensor(out, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
