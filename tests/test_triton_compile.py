"""The Triton kernels compile for the GPUs users run (sm_90 and sm_80) without register spills, at
the configurations the launchers pick for realistic shapes.

No GPU is needed: ``triton.compile`` targets an arch directly, and the cuobjdump that Triton ships
reports each cubin's registers and stack. A kernel that only the interpreter accepts, or a tile
that spills on the GPU, fails here. The compile runs in a subprocess: conftest.py turns the
interpreter on for this process, and the interpreter replaces @triton.jit when triton_ops is imported.

    python tests/test_triton_compile.py    # prints every configuration's registers
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)  # sm_80 for fp16 only: it is the dtype most Ampere users run, and compiles take time
SMS = 132  # H100 / H200: the launchers pick token blocks from the SM count
# (N, H, d): LLaVA-1.5 (CLIP-L/336), SigLIP-so400m/384, Qwen2-VL's ViT.
SHAPES = ((577, 16, 64), (729, 16, 72), (1024, 16, 80))
BATCHES = (1, 256)


def _configs():
    """(name, kernel, pointer dtypes, constexprs, num_warps) for every launch the shapes above make."""
    import torch
    import triton
    import triton.language as tl

    from triton_ops.tiles import accumulator_dtype, head_block, tile_config

    # (the package re-exports functions under these modules' names)
    ar = importlib.import_module("triton_ops.attention_received")
    cls = importlib.import_module("triton_ops.cls_attention_topk")
    topk = importlib.import_module("triton_ops.topk")
    varlen = importlib.import_module("triton_ops.varlen_scores")

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    seen = set()
    for dtype, t in names.items():
        for N, H, d in SHAPES:
            tiles = dict(tile_config(dtype, d, False))  # a copy: the launcher caches it
            warps = tiles.pop("num_warps")
            io = {"q_ptr": t, "k_ptr": t}
            yield f"row_stats {t} d={d}", ar._row_stats_kernel, io, tiles, warps
            yield f"column_sums {t} d={d}", ar._column_sums_kernel, io, tiles, warps
            # Packed (varlen) passes: the same tiles, the image looked up from block_starts.
            varlen_io = dict(io, cu_ptr="i32", block_starts_ptr="i32")
            varlen_tiles = dict(tiles, CHUNK=varlen.IMAGE_CHUNK)
            yield f"varlen_row_stats {t} d={d}", varlen._varlen_row_stats_kernel, varlen_io, varlen_tiles, warps
            yield f"varlen_column_sums {t} d={d}", varlen._varlen_column_sums_kernel, varlen_io, varlen_tiles, warps
            for unit in (1, 4) if d == 80 else (4,):  # merge units of Qwen2-VL's ViT (d = 80)
                consts = dict(NUM_HEADS=H, UNIT=unit, BLOCK=varlen.POOL_BLOCK, BLOCK_D=head_block(d),
                              ACC_DTYPE=accumulator_dtype(dtype))
                yield (f"varlen_pool {t} H={H} d={d} unit={unit}", varlen._varlen_pool_kernel,
                       {"k_ptr": t, "metric_ptr": t}, consts, 4)
            for B in BATCHES:
                block_n = cls.token_block(B, N, d, dtype.itemsize, SMS)
                for with_logits, with_metric in ((True, True), (True, False), (False, True)):
                    consts = dict(NUM_HEADS=H, BLOCK_N=block_n, BLOCK_D=head_block(d), WITH_LOGITS=with_logits,
                                  WITH_METRIC=with_metric, ACC_DTYPE=accumulator_dtype(dtype))
                    # The launcher passes the pointers a launch does not use as None (constexprs).
                    if not with_logits:
                        consts.update(q_ptr=None, logits_ptr=None, stats_ptr=None)
                    if not with_metric:
                        consts.update(metric_ptr=None)
                    key = (t, tuple(consts.items()))
                    if key not in seen:
                        seen.add(key)
                        yield (f"cls_logits {t} H={H} d={d} block={block_n} logits={with_logits} metric={with_metric}",
                               cls._cls_logits_kernel, {"q_ptr": t, "k_ptr": t, "metric_ptr": t}, consts, 4)
        yield f"topk {t}", topk._topk_kernel, {"scores_ptr": t, "keep_ptr": "i64"}, dict(BLOCK=1024, KEEP_CLS=True), 8
    for N, H, _ in SHAPES:
        n_blocks = triton.cdiv(N, 16)
        for fuse in (False, True):
            block = triton.next_power_of_2(N) if fuse else min(cls.NORMALIZE_BLOCK, triton.next_power_of_2(N))
            consts = dict(NUM_HEADS=H, BLOCK=block, BLOCK_STATS=triton.next_power_of_2(n_blocks), FUSE_TOPK=fuse,
                          KEEP_CLS=True, **({} if fuse else {"keep_ptr": None}))
            yield f"cls_normalize N={N} fuse_topk={fuse}", cls._cls_normalize_kernel, {"keep_ptr": "i64"}, consts, \
                8 if fuse else 4
        yield f"head_mean N={N}", ar._head_mean_kernel, {}, dict(NUM_HEADS=H, BLOCK=256), 4
    del tl


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    """Argument types by name: ``*_ptr`` are fp32 pointers unless named, scales fp32, the rest i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "fp32")
        elif name in ("scale", "qk_scale", "divisor"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    """Compiles every configuration for every arch; prints registers; returns the number that spill."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    spilled = 0
    for name, kernel, pointers, constexprs, warps in _configs():
        for arch in ARCHS if " fp16 " in f"{name} " or " fp" not in name else ARCHS[:1]:
            source = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs), constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True,
                                       text=True, check=True).stdout
            regs, stack, local = (
                int(re.search(rf"{field}:(\d+)", usage).group(1)) for field in ("REG", "STACK", "LOCAL")
            )
            spills = stack > 0 or local > 0
            spilled += spills
            print(f"sm_{arch} {name}: {regs} registers, stack {stack} B{'  SPILLS' if spills else ''}")
    return spilled


def test_triton_kernels_compile_for_sm90_and_sm80_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; the default it keeps
    result = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    failures = main()
    print(f"{failures} configuration(s) spill registers")
    sys.exit(1 if failures else 0)
