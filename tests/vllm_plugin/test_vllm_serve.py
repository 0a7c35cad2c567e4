"""`vllm serve` with the plug-in enabled through --hf-overrides, on the loopback address, under load: 50
concurrent image requests of mixed sizes through the OpenAI-compatible chat API (bounded: a fixed count,
every wait under a timeout, the server stopped at the end). No errors, and every answer equals the same
request sent alone. Skipped where vLLM is not installed (.ci/vllm_stage.sh runs it)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny_qwen import build_tiny_qwen2_5_vl, image  # noqa: E402

REQUESTS = 50
SIZES = [(224, 168), (168, 112), (112, 224), (196, 140), (84, 252)]
TEXTS = ["What is in this image?", "Describe the picture in one sentence.", "There is a small boat on the lake.",
         "A cat sits on a red mat near the door.", "Name the colours you see.", "Is there a dog?",
         "user assistant system", "Two dogs run across a green field under a blue sky.", "Compare the shapes.",
         "The quick brown fox jumps over the lazy dog."]
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(width: int, height: int, seed: int) -> str:
    buffer = io.BytesIO()
    image(width, height, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(port: int, index: int) -> str:
    width, height = SIZES[index % len(SIZES)]
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0.0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(width, height, index % 7)}},
        {"type": "text", "text": TEXTS[index % len(TEXTS)]}]}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    return answer["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-serve"))
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w+")
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(checkpoint), "--served-model-name",
               "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "1024", "--max-num-seqs", "16", "--max-num-batched-tokens", "256",
               "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(1 << 28),
               "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
               "--hf-overrides", '{"visionzip": {"dominant": 0.65, "contextual": 0.05}}']
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                               "VLLM_TARGET_DEVICE": "cpu"}, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"vllm serve did not start:\n{log.read()[-6000:]}")
            time.sleep(2)
        yield port
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server and the engine process it started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_fifty_concurrent_requests_equal_each_sent_alone(server):
    with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        concurrent = list(pool.map(lambda i: chat(server, i), range(REQUESTS)))
    alone = [chat(server, i) for i in range(REQUESTS)]  # one at a time
    assert all(answer for answer in concurrent)
    assert alone == concurrent
