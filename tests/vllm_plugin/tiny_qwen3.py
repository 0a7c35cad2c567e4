"""Tiny random-init Qwen3-VL (DeepStack) and Qwen3.5 checkpoints that vLLM's CPU engine loads, beside
tiny_qwen.py's Qwen2.5-VL: config, weights, the same small BPE tokenizer and chat template, a
``Qwen3VLProcessor`` (16-px patches, 2x2 merge: 32-px units), saved with ``save_pretrained``.

LLM: width 128, 2 layers, head dim 64 (vLLM's CPU attention takes 64, not 16), interleaved M-RoPE; Qwen3.5's
first layer is a linear-attention (Gated DeltaNet) layer, its second full attention. Vision: width 32, 2 heads,
3 blocks, a 4x4 learned position table; Qwen3-VL takes DeepStack features from blocks 0 and 1. As in
tiny_qwen.py, the vision q/k rows and the LLM's matrices get a larger std (peaked attention and logits).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_qwen import CHAT_TEMPLATE, peak_, tiny_tokenizer

PATCH = 16
UNIT = 2 * PATCH  # pixels per merged token side
QK_NORM_GAIN = 4.0


def build_tiny_qwen3(directory: str | Path, kind: str = "qwen3_vl", seed: int = 0, max_units: int = 64) -> Path:
    """Writes a ``kind`` ("qwen3_vl" or "qwen3_5") checkpoint into ``directory`` (created) and returns it.
    The image processor resizes images to at most ``max_units`` merged tokens."""
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer, ids = tiny_tokenizer()
    text = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                intermediate_size=256, vocab_size=len(tokenizer), max_position_embeddings=4096,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=128, num_position_embeddings=16)
    if kind == "qwen3_vl":
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                     "mrope_interleaved": True})
        vision.update(deepstack_visual_indexes=[0, 1])
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    elif kind == "qwen3_5":
        text.update(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                    linear_num_value_heads=2, linear_key_head_dim=64, linear_value_head_dim=64,
                    linear_conv_kernel_dim=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                     "mrope_section": [8, 12, 12], "mrope_interleaved": True})
        config_cls, model_cls = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
    else:
        raise ValueError(f"kind must be 'qwen3_vl' or 'qwen3_5', got {kind!r}")
    config = config_cls(
        vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        peak_(model)
        if kind == "qwen3_5":
            # Qwen3.5's q/k RMSNorms scale by (1 + weight), zero-initialised: x4 makes its one full-attention
            # layer's scores peaked enough that an image token at a wrong position moves the first
            # log-probabilities well beyond bf16's noise (without it, by less than that noise).
            for name, weight in model.model.language_model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    torch.nn.init.constant_(weight, QK_NORM_GAIN - 1.0)
    model.save_pretrained(directory)
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=PATCH, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": UNIT * UNIT * 4, "longest_edge": UNIT * UNIT * max_units})
    video_processor = transformers.Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2)
    processor = transformers.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                              video_processor=video_processor)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(directory)
    return directory
