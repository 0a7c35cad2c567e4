"""Stock vLLM vs the VisionZip plug-in on vLLM's engine: prompt tokens, time to first token and
throughput for a batch of image requests, at the default budget (0.65 / 0.05) and at 0.45 / 0.05.

    VLLM_TARGET_DEVICE=cpu python benchmarks/bench_vllm.py [--requests 16] [--image 448] [--max-tokens 16]

Run in a venv with vLLM and this package installed (.ci/vllm_stage.sh builds one for the CPU engine and
runs this with VISIONZIP_VLLM_BENCH=1). The model is the tests' tiny random Qwen2.5-VL
(tests/vllm_plugin/tiny_qwen.py; images up to 1024 merged tokens, so a 448 px image gives 256) unless
``--model`` names a real checkpoint. Each configuration runs in its own process (stock with
``VLLM_PLUGINS=""``), one engine at a time: one warm-up batch, then ``--rounds`` timed batches of
``--requests`` requests (images of ``--image`` px squares, distinct seeds; prefix caching off, so every
round encodes and prefills again):

- TTFT: wall time of the batch with ``max_tokens=1`` (every request's first token, i.e. encode + prefill);
- throughput: generated tokens per second of the batch with ``--max-tokens``.

The token ratio (stock prompt tokens / plug-in prompt tokens) is printed beside each speed-up: prefill cost
is at least linear in the tokens, so on a model whose LLM dominates it bounds the TTFT speed-up; on the tiny
model fixed per-request costs dominate and the speed-ups stay near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vllm_plugin"))

CONFIGS = {"stock": None, "plug-in 0.65/0.05": {"dominant": 0.65, "contextual": 0.05},
           "plug-in 0.45/0.05": {"dominant": 0.45, "contextual": 0.05}}


def measure(args) -> dict:
    """In this process: one engine, the warm-up and the timed rounds."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from tiny_qwen import image, prompt
    from vllm import LLM, SamplingParams

    overrides = json.loads(args.overrides)
    llm = LLM(args.model, hf_overrides={"visionzip": overrides} if overrides else None, dtype=args.dtype,
              enforce_eager=True, max_model_len=4096, max_num_seqs=args.requests, enable_prefix_caching=False,
              gpu_memory_utilization=0.3, kv_cache_memory_bytes=1 << 29, limit_mm_per_prompt={"image": 1, "video": 0})

    def batch(round_index: int):
        return [{"prompt": prompt(1), "multi_modal_data": {"image": image(args.image, args.image,
                                                                           1000 * round_index + i)}}
                for i in range(args.requests)]

    first = SamplingParams(temperature=0.0, max_tokens=1)
    full = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(batch(0), full, use_tqdm=False)  # warm-up
    ttft, throughput, prompt_tokens = [], [], 0
    for r in range(1, args.rounds + 1):
        start = time.perf_counter()
        outputs = llm.generate(batch(r), first, use_tqdm=False)
        ttft.append(time.perf_counter() - start)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        start = time.perf_counter()
        outputs = llm.generate(batch(r), full, use_tqdm=False)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        throughput.append(generated / (time.perf_counter() - start))
    return {"prompt_tokens": prompt_tokens, "ttft_s": statistics.median(ttft),
            "throughput": statistics.median(throughput)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a tiny random Qwen2.5-VL, built here)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--image", type=int, default=448, help="image side in px (a multiple of 28)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--overrides", help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overrides is not None:
        Path(args.out).write_text(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from tiny_qwen import build_tiny_qwen2_5_vl

            args.model = str(build_tiny_qwen2_5_vl(Path(tmp) / "tiny", max_units=1024))
        results = {}
        for name, overrides in CONFIGS.items():
            out = Path(tmp) / "result.json"
            env = {**os.environ, **({"VLLM_PLUGINS": ""} if overrides is None else {})}
            command = [sys.executable, __file__, "--model", args.model, "--requests", str(args.requests),
                       "--image", str(args.image), "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds),
                       "--dtype", args.dtype, "--overrides", json.dumps(overrides), "--out", str(out)]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[name] = json.loads(out.read_text())
    stock = results["stock"]
    print(f"{args.requests} requests, one {args.image}x{args.image} image each, median of {args.rounds} rounds "
          f"({os.environ.get('VLLM_TARGET_DEVICE', 'cpu')} engine, {args.dtype})")
    print(f"{'configuration':<20} {'prompt tokens':>13} {'token ratio':>11} {'TTFT s':>8} {'speed-up':>8} "
          f"{'tok/s':>8} {'speed-up':>8}")
    for name, r in results.items():
        print(f"{name:<20} {r['prompt_tokens']:>13} {stock['prompt_tokens'] / r['prompt_tokens']:>11.2f} "
              f"{r['ttft_s']:>8.3f} {stock['ttft_s'] / r['ttft_s']:>8.2f} {r['throughput']:>8.1f} "
              f"{r['throughput'] / stock['throughput']:>8.2f}")


if __name__ == "__main__":
    main()
