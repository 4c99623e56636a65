"""Build a tiny random-weight Llama and a WordLevel tokenizer offline (no downloads).

Used by the vLLM end-to-end tests and ``bench/vllm_ttft.py``; the weights come from a
fixed seed, so two builds with the same arguments are byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path


def build_model(
    path: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a Llama checkpoint (``hidden // heads`` must be a head size vLLM's CPU
    backend supports: 32, 64, 80, ...) and its tokenizer to ``path``; return ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(path)
    (path / "kvtier-tiny.json").write_text(json.dumps({"hidden": hidden, "layers": layers}))
    return path


if __name__ == "__main__":
    import sys

    build_model(Path(sys.argv[1]))
