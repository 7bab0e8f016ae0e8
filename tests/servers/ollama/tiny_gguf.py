"""Writes a tiny llama-architecture GGUF for the Ollama driver's tests (sidecar/tests/ollama.rs):
hidden 64, 2 layers, 4 heads, feed-forward 4096 (so that the model holds ≈7 MB: more than the
sidecar's 1 MiB noise floor), a 270-token vocabulary (specials + the 256 byte tokens + a few
words), F32 random weights. It loads and answers (nonsense); it is a model only in form.

Usage: python tiny_gguf.py OUT.gguf [SEED]
Different seeds give different weights, so that models written with them are distinct to
Ollama (it keys loaded models by their blob: two names of one blob share one runner).
"""

import sys

import numpy as np
from gguf import GGUFWriter, TokenType

HIDDEN, LAYERS, HEADS, FFN, CONTEXT = 64, 2, 4, 4096, 2048


def main(out: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(TokenType.BYTE)
    for word in ["\u2581the", "\u2581a", "\u2581model", "\u2581pool", "\u2581is", "\u2581ok",
                 "\u2581hello", "\u2581world", "\u2581tiny", "\u2581load", "\u2581unload"]:
        tokens.append(word.encode())
        types.append(TokenType.NORMAL)
    vocab = len(tokens)

    w = GGUFWriter(out, "llama")
    w.add_name("modelpool-tiny")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    tensor("output.weight", vocab, HIDDEN)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7)
