"""Tiny models built locally from configs (no download), for the demo, the test suite and benchmarks.

Hidden and intermediate sizes are multiples of 128 so group-128 INT4 applies to every Linear. Weights are
transformers' own random init (seeded): fine for structure and equality checks, no proxy for quality.
"""

from __future__ import annotations

from pathlib import Path

_LLAMA_LIKE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=512,
)

PRESETS: dict[str, dict] = {
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=64, tie_word_embeddings=False,
                  **_LLAMA_LIKE),
    "qwen3-tied": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=64,
                       tie_word_embeddings=True, **_LLAMA_LIKE),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False, **_LLAMA_LIKE),
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=False, **_LLAMA_LIKE),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], tie_word_embeddings=False,
                    **_LLAMA_LIKE),
    # About 100M parameters: the size quoted in the project's closing notes and benchmarks.
    "qwen3-100m": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=768,
                       intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                       num_key_value_heads=4, head_dim=64, vocab_size=32768, max_position_embeddings=2048,
                       tie_word_embeddings=False),
}

CORPUS = (
    "qexport exports quantized language models. The quick brown fox jumps over the lazy dog. "
    "Int4 weights are packed eight to a word; int8 weights keep one scale per channel. "
    "Tokenizers, configs and manifests travel with every export folder. 0123456789 !?.,;:'\"()[]{}"
)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a fixed sentence: offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(out: str | Path, preset: str = "qwen3", *, dtype: str = "bfloat16", seed: int = 0,
                     max_shard_size: str | int = "5GB", overrides: dict | None = None,
                     norm_noise: float = 0.0) -> Path:
    """Build a randomly initialised model from a preset and save it as a Hugging Face folder with a tokenizer.

    `overrides` replace config keys (e.g. initializer_range); `norm_noise` > 0 multiplies every normalization
    weight (initialised to ones) by 1 + norm_noise * N(0, 1), so that logits are less uniform than random init's.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    spec = {**PRESETS[preset], **(overrides or {})}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if norm_noise:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name and param.dim() == 1:
                    param.mul_(1 + norm_noise * torch.randn(param.shape, dtype=torch.float32).to(param.dtype))
    out = Path(out)
    # transformers draws a "Writing model shards" bar on stderr even for one small file: noise in the demo's output.
    from transformers.utils import logging as hf_logging

    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    tokenizer = build_tokenizer(min(512, config.vocab_size))
    tokenizer.save_pretrained(out)
    GenerationConfig(max_new_tokens=16, eos_token_id=tokenizer.eos_token_id).save_pretrained(out)
    return out
