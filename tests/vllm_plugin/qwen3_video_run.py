"""Runs one vLLM engine on a Qwen3-VL checkpoint with a VIDEO prompt (and optionally an image) and writes the
result as JSON (test_vllm_qwen3.py: Qwen3-VL videos pruned per temporal slice).

    python tests/vllm_plugin/qwen3_video_run.py MODEL HF_OVERRIDES_JSON MAX_NUM_BATCHED_TOKENS WITH_IMAGE OUT.json
        [PIXELS.pt]

OUT: {"prompt" (token ids), "tokens" (greedy), "first_logprobs": {token id: logprob}}. A random 4-frame
128x160 video (resized by the processor to 192x224: 2 temporal slices of 6x7 units), with WITH_IMAGE=1 then
tiny_qwen's 288x224 image. PIXELS: where to torch.save the ``pixel_values_videos`` / ``video_grid_thw`` the
tower embeds (the transformers side's video input: its video processor needs torchvision, which the project
venv lacks); the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so wrapping the model class's
``embed_multimodal`` sees them. vLLM 0.32 rescales and normalizes Qwen3 pixels in the tower
(``mm_device_do_normalize``): the saved pixels are the tower's ``input_norm`` of the ones the model is given,
what transformers' processor gives.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np  # noqa: E402
from tiny_qwen import IMAGE, image  # noqa: E402

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def save_video_pixels(path: Path) -> None:
    """Wrap the plug-in's Qwen3 model class so that the last video pixels it embeds are saved at ``path``."""
    import torch

    from visionzip_kernels.integrations.vllm.qwen3 import VisionZipQwen3Mixin

    embed = VisionZipQwen3Mixin.embed_multimodal

    def embed_and_save(self, **kwargs):
        if kwargs.get("pixel_values_videos") is not None:
            pixels, grid = kwargs["pixel_values_videos"], kwargs["video_grid_thw"]
            pixels = torch.cat(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
            grid = torch.stack(list(grid)) if isinstance(grid, (list, tuple)) else grid
            pixels = self.visual.input_norm(pixels, torch.float32)
            torch.save({"pixel_values_videos": pixels.detach().cpu().float(),
                        "video_grid_thw": grid.detach().cpu().long().reshape(-1, 3)}, path)
        return embed(self, **kwargs)

    VisionZipQwen3Mixin.embed_multimodal = embed_and_save


def run(model: str, hf_overrides: dict, max_num_batched_tokens: int, with_image: bool) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model, hf_overrides=hf_overrides, dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_seqs=4, kv_cache_memory_bytes=1 << 28, seed=0, limit_mm_per_prompt={"image": 1, "video": 1},
              max_num_batched_tokens=max_num_batched_tokens, enable_chunked_prefill=True,
              enable_prefix_caching=False)
    video = np.random.default_rng(0).integers(0, 256, (4, 128, 160, 3), dtype=np.uint8)
    metadata = {"fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3],
                "video_backend": "opencv"}
    data = {"video": [(video, metadata)]}
    if with_image:
        data["image"] = [image(288, 224, 1)]
    text = "<|im_start|>user " + VIDEO + (IMAGE if with_image else "") + "Describe it.<|im_end|><|im_start|>assistant "
    out = llm.generate([{"prompt": text, "multi_modal_data": data}],
                       SamplingParams(temperature=0.0, max_tokens=6, logprobs=5), use_tqdm=False)[0]
    return {"prompt": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
            "first_logprobs": {str(t): p.logprob for t, p in out.outputs[0].logprobs[0].items()}}


if __name__ == "__main__":
    model, overrides, batched, with_image, out_path = sys.argv[1:6]
    if len(sys.argv) > 6:
        save_video_pixels(Path(sys.argv[6]))
    Path(out_path).write_text(json.dumps(run(model, json.loads(overrides), int(batched), with_image == "1")))
