"""Runs vLLM engines on a checkpoint in this (fresh) process and writes their outputs as JSON.

    python tests/vllm_plugin/engine_run.py SPEC.json OUT.json

SPEC: {"model": dir, "engines": [{"name", "hf_overrides", "engine": {LLM kwargs}, "calls": [[request, ...], ...]}]},
a request = {"text": prompt, "images": [[width, height, seed], ...], optionally "videos": [[width, height, frames,
seed], ...] and "fps" (the frames' rate, default 1.0)}. Each call is one ``generate`` (a batch);
greedy, ``max_tokens`` new tokens, the top-5 log-probabilities of the first. OUT: {engine name: [[result per
request] per call]}, a result = {"prompt_len", "prompt" (token ids), "cached_tokens" (prefix-cache hits), "tokens",
"first_logprobs": {token id: logprob}}.

vLLM loads its plug-ins once per process (VLLM_PLUGINS selects them), so stock vLLM and the plug-in run in
separate processes; the engines of one SPEC run one after the other in-process (no engine-core process).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tiny_qwen import image, video  # noqa: E402

ENGINE_DEFAULTS = dict(dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8,
                       gpu_memory_utilization=0.3, kv_cache_memory_bytes=1 << 28, seed=0,
                       limit_mm_per_prompt={"image": 2, "video": 1})


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), logprobs=5)
    results = {}
    for engine in spec["engines"]:
        llm = LLM(spec["model"], hf_overrides=engine.get("hf_overrides"), **{**ENGINE_DEFAULTS, **engine["engine"]})
        calls = []
        for requests in engine["calls"]:
            prompts = [{"prompt": r["text"], "multi_modal_data": media(r)} for r in requests]
            outputs = llm.generate(prompts, params, use_tqdm=False)
            calls.append([{"prompt_len": len(o.prompt_token_ids), "prompt": list(o.prompt_token_ids),
                           "cached_tokens": o.num_cached_tokens or 0, "tokens": list(o.outputs[0].token_ids),
                           "first_logprobs": {str(t): p.logprob for t, p in o.outputs[0].logprobs[0].items()}}
                          for o in outputs])
        results[engine["name"]] = calls
        del llm
        gc.collect()
    return results


def media(request: dict) -> dict:
    """vLLM's ``multi_modal_data`` of a request: its images and its videos, each video exactly its frames
    (none sampled) with the request's frame rate (from which the processor derives ``second_per_grid_ts``)."""
    data = {"image": [image(*i) for i in request["images"]]} if request["images"] else {}
    fps = request.get("fps", 1.0)
    if request.get("videos"):
        data["video"] = []
        for v in request["videos"]:
            frames = video(*v)
            data["video"].append((frames, {"fps": fps, "duration": len(frames) / fps, "total_num_frames": len(frames),
                                           "frames_indices": list(range(len(frames))), "video_backend": "opencv",
                                           "do_sample_frames": False}))
    return data


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:3]
    Path(out_path).write_text(json.dumps(run(json.loads(Path(spec_path).read_text()))))
