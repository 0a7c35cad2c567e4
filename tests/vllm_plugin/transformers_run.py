"""The transformers side of the vLLM equality tests for the Qwen3 generation, run in the PROJECT's venv.

    python tests/vllm_plugin/transformers_run.py SPEC.json OUT.json

Qwen3-VL's / Qwen3.5's transformers integration needs transformers 5.23's forward (``mm_encoder_outputs``),
while vLLM 0.32's CPU build pins transformers < 5.20: test_vllm_qwen3.py runs this script with the project's
python (transformers 5.23, the package built for its torch) on the checkpoint the vLLM side loads.

SPEC: {"model": dir, "dtype": "float32" | "bfloat16", "max_tokens": n, "budget": {apply() kwargs} or null,
"requests": [{"text", "images": [[width, height, seed], ...]}, ...]}; a video request is {"input_ids" (the full
prompt), "images", "video": a torch.save file of the ``pixel_values_videos`` / ``video_grid_thw`` vLLM's processor
made (transformers' video processor needs torchvision)}. OUT: per request {"prompt_len", "tokens"
(greedy), "prompt" (token ids), "logprobs" (the first token's log-softmax over the vocabulary, float64 as a list)}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_qwen import image  # noqa: E402


def processor_inputs(config, tokenizer, image_processor, request: dict) -> dict:
    """What ``Qwen3VLProcessor`` gives for an image prompt, without it: its ``AutoProcessor`` loads the video
    processor, which needs torchvision (not in the project's venv). Each ``<|image_pad|>`` becomes the image's
    t*h*w/4 placeholders; ``mm_token_type_ids`` is 1 at them (the test also checks these ids equal vLLM's)."""
    images = image_processor(images=[image(*i) for i in request["images"]], return_tensors="pt")
    merge = image_processor.merge_size**2
    pad = tokenizer.convert_ids_to_tokens(config.image_token_id)
    pieces = request["text"].split(pad)
    if len(pieces) != len(request["images"]) + 1:
        raise ValueError(f"request: {len(pieces) - 1} image placeholders for {len(request['images'])} images")
    text = pieces[0] + "".join(pad * (int(grid.prod()) // merge) + piece
                               for grid, piece in zip(images["image_grid_thw"], pieces[1:]))
    input_ids = tokenizer([text], return_tensors="pt")["input_ids"]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == config.image_token_id).int(), **images}


def video_inputs(config, image_processor, request: dict) -> dict:
    """A video request's inputs: its given full prompt ids (timestamps and all frames' placeholders),
    ``mm_token_type_ids`` 1 at image and 2 at video placeholders (as the processor writes them), the saved video
    pixels and the request's images."""
    input_ids = torch.tensor([request["input_ids"]])
    mm_token_type_ids = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "mm_token_type_ids": mm_token_type_ids, **torch.load(request["video"])}
    if request["images"]:
        inputs.update(image_processor(images=[image(*i) for i in request["images"]], return_tensors="pt"))
    return inputs


def run(spec: dict) -> list[dict]:
    import transformers

    import visionzip_kernels as vz
    from visionzip_kernels.integrations.transformers import shrink_inputs

    dtype = getattr(torch, spec.get("dtype", "float32"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    image_processor = transformers.AutoImageProcessor.from_pretrained(spec["model"])
    model = transformers.AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=dtype).eval()
    if spec.get("budget") is not None:
        vz.apply(model, **spec["budget"])
    results = []
    for request in spec["requests"]:
        if "video" in request:
            inputs = video_inputs(model.config, image_processor, request)
        else:
            inputs = processor_inputs(model.config, tokenizer, image_processor, request)
        if spec.get("budget") is not None:
            inputs = shrink_inputs(model, inputs)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=spec["max_tokens"], do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        prompt_len = inputs["input_ids"].shape[1]
        results.append({"prompt_len": prompt_len, "prompt": inputs["input_ids"][0].tolist(),
                        "tokens": out.sequences[0, prompt_len:].tolist(),
                        "logprobs": torch.log_softmax(out.scores[0][0].double(), dim=-1).tolist()})
    return results


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:3]
    Path(out_path).write_text(json.dumps(run(json.loads(Path(spec_path).read_text()))))
