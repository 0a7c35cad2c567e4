"""Hook plumbing shared by the vision encoders (CLIP, SigLIP, DINOv2): capture layer L, stop, compress.

How a patched encoder runs (:class:`EncoderPatch`):

1. ``model.forward`` is replaced, on the instance only, by a wrapper that arms a per-thread capture
   slot and calls the forward that was there before (the class's own, or whatever another library
   had set on the instance), so the model runs its own code with its own attention implementation
   (SDPA, FlashAttention, ...). Nothing of transformers' ``forward`` code is copied.
2. Forward hooks on layer L's query and key projections (``nn.Linear``; where they are is the
   family's ``query_key``, e.g. ``q_proj`` / ``k_proj``) store their outputs: the
   query and key projections after the bias, before the 1/sqrt(d) scaling, as docs/SPEC.md defines q and
   k. For CLS encoders only the CLS query row is kept (a [B, H, d] copy), so the full q is freed
   with the layer; k is kept as a [B, N, H, d] view of the projection output.
3. A forward hook on layer L itself stores the layer's output (layer L's hidden states, with the
   residual, layer scale, ... exactly what ``hidden_states[L + 1]`` would hold) and raises a private
   exception, :class:`_StopEncoder`. It unwinds through the encoder loop and transformers'
   decorators (which only use ``try/finally`` to reset their state) to the wrapper of step 1, which
   catches its own instance and nothing else. The layers after L, the final layer norm and any
   pooling head never run.
4. The wrapper computes the scores (CLS attention of the CLS row, or the attention received without
   CLS) and the metric (head-mean of k) in one ``scores_and_metric`` call, and calls ``select_merge``.
   It returns a :class:`VisionZipOutput`.

The hooks do nothing unless the wrapper armed them, so calling a submodule directly (e.g. the
encoder) behaves as unpatched. :meth:`EncoderPatch.remove` removes the three hooks and puts back the
instance's previous ``forward`` attribute (or deletes ours when there was none): afterwards the model
is exactly the unpatched model.

Caveats: hooks that other code registers on layer L *after* the patch (without ``prepend=True``) do
not run, because ours raises first; ``output_hidden_states`` / ``output_attentions`` are dropped
(the patched output has ``hidden_states = attentions = None``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ... import ops

_MISSING = object()


@dataclass
class VisionZipOutput(BaseModelOutputWithPooling):
    """Output of a VisionZip-patched vision encoder.

    Attributes:
        last_hidden_state: [B, D+K, C] the compressed tokens, read from layer L's output (before any
            final layer norm): the D dominant tokens in ascending token order (CLS first for CLS
            encoders), then the K contextual tokens in target order (docs/SPEC.md).
        keep: [B, D] int64, ascending: the token indices (into layer L's N tokens, CLS = 0) of the
            dominant tokens.
        pooler_output: ``None`` for a patched encoder (the final layers and pooling head do not run).
            A patched LLaVA's ``get_image_features`` puts the projected tokens here, one
            [D+K, C_text] tensor per image, as transformers' LLaVA does with its features.
        hidden_states, attentions: always ``None``.
    """

    keep: torch.LongTensor | None = None


@dataclass(frozen=True)
class QueryKey:
    """Where one encoder layer's q and k come from (docs/SPEC.md: after the bias, before any scaling):
    two separate projections, with no rotary embedding (CLIP, SigLIP, DINOv2)."""

    q_proj: torch.nn.Module  # its output is q, [B, N, H * head_dim]
    k_proj: torch.nn.Module  # its output is k, [B, N, H * head_dim]
    head_dim: int
    scale: float  # the softmax scale the model uses


@dataclass(frozen=True)
class FusedQueryKey:
    """q and k from one fused projection, taken after the rotary embedding (Qwen2-VL, Qwen2.5-VL).

    ``qkv_proj``'s output [T, 3 * num_heads * head_dim] is (q, k, v) x heads x head_dim, as the model
    splits it. ``attention`` is the module whose call receives the rotary inputs (keyword
    ``position_embeddings`` = (cos, sin)) and the packed ``cu_seqlens``; ``rotary`` is the model's own
    function ``(q, k, cos, sin) -> (q, k)`` on [T, H, d]: q and k are taken AFTER it, as the
    attention sees them (``None``: q and k are the projection's outputs, before any rotary).
    """

    attention: torch.nn.Module
    qkv_proj: torch.nn.Module
    num_heads: int
    head_dim: int
    scale: float  # the softmax scale the model uses
    rotary: Callable | None


def separate_projections(attention: torch.nn.Module) -> QueryKey:
    """An attention module with ``q_proj`` / ``k_proj`` (``nn.Linear``) and ``head_dim``, as
    transformers 5.x's CLIP, SigLIP and (5.2x) DINOv2 attentions have."""
    head_dim = int(attention.head_dim)
    return QueryKey(attention.q_proj, attention.k_proj, head_dim, _softmax_scale(attention, head_dim))


@dataclass(frozen=True)
class EncoderFamily:
    """What the plumbing needs to know about one encoder family (one per module: clip, siglip, dinov2)."""

    name: str  # "CLIP"
    model_types: tuple[str, ...]  # config.model_type values of the supported class
    model_class: Callable[[], type]  # the supported class (a subclass also matches), imported lazily
    keep_cls: bool  # CLS token at index 0: cls_attention + keep_cls=True; else attention_received
    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]  # the encoder's layer list
    # one layer's q/k: separate projections (QueryKey) or a fused qkv after rotary (FusedQueryKey)
    query_key: Callable[[torch.nn.Module], QueryKey | FusedQueryKey]


@dataclass(frozen=True)
class CompositeFamily:
    """A model that holds a supported vision encoder (its tower) and is patched around it (LLaVA)."""

    name: str  # "LLaVA"
    model_types: tuple[str, ...]  # config.model_type values
    tower: Callable[[torch.nn.Module], torch.nn.Module]  # the vision encoder inside the model
    # (model, the tower's EncoderFamily, dominant, contextual, layer) -> the patch
    make_patch: Callable[..., object]
    # what apply() uses for dominant, contextual, layer when they are not given
    defaults: tuple = (54, 10, -2)
    # the tower's family when it is not a stand-alone encoder family (Qwen's packed towers)
    tower_family: EncoderFamily | None = None


class _StopEncoder(Exception):
    """Raised by the hook on layer L; caught by the wrapper of the patch that raised it."""

    def __init__(self, patch: EncoderPatch):
        super().__init__("visionzip: encoder stopped after layer L (internal, should never escape)")
        self.patch = patch


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"visionzip.apply: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"visionzip.apply: {name} must be >= {minimum}, got {value}")
    return value


def _softmax_scale(attn: torch.nn.Module, head_dim: int) -> float:
    for attr in ("scale", "scaling"):
        value = getattr(attn, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return head_dim**-0.5


class EncoderPatch:
    """VisionZip on one vision encoder instance (see the module docstring for the mechanism).

    Built by :func:`visionzip_kernels.apply`; holds the settings (``dominant``, ``contextual``,
    ``layer`` as given, ``layer_index`` resolved to 0..n-1, ``keep_cls``, ``family``).
    """

    def __init__(self, model: torch.nn.Module, family: EncoderFamily, dominant: int, contextual: int, layer: int):
        self.model = model
        self.family = family
        self.dominant = _check_int("dominant", dominant, 1)
        self.contextual = _check_int("contextual", contextual, 0)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"visionzip.apply: layer must be an int, got {type(layer).__name__}")
        self.layer = layer
        self.keep_cls = family.keep_cls
        layers = family.layers(model)
        n = len(layers)
        if not -n <= layer < n:
            raise ValueError(f"visionzip.apply: layer must be in [-{n}, {n - 1}] for this {n}-layer "
                             f"{family.name} encoder, got {layer}")
        self.layer_index = layer % n
        self.num_layers = n
        layer_module = layers[self.layer_index]
        query_key = family.query_key(layer_module)
        if not isinstance(query_key, QueryKey):
            raise TypeError(f"visionzip.apply: the {family.name} encoder's q/k are not two separate projections "
                            f"({type(query_key).__name__}); it is supported only inside its composite model")
        self.head_dim = query_key.head_dim
        self.scale = query_key.scale
        self._local = threading.local()
        self._handles = [
            query_key.q_proj.register_forward_hook(self._q_hook),
            query_key.k_proj.register_forward_hook(self._k_hook),
            layer_module.register_forward_hook(self._stop_hook),
        ]
        self._saved_forward = model.__dict__.get("forward", _MISSING)
        self._inner_forward = model.forward  # bound: the class's forward or a previous instance attribute
        model.forward = self._forward
        self.removed = False

    # -- settings --------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return {"dominant": self.dominant, "contextual": self.contextual, "layer": self.layer}

    def __repr__(self) -> str:
        return (f"EncoderPatch({self.family.name}, dominant={self.dominant}, contextual={self.contextual}, "
                f"layer={self.layer} -> index {self.layer_index} of {self.num_layers})")

    # -- hooks -----------------------------------------------------------------------------------
    def _slot(self) -> dict | None:
        return getattr(self._local, "capture", None)

    def _q_hook(self, module, args, output):
        slot = self._slot()
        if slot is None:
            return
        if self.keep_cls:
            # Only the CLS query row is used: copy it ([B, H, d]) so the full q can be freed.
            slot["q"] = output[:, 0].unflatten(-1, (-1, self.head_dim)).contiguous()
        else:
            slot["q"] = output.unflatten(-1, (-1, self.head_dim))

    def _k_hook(self, module, args, output):
        slot = self._slot()
        if slot is not None:
            slot["k"] = output.unflatten(-1, (-1, self.head_dim))

    def _stop_hook(self, module, args, output):
        slot = self._slot()
        if slot is None:
            return
        slot["hidden"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _StopEncoder(self)

    # -- the wrapped forward ---------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("output_attentions", None)
        slot: dict = {}
        outer = self._slot()
        self._local.capture = slot
        try:
            self._inner_forward(*args, **kwargs)
        except _StopEncoder as stop:
            if stop.patch is not self:
                raise
        else:
            raise RuntimeError(
                f"visionzip: the {self.family.name} encoder returned without running layer {self.layer} "
                f"(index {self.layer_index}); was its layer list changed after visionzip_kernels.apply?"
            )
        finally:
            self._local.capture = outer
        missing = [name for name in ("q", "k", "hidden") if name not in slot]
        if missing:
            raise RuntimeError(f"visionzip: layer {self.layer_index} ran but {missing} were not captured "
                               "(q_proj/k_proj not called through their modules?)")
        tokens, keep = self.compress(slot["hidden"], slot["q"], slot["k"])
        out = VisionZipOutput(last_hidden_state=tokens, keep=keep)
        return out if return_dict else out.to_tuple()

    def compress(self, hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores, metric and ``select_merge`` on layer L's captured tensors.

        ``q`` is the CLS row [B, H, d] for CLS encoders, else [B, N, H, d]; ``k`` is [B, N, H, d].
        """
        # The selection and the assignment are discrete: no gradient flows to q, k, scores or metric
        # (docs/SPEC.md "Gradients"); detaching keeps autograd away from the score ops.
        q, k = q.detach(), k.detach()
        if self.keep_cls:
            q = q.unsqueeze(1)  # the CLS row as a one-query [B, 1, H, d]
        scores, metric = ops.scores_and_metric(q, k, self.scale, self.keep_cls)
        return ops.select_merge(hidden, scores, metric, self.dominant, self.contextual, self.keep_cls)

    # -- removal ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Removes the hooks and restores the instance's previous ``forward``; idempotent."""
        if self.removed:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._saved_forward is _MISSING:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self._saved_forward
        self.removed = True
