"""The main job (`python -m examples.demo`) on tiny settings: it prints the side-by-side
tables and writes the PNG. Also its --help, its answer to bad arguments (one line, exit status 2,
before any model work), image loading, the interleaved timing and the PNG's PIL fallback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import visionzip_kernels
from examples import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    parser_options = re.findall(r"^\s+(--[a-z-]+)", out, flags=re.M)
    for option in ("--quick", "--ops-only", "--sections", "--budget", "--layer", "--png", "--clip-checkpoint",
                   "--clip-batch", "--size", "--resize", "--repeats", "--threads"):
        assert option in parser_options, option
    args = demo.parse_args([])
    assert args.sections == ["dinov2", "clip", "ops"] and (args.dominant, args.contextual) == (54, 10)


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    # One option's help ends where the next option (or group heading) starts.
    helps = re.split(r"\n\s*(?=-{1,2}[a-z])|\n\n", out)
    for text in helps:
        assert text.count("default:") <= 1, text
    assert "(default: 3 for DINOv2, 1 for CLIP" in " ".join(out.split())


def test_every_argument_has_help():
    import argparse

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        return original(self, *a, **k)

    argparse.ArgumentParser.parse_args = grab
    try:
        demo.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    for action in captured["parser"]._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"


def test_ops_only_section(capsys):
    assert demo.main(["--ops-only", "--batch", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "The ops alone" in out and "upstream-style path" in out
    assert "DINOv2" not in out


def test_load_images_from_files(tmp_path):
    from PIL import Image

    path = tmp_path / "square.png"
    Image.fromarray(np.full((30, 40, 3), 200, dtype=np.uint8)).save(path)
    [(name, array)] = demo.load_images([str(path)])
    assert name == "square" and array.shape == (30, 40, 3)
    with pytest.raises(demo.BadImage, match="neither a file"):
        demo.load_images(["no_such_image_anywhere"])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    with pytest.raises(demo.BadImage, match="not an image file"):
        demo.load_images([str(not_an_image)])


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_png_backends(tmp_path, backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    from examples.visualize import Panel, save_png, token_groups

    g = torch.Generator().manual_seed(0)
    N, grid = 1 + 6 * 6, (6, 6)
    metric = torch.randn(1, N, 8, generator=g)
    keep = torch.tensor([[0, 3, 9, 20]])
    groups, targets = token_groups(metric, keep, 3)
    assert (groups[0, keep[0]] == -1).all() and set(groups[0].tolist()) == {-1, 0, 1, 2}
    assert (groups[0, targets[0]] == torch.arange(3)).all()
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    panel = Panel(image=image, grid=grid, groups=groups[0], targets=targets[0], title="x", scores=torch.rand(N))
    path = tmp_path / f"{backend}.png"
    assert save_png(path, [panel, panel], "title", backend=backend) == backend
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_quick_demo_prints_tables_and_writes_png(tmp_path, capsys, monkeypatch):
    """The whole main job on tiny settings: the real DINOv2-S at 224 px and a 2-layer CLIP-L/336
    (converted into a fresh cache directory, leaving the user's alone)."""
    pytest.importorskip("transformers")
    pytest.importorskip("skimage")
    if not hasattr(visionzip_kernels, "apply"):
        pytest.skip("visionzip_kernels.apply (the transformers integration) is not available")
    from examples.models import dinov2_onnx

    try:
        dinov2_onnx.find_onnx()
    except dinov2_onnx.ModelUnavailable as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv(dinov2_onnx.ENV_CACHE, str(tmp_path / "cache"))
    png = tmp_path / "demo.png"
    code = demo.main(["--quick", "--png", str(png), "--sections", "dinov2,clip"])
    out = capsys.readouterr().out
    assert code == 0, out
    for needle in ("DINOv2-S/14", "CLIP ViT-L/14-336", "upstream (eager, attentions, full encoder)",
                   "ours (SDPA, fused ops, stops after L)", "upstream / ours", "257 -> 64", "577 -> 64",
                   "top 10% of patches"):
        assert needle in out, needle
    ours_rows = [line for line in out.splitlines() if line.startswith("ours (SDPA")]
    assert len(ours_rows) == 2 and all(" yes " in row for row in ours_rows), ours_rows
    assert png.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 300 and im.height > 300


def test_clip_checkpoint_section(tmp_path, capsys):
    """--clip-checkpoint DIR (the real-weights branch): a small CLIP vision model saved with
    save_pretrained is loaded from the directory, nothing fetched, and fed the photos."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("skimage")
    if not hasattr(visionzip_kernels, "apply"):
        pytest.skip("visionzip_kernels.apply (the transformers integration) is not available")
    from examples.models import towers

    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    torch.manual_seed(0)
    saved = transformers.CLIPVisionModel(config).eval()
    saved.save_pretrained(tmp_path / "clip")
    loaded = towers.load_tower(tmp_path / "clip")
    assert loaded.config._attn_implementation == "sdpa"
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).last_hidden_state, saved(pixel_values=x).last_hidden_state)
    with pytest.raises(FileNotFoundError, match="not found"):
        towers.load_tower(tmp_path / "missing")

    code = demo.main(["--sections", "clip", "--clip-checkpoint", str(tmp_path / "clip"), "--clip-batch", "2",
                      "--dominant", "5", "--contextual", "3", "--repeats", "1", "astronaut"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "real weights, 2 photos" in out and "17 -> 8" in out
    [ours_row] = [line for line in out.splitlines() if line.startswith("ours (SDPA")]
    assert " yes " in ours_row, ours_row


REPO = Path(__file__).resolve().parents[1]


def _run_demo(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), VISIONZIP_CACHE_DIR=os.devnull + "/unused")
    return subprocess.Popen([sys.executable, "-m", "examples.demo", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    """Each bad argument: exit status 2, nothing on stdout, one line on stderr naming the argument,
    no traceback; it fails before any model work (no model cache is reachable: the cache directory
    given can't be created, so converting DINOv2 would fail with another message)."""
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    cases = {
        "--dominant": ["--dominant", "-5"],
        "--dominant ": ["--dominant", "1000"],
        "--contextual": ["--contextual", "600"],
        "--layer": ["--layer", "50"],
        "images": [str(not_an_image)],
        "images ": [str(tmp_path / "missing.png")],
        "--budget": ["--sections", "ops", "--tokens", "40"],
        "--clip-checkpoint": ["--sections", "clip", "--clip-checkpoint", str(tmp_path / "nowhere")],
    }
    # Started together: each is a fresh interpreter importing torch, the slow part.
    runs = {name: (args, _run_demo(args)) for name, args in cases.items()}
    for name, (args, process) in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, (args, out, err)
        assert out == "", (args, out)
        assert "Traceback" not in err, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (args, err)
        assert f"argument {name.strip()}:" in lines[0], (args, err)


def test_bad_budget_is_checked_per_section():
    """The budget is checked against each selected section's N: 300 dominant tokens fit DINOv2 at
    336 px (577 tokens) but not at 224 px (257), nor the ops section at --tokens 100."""
    assert demo.parse_args(["--sections", "dinov2", "--dominant", "300"]).dominant == 300
    for argv in (["--sections", "dinov2", "--dominant", "300", "--size", "224"],
                 ["--sections", "dinov2,ops", "--dominant", "300", "--tokens", "100"],
                 ["--sections", "dinov2", "--quick", "--dominant", "250", "--contextual", "10"]):
        with pytest.raises(SystemExit) as exit_info:
            demo.parse_args(argv)
        assert exit_info.value.code == 2, argv
    assert demo.parse_args(["--sections", "dinov2", "--quick", "--dominant", "250", "--contextual", "7"])
    assert demo.parse_args(["--sections", "clip", "--clip-layers", "4", "--layer", "-4"]).layer == -4
    with pytest.raises(SystemExit):
        demo.parse_args(["--sections", "clip", "--clip-layers", "4", "--layer", "4"])


def test_interleaved_times_round_robin_and_ratios():
    """interleaved_times calls the paths round-robin (after the warm-up calls) and Interleaved.ratio
    is the median of the per-round ratios, not the ratio of the medians."""
    from examples.profiling import Interleaved, interleaved_times

    calls = []
    result = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3,
                               warmup=1)
    assert calls == ["a", "b"] * 4
    assert result.rounds == 3 and all(len(t) == 3 for t in result.times.values())
    timing = Interleaved({"ours": [1.0, 2.0, 3.0], "other": [10.0, 2.0, 30.0]})
    assert timing.median("ours") == 2.0 and timing.median("other") == 10.0
    # Per-round ratios 10, 1, 10: their median is 10; the ratio of the medians would be 5.
    assert timing.ratio("other", "ours") == 10.0
    with pytest.raises(ValueError, match="rounds"):
        interleaved_times({"a": lambda: None}, rounds=0)
