"""A tiny random-init Qwen2.5-VL checkpoint that vLLM's CPU engine loads: config, weights, a small BPE
tokenizer with the Qwen special tokens and a ``Qwen2_5_VLProcessor``, saved with ``save_pretrained``.

LLM: width 128, 2 layers, head dim 64 (vLLM's CPU attention takes 64, not 16). Vision: width 32, 2 blocks
(the last full attention), 14-px patches, 2x2 merge, windows of 2x2 units. The q/k rows of each vision
qkv are re-initialised with a larger std, so attention is peaked and top-k choices are well separated, and
the LLM's matrices too, so that its logits are peaked and depend on the positions.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLM_STD = 0.1
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
SENTENCES = [
    "Describe the picture in one sentence.", "What is in this image?", "A cat sits on a red mat near the door.",
    "Two dogs run across a green field under a blue sky.", "The quick brown fox jumps over the lazy dog.",
    "Compare the two images and name what differs.", "user assistant system", "There is a small boat on the lake.",
]


# Qwen's chat layout, minus the system prompt: an image part becomes the image placeholder (for `vllm serve`).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def tiny_tokenizer():
    """A small byte-level BPE trained on SENTENCES with Qwen's special tokens and chat template:
    (the tokenizer, {special token: id})."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}


def peak_(model) -> None:
    """Re-initialises a random Qwen-VL in place (under the caller's seed): larger q/k rows in every vision
    block's fused qkv (peaked attention, well-separated top-k), and a larger std in the LLM's matrices
    (peaked logits that depend on the positions: at the default 0.02 a wrong M-RoPE position moves the
    first log-probabilities by only ~1e-3)."""
    for block in model.model.visual.blocks:
        qk_rows = 2 * block.attn.qkv.out_features // 3
        torch.nn.init.normal_(block.attn.qkv.weight[:qk_rows], std=0.5)
    for weight in [*model.model.language_model.parameters(), model.lm_head.weight]:
        if weight.dim() == 2:
            torch.nn.init.normal_(weight, std=LLM_STD)


def build_tiny_qwen2_5_vl(directory: str | Path, seed: int = 0, kind: str = "qwen2_5_vl",
                          max_units: int = 64) -> Path:
    """Writes the checkpoint into ``directory`` (created) and returns it; ``kind="qwen2_vl"``: a Qwen2-VL
    (no windows, vision MLP ratio 2) with the same LLM, tokenizer and image processor. The image processor
    resizes images to at most ``max_units`` merged tokens (2x2 patches of 14 px)."""
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer, ids = tiny_tokenizer()
    vocab = len(tokenizer)
    text = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=256, vocab_size=vocab, max_position_embeddings=4096,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                tie_word_embeddings=False)
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if kind == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=128)
        config_cls, model_cls, processor_cls = (transformers.Qwen2VLConfig,
                                                transformers.Qwen2VLForConditionalGeneration,
                                                transformers.Qwen2VLProcessor)
    else:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=128, window_size=56,
                      fullatt_block_indexes=[1])
        config_cls, model_cls, processor_cls = (transformers.Qwen2_5_VLConfig,
                                                transformers.Qwen2_5_VLForConditionalGeneration,
                                                transformers.Qwen2_5_VLProcessor)
    config = config_cls(
        vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|endoftext|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        peak_(model)
    model.save_pretrained(directory)
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                          min_pixels=28 * 28 * 4, max_pixels=28 * 28 * max_units)
    # Frames as the images: at most max_units merged tokens per slice (vLLM profiles with the largest video).
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                         size={"shortest_edge": 28 * 28 * 4,
                                                               "longest_edge": 28 * 28 * max_units},
                                                         max_frames=8)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                                                 video_processor=video_processor)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(directory)
    return directory


def image(width: int, height: int, seed: int):
    """A random RGB PIL image (sizes multiples of 28 keep the processor from resizing)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def video(width: int, height: int, frames: int, seed: int):
    """A random RGB video, uint8 [frames, height, width, 3] (numpy, as vLLM takes it)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, height, width, 3), generator=generator, dtype=torch.uint8).numpy()


IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def prompt(images: int, text: str = "Describe the picture in one sentence.", videos: int = 0) -> str:
    """The chat template's rendering of one user turn: ``images`` image placeholders, ``videos`` video
    placeholders (the layout of transformers' Qwen chat template: images, then videos), then ``text``."""
    return "<|im_start|>user " + IMAGE * images + VIDEO * videos + text + "<|im_end|><|im_start|>assistant "
