"""Vision towers at the geometry of real VLMs, built from their configs (no download).

Random-init attention is nearly uniform: every token gets about 1/N of the CLS attention, so top-k
selection is decided by noise and near-ties are everywhere. A trained encoder's attention is peaked.
:func:`random_tower` re-initialises every layer's ``q_proj`` / ``k_proj`` weights with a larger
standard deviation (``qk_std``, default 0.05 against the usual 0.02): at CLIP-L/336 geometry the top
10% of patches then take about half of the CLS attention at the second-to-last layer, as in trained
CLIP and in the real DINOv2-S (:mod:`.dinov2_onnx`). Timing and memory do not depend on the weights.

:func:`load_tower` loads real weights from a local checkpoint directory instead (never a hub id).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# LLaVA-1.5's tower: openai/clip-vit-large-patch14-336 (577 tokens: CLS + 24 x 24 patches).
CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
# google/siglip-so400m-patch14-384 (729 tokens, no CLS: 27 x 27 patches).
SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)
GEOMETRIES = {"clip-l-336": ("clip", CLIP_L_336), "siglip-so400m": ("siglip", SIGLIP_SO400M)}
DEFAULT_QK_STD = 0.05


def tower_config(name: str, num_layers: int | None = None, attn_implementation: str = "sdpa"):
    """The vision config of ``name`` ("clip-l-336" or "siglip-so400m"), optionally with fewer layers."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    family, params = GEOMETRIES[name]
    params = dict(params)
    if num_layers is not None:
        params["num_hidden_layers"] = num_layers
    cls = CLIPVisionConfig if family == "clip" else SiglipVisionConfig
    config = cls(**params)
    config._attn_implementation = attn_implementation
    return config


def encoder_layers(model) -> torch.nn.ModuleList:
    """The encoder's layer list, from the transformers integration's registry of model structure."""
    from visionzip_kernels.integrations.transformers import encoder_family

    return encoder_family(model).layers(model)


def query_key(model, layer: torch.nn.Module):
    """One layer's q/k projections, head dim and scale, from the integration's registry."""
    from visionzip_kernels.integrations.transformers import encoder_family

    return encoder_family(model).query_key(layer)


def peak_attention_(model, qk_std: float = DEFAULT_QK_STD, seed: int = 0) -> None:
    """Re-initialise every layer's q_proj / k_proj weights with ``N(0, qk_std)`` (biases zero), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in encoder_layers(model):
            projections = query_key(model, layer)
            for proj in (projections.q_proj, projections.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * qk_std)
                if proj.bias is not None:
                    proj.bias.zero_()


def random_tower(name: str, num_layers: int | None = None, *, qk_std: float = DEFAULT_QK_STD, seed: int = 0,
                 attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A random-init ``CLIPVisionModel`` / ``SiglipVisionModel`` at ``name``'s geometry, eval mode,
    with peaked attention (see the module docstring)."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    config = tower_config(name, num_layers, attn_implementation)
    cls = CLIPVisionModel if GEOMETRIES[name][0] == "clip" else SiglipVisionModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    peak_attention_(model, qk_std, seed)
    return model.to(dtype).eval()


def load_tower(path: str | os.PathLike, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """Real weights from a local checkpoint directory (a CLIP or SigLIP model or vision model, e.g. a
    snapshot of openai/clip-vit-large-patch14-336). Files only: nothing is fetched."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = config.model_type.split("_")[0]
    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}.get(family)
    if cls is None:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not a CLIP or SigLIP model")
    model = cls.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def num_patches(model) -> tuple[int, int]:
    """(rows, cols) of the patch grid at the configured image size."""
    c = model.config
    side = c.image_size // c.patch_size
    return side, side


def has_cls(model) -> bool:
    """Whether the encoder has a CLS token at index 0, from the integration's registry."""
    from visionzip_kernels.integrations.transformers import encoder_family

    return encoder_family(model).keep_cls


def say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)
