"""The patched forward shared by the vision encoders (CLIP, SigLIP, DINOv2): run to layer L, compress.

How a patched encoder runs (:class:`EncoderPatch`):

1. ``model.forward`` is replaced, on the instance only, by :meth:`EncoderPatch.forward`, a bound
   method of the patch (no closure, no thread-local: the model stays picklable and deep-copyable,
   and a deep copy gets its own patch). It runs the model's own submodules, each through its
   ``__call__`` with its own attention implementation (SDPA, FlashAttention, ...): the family's
   ``embed`` (the embeddings and, for CLIP, ``pre_layrnorm``: everything before layer 0), then
   layers ``0..L`` one by one (``run_layer``), a plain loop over the first L+1 entries of the
   encoder's layer list. The layers after L, the final layer norm and any pooling head never run,
   and nothing needs an exception to stop: the loop is something dynamo traces
   (``torch.compile(model, fullgraph=True)`` works). This loop is ours; nothing of transformers'
   ``forward`` code is copied.
2. q and k of layer L (docs/SPEC.md: the query and key projections after the bias, before the
   1/sqrt(d) scaling) are computed by calling layer L's own ``q_proj`` / ``k_proj`` (the family's
   ``query_key``) on that layer's attention input (``attention_input``: its pre-attention layer
   norm of the layer's input), after the layer has run. These are the same modules on the same
   tensor the layer itself uses, so q and k are bit for bit the ones inside the layer (in eager;
   under torch.compile the compiler may share them with the layer's own). The price in eager is one
   layer norm and two projections of one layer, once per forward (about 0.7% of CLIP-L/336's
   23 layers). For CLS encoders only the CLS query row is kept.
3. The scores (CLS attention of the CLS row, or the attention received without CLS) and the metric
   (head-mean of k) come from one ``scores_and_metric`` call, then ``select_merge`` runs on layer L's
   output (with residual, layer scale, ...: exactly ``hidden_states[L + 1]``). It returns a
   :class:`VisionZipOutput`.

All state of a call lives in that call's local variables, so concurrent forwards in several threads
are safe. :meth:`EncoderPatch.remove` puts back the instance's previous ``forward`` attribute (or
deletes ours when there was none): afterwards the model is exactly the unpatched model. No hooks are
registered and nothing is added to the state dict, so ``state_dict`` / ``load_state_dict``,
``.to(device / dtype)``, ``copy.deepcopy``, ``pickle`` and ``torch.save`` behave as on the unpatched
model (the saved model is patched when loaded back).

``output_hidden_states=True`` gives ``hidden_states`` = the L+2 tensors of the part that ran (the
embedding output, then the outputs of layers 0..L), equal to the unpatched model's
``hidden_states[:L + 2]``. ``output_attentions=True`` raises ``ValueError``: a patched encoder
computes no attention map (it keeps SDPA and reads only q and k).

Caveat: a ``forward`` that another library had set on the instance (e.g. accelerate's hook) is
set aside while patched (restored by ``remove``), since the patched forward calls the submodules
itself; hooks on the submodules (layers, embeddings, ...) do run.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ... import ops
from ...budget import check_int, check_ratio, checked_ratio_tokens, split_checked_budget

# The oldest transformers the integration supports (and CI tests: .ci/oldest_transformers.sh); apply() checks it.
MIN_TRANSFORMERS = "5.17.0"


class _Missing:
    """The "no instance attribute" marker; pickles and copies as the one module-level instance."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


def replace_instance_attribute(obj: object, name: str, value: object) -> object:
    """Sets ``obj.<name> = value`` on the instance and returns what the instance itself held before
    (``_MISSING`` when the class attribute showed through), for :func:`restore_instance_attribute`."""
    saved = obj.__dict__.get(name, _MISSING)
    setattr(obj, name, value)
    return saved


def restore_instance_attribute(obj: object, name: str, saved: object) -> None:
    """Undoes :func:`replace_instance_attribute`: the saved instance attribute back, or none at all."""
    if saved is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, saved)


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
        hidden_states: ``None``, or with ``output_hidden_states=True`` the L+2 states that ran
            (embedding output, then layers 0..L's outputs, each [B, N, C]).
        attentions: always ``None`` (``output_attentions=True`` raises ``ValueError``).
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


def separate_projections(attention: torch.nn.Module) -> QueryKey:
    """An attention module with ``q_proj`` / ``k_proj`` (``nn.Linear``) and ``head_dim``, as
    transformers 5.x's CLIP, SigLIP and (5.2x) DINOv2 attentions have."""
    head_dim = int(attention.head_dim)
    return QueryKey(attention.q_proj, attention.k_proj, head_dim, _softmax_scale(attention, head_dim))


def layer_output(output) -> torch.Tensor:
    """A layer's hidden states from what its ``__call__`` returned (a tensor, or a tuple whose first
    item is the tensor, as some transformers versions return)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_layer_without_mask(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One call of a CLIP / SigLIP encoder layer, whose attention_mask is a required positional argument."""
    return layer_output(layer(hidden, None))


def layer_norm1_input(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What a CLIP / SigLIP layer's attention projects: its first layer norm of the input."""
    return layer.layer_norm1(hidden)


@dataclass(frozen=True)
class EncoderFamily:
    """What the patched forward needs to know about one encoder family (one per module: clip,
    siglip, dinov2). Every callable is a module-level function (picklable by name)."""

    name: str  # "CLIP"
    model_types: tuple[str, ...]  # config.model_type values of the supported class
    class_name: str  # the supported class in transformers' namespace (a subclass also matches)
    summary: str  # how it is scored, one line for the table of supported models
    keep_cls: bool  # CLS token at index 0: cls_attention + keep_cls=True; else attention_received
    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]  # the encoder's layer list
    query_key: Callable[[torch.nn.Module], QueryKey]  # one layer's q/k projections
    # (model, pixel_values, **the model's own input options) -> [B, N, C]: everything before layer 0,
    # i.e. what the unpatched model reports as hidden_states[0]
    embed: Callable[..., torch.Tensor]
    # (layer, hidden [B, N, C]) -> its output [B, N, C]: one call of the layer module
    run_layer: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    # (layer, its input hidden states) -> the tensor its attention projects into q / k / v
    attention_input: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    # (model) -> tokens per image at the configured image size (N, CLS included)
    num_tokens: Callable[[torch.nn.Module], int]

    def model_class(self) -> type:
        """The supported class, imported when first asked for (transformers imports lazily)."""
        return getattr(importlib.import_module("transformers"), self.class_name)


@dataclass(frozen=True)
class CompositeFamily:
    """A model that holds a vision tower and is patched around it (LLaVA, LLaVA-NeXT, Qwen-VL)."""

    name: str  # "LLaVA"
    model_types: tuple[str, ...]  # config.model_type values
    classes: tuple[str, ...]  # the supported classes' names, for the table of supported models
    summary: str  # what its LLM gets, one line for the table
    # (model, budget: visionzip_kernels.budget.Budget, layer) -> the patch (LlavaPatch, QwenVLPatch, ...)
    make_patch: Callable[..., object]
    # the patched model takes videos too (pixel_values_videos; Qwen: per temporal slice), so the calibration
    # command accepts video prompts for it
    takes_videos: bool = False
    # the budget is per image, a count or a ratio of each image's tokens (Qwen's packed towers)
    per_image_budget: bool = False
    # config.model_type of the tower when it is no stand-alone encoder: apply() to it names this model
    tower_model_types: tuple[str, ...] = ()
    # apply()'s family-specific keyword options that make_patch takes (LLaVA-OneVision: "video_pooling")
    options: tuple[str, ...] = ()
    # (model) -> the layer apply() reads when none is given; None: the budget defaults' layer (-2, Qwen -1)
    default_layer: Callable[[torch.nn.Module], int] | None = None


def _softmax_scale(attn: torch.nn.Module, head_dim: int) -> float:
    for attr in ("scale", "scaling"):
        value = getattr(attn, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return head_dim**-0.5


class EncoderPatch:
    """VisionZip on one vision encoder instance (see the module docstring for the mechanism).

    Built by :func:`visionzip_kernels.apply`; holds the settings (``dominant``, ``contextual``,
    ``ratio``, ``layer`` as given, ``layer_index`` resolved to 0..n-1, ``keep_cls``, ``family``).
    With a ``ratio``, ``dominant`` and ``contextual`` are ``None`` and each call splits
    ``round(ratio * N)`` of that call's N tokens (:meth:`counts`).
    """

    def __init__(self, model: torch.nn.Module, family: EncoderFamily, dominant: int | None, contextual: int | None,
                 layer: int, ratio: float | None = None):
        self.model = model
        self.family = family
        if ratio is None:
            self.dominant = check_int("dominant", dominant, 1)
            self.contextual = check_int("contextual", contextual, 0)
            self.ratio = None
        else:
            if dominant is not None or contextual is not None:
                raise ValueError("visionzip.apply: ratio= sets dominant and contextual; give one or the other")
            self.dominant = self.contextual = None
            self.ratio = check_ratio(ratio)
        self.layer = check_int("layer", layer)
        self.keep_cls = family.keep_cls
        layers = family.layers(model)
        n = len(layers)
        if not -n <= layer < n:
            raise ValueError(f"visionzip.apply: layer must be in [-{n}, {n - 1}] for this {n}-layer "
                             f"{family.name} encoder, got {layer}")
        self.layer_index = layer % n
        self.num_layers = n
        query_key = family.query_key(layers[self.layer_index])
        self.head_dim = query_key.head_dim
        self.scale = query_key.scale
        # The model's input options the patched forward takes (the family's embed keywords).
        self.input_options = tuple(inspect.signature(family.embed).parameters)[2:]
        # A bound method: pickled as (patch, "forward").
        self._saved_forward = replace_instance_attribute(model, "forward", self.forward)
        self.removed = False

    # -- settings --------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        """The budget and layer as :func:`visionzip_kernels.apply` takes them (to re-apply)."""
        if self.ratio is not None:
            return {"ratio": self.ratio, "layer": self.layer}
        return {"dominant": self.dominant, "contextual": self.contextual, "layer": self.layer}

    def counts(self, num_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) for an input of ``num_tokens`` tokens (N, CLS included)."""
        if self.ratio is None:
            return self.dominant, self.contextual
        # The ratio was checked at apply; N may be a SymInt here (torch.compile, dynamic shapes).
        return split_checked_budget(checked_ratio_tokens(self.ratio, num_tokens))

    def __repr__(self) -> str:
        budget = (f"ratio={self.ratio}" if self.ratio is not None
                  else f"dominant={self.dominant}, contextual={self.contextual}")
        return (f"EncoderPatch({self.family.name}, {budget}, "
                f"layer={self.layer} -> index {self.layer_index} of {self.num_layers})")

    # -- the patched forward ---------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor | None = None, *args, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None, **kwargs):
        """The patched model's forward: embeddings, layers 0..L, VisionZip (module docstring).

        Takes the model's own inputs (``pixel_values`` [B, 3, H, W] and the family's options, e.g.
        ``interpolate_pos_encoding`` for CLIP / SigLIP, ``bool_masked_pos`` for DINOv2). Returns a
        :class:`VisionZipOutput`, or its tuple with ``return_dict=False``.
        """
        model = self.model
        config = model.config
        if output_attentions is None:
            output_attentions = bool(getattr(config, "output_attentions", False))
        if output_attentions:
            raise ValueError(
                f"visionzip: a VisionZip-patched {self.family.name} encoder computes no attention maps "
                "(it keeps SDPA and stops after layer L), so output_attentions=True is not supported; "
                "call visionzip_kernels.remove(model) first for the full model's attentions")
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)
        hidden, q, k, states = self.encode(pixel_values, *args, output_hidden_states=output_hidden_states, **kwargs)
        tokens, keep = self.compress(hidden, q, k)
        out = VisionZipOutput(last_hidden_state=tokens, keep=keep, hidden_states=states)
        return out if return_dict else out.to_tuple()

    def encode(self, pixel_values: torch.Tensor | None, *args, output_hidden_states: bool = False, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Embeddings and layers 0..L on the model's own inputs, without the compression.

        Returns layer L's output [B, N, C], its q and k (:meth:`query_key`: the CLS row [B, H, d] or
        [B, N, H, d], and [B, N, H, d]) and, with ``output_hidden_states``, the L+2 states that ran
        (else ``None``). Used by :meth:`forward`, and by a composite model that selects after its own
        pooling (LLaVA-OneVision's videos).
        """
        if pixel_values is None:
            raise ValueError("visionzip: pixel_values is required")
        model = self.model
        family = self.family
        unknown = [name for name in kwargs if name not in self.input_options]
        if unknown:
            raise TypeError(f"visionzip: a VisionZip-patched {family.name} encoder does not take {unknown}; its "
                            f"inputs are pixel_values and {list(self.input_options)}")
        layers = family.layers(model)
        if len(layers) != self.num_layers:
            raise RuntimeError(
                f"visionzip: the {family.name} encoder has {len(layers)} layers, {self.num_layers} when "
                "visionzip_kernels.apply patched it; apply it again after changing the layer list")
        hidden = family.embed(model, pixel_values, *args, **kwargs)
        states = [hidden] if output_hidden_states else None
        for index in range(self.layer_index):
            hidden = family.run_layer(layers[index], hidden)
            if states is not None:
                states.append(hidden)
        layer = layers[self.layer_index]
        layer_input = hidden
        hidden = family.run_layer(layer, layer_input)
        if states is not None:
            states.append(hidden)
        q, k = self.query_key(layer, layer_input)
        return hidden, q, k, tuple(states) if states is not None else None

    def query_key(self, layer: torch.nn.Module, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer L's q and k from its own projections on its attention input: the CLS query row
        [B, H, d] for CLS encoders, else q [B, N, H, d]; k [B, N, H, d]."""
        projections = self.family.query_key(layer)
        # The selection and the assignment are discrete: no gradient flows to q, k, scores or metric
        # (docs/SPEC.md "Gradients"), so q and k are computed without autograd.
        with torch.no_grad():
            attention_input = self.family.attention_input(layer, layer_input)
            q = projections.q_proj(attention_input).unflatten(-1, (-1, self.head_dim))
            if self.keep_cls:
                q = q[:, 0].contiguous()  # only the CLS row is used: the full q can be freed
            k = projections.k_proj(attention_input).unflatten(-1, (-1, self.head_dim))
        return q, k

    def compress(self, hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores, metric and ``select_merge`` on layer L's output and q / k.

        ``q`` is the CLS row [B, H, d] for CLS encoders, else [B, N, H, d]; ``k`` is [B, N, H, d].
        """
        q, k = q.detach(), k.detach()
        if self.keep_cls:
            q = q.unsqueeze(1)  # the CLS row as a one-query [B, 1, H, d]
        dominant, contextual = self.counts(hidden.shape[1])
        scores, metric = ops.scores_and_metric(q, k, self.scale, self.keep_cls)
        return ops.select_merge(hidden, scores, metric, dominant, contextual, self.keep_cls)

    # -- removal ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restores the instance's previous ``forward``; idempotent."""
        if self.removed:
            return
        restore_instance_attribute(self.model, "forward", self._saved_forward)
        self.removed = True
