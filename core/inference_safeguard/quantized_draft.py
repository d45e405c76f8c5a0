"""Self-drafts: the base model itself, in cheaper arithmetic, as its own draft model.

A draft model only pays when it agrees with the base model and costs less. The base
model's own weights in bfloat16, or quantized to 8 or 4 bits per weight (weight-only:
activations stay in bfloat16, so activation outliers survive, unlike dynamic int8
activation quantization), give a draft that shares the tokenizer, agrees with the
base on nearly every token, and reads 2-8x fewer weight bytes per forward. Speculative
sampling keeps the candidates exact: they follow the full-precision base model.

Kinds (`SELF_DRAFT_KINDS`), each a spelling of `draft_model`:

- `"self:bf16"`: every weight in bfloat16 (any device);
- `"self:int8"`: linear layers int8 per output channel (`aten._weight_int8pack_mm`, CPU);
- `"self:int4"`: linear layers int4 in groups of `INT4_GROUP_SIZE` input channels,
  asymmetric (`aten._weight_int4pack_mm_for_cpu`, CPU).

The embeddings and norms stay in bfloat16; a tied output head is quantized as its own
copy, the embedding table left whole.
"""

from __future__ import annotations

import copy
from typing import Literal, cast, get_args

import torch
from torch import nn

from inference_safeguard.errors import DraftModelError
from inference_safeguard.lm import CausalLM, LanguageModel

SelfDraftKind = Literal["bf16", "int8", "int4"]
SELF_DRAFT_PREFIX = "self:"
SELF_DRAFT_KINDS: tuple[str, ...] = tuple(
    SELF_DRAFT_PREFIX + kind for kind in get_args(SelfDraftKind)
)
"""The `draft_model` spellings that make a self-draft of the base model."""

INT4_GROUP_SIZE = 32
"""Input channels sharing one int4 scale and zero point."""

KERNELS: dict[str, tuple[str, ...]] = {
    "int8": ("_weight_int8pack_mm",),
    "int4": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
}
"""The aten operators each quantized kind runs on (the int4 ones came with torch 2.6)."""


def missing_kernels(kind: str) -> list[str]:
    """The aten operators `kind` needs that this torch build lacks (none for bf16)."""
    return [op for op in KERNELS.get(kind, ()) if not hasattr(torch.ops.aten, op)]


def is_self_draft(draft_model: str) -> bool:
    """Whether `draft_model` asks for a self-draft (starts with `self:`)."""
    return draft_model.startswith(SELF_DRAFT_PREFIX)


def self_draft_kind(draft_model: str) -> SelfDraftKind:
    """The kind in a `self:...` spelling.

    Raises:
        DraftModelError: not one of `SELF_DRAFT_KINDS`.
    """
    kind = draft_model.removeprefix(SELF_DRAFT_PREFIX)
    if draft_model not in SELF_DRAFT_KINDS:
        raise DraftModelError(
            f"unknown self-draft {draft_model!r}; use one of {', '.join(SELF_DRAFT_KINDS)} "
            "(the base model in bfloat16, or its linear layers quantized to 8 or 4 bits)"
        )
    return cast(SelfDraftKind, kind)


class Int8WeightLinear(nn.Module):
    """A linear layer with int8 weights, one bfloat16 scale per output channel.

    Args:
        linear: the layer to quantize (weights `(out, in)`); it is not modified.

    Forward: `(..., in)` bfloat16 -> `(..., out)` bfloat16.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return cast(torch.Tensor, out.reshape(*x.shape[:-1], out.shape[-1]))


class Int4WeightLinear(nn.Module):
    """A linear layer with int4 weights, asymmetric per group of `group_size` inputs.

    Args:
        linear: the layer to quantize (weights `(out, in)`, `in` a multiple of
            `group_size`); it is not modified.
        group_size: input channels per scale and zero point.

    Forward: `(..., in)` bfloat16 -> `(..., out)` bfloat16.
    """

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        weight = linear.weight.detach().float().reshape(out_features, -1, group_size)
        low, high = weight.amin(-1), weight.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-12)
        levels = torch.round((weight - low[..., None]) / scale[..., None]).clamp(0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            levels.to(torch.int32).reshape(out_features, in_features), 1
        )
        # The kernel computes (level - 8) * scale + zero, so zero is the value of level 8.
        scales_and_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1)
        self.group_size = group_size
        self.out_features = out_features
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight, self.group_size, self.scales_and_zeros
        )
        if self.bias is not None:
            out = out + self.bias
        return cast(torch.Tensor, out.reshape(*x.shape[:-1], self.out_features))


def _quantize_linears(model: nn.Module, kind: SelfDraftKind) -> None:
    """Replace every `nn.Linear` of `model` in place by its weight-only quantized form."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if kind == "int4" and child.in_features % INT4_GROUP_SIZE:
                raise DraftModelError(
                    f"layer {name}.{child_name} has {child.in_features} inputs, not a multiple "
                    f"of {INT4_GROUP_SIZE}; use the self:int8 or self:bf16 self-draft"
                )
            quantized = Int8WeightLinear(child) if kind == "int8" else Int4WeightLinear(child)
            setattr(module, child_name, quantized)


def quantized_draft(lm: LanguageModel, kind: str = "int8") -> CausalLM:
    """A draft model for `lm`: its own weights in bfloat16, or weight-only int8 or int4.

    The base model is copied, not modified (the copy's weights take 1/2, 1/4 or about
    1/6 of the float32 base's memory, plus a bfloat16 embedding table).

    Args:
        lm: the base model's Hugging Face backend.
        kind: `"bf16"`, `"int8"` or `"int4"` (or the same with the `self:` prefix).

    Returns:
        A `CausalLM` on the base model's tokenizer, for `SpeculativeCausalLM`.

    Raises:
        DraftModelError: `lm` is not a `CausalLM`, an unknown kind, `bf16` for a base
            model already in bfloat16, a quantized kind for a model off the CPU (the
            int8 and int4 kernels are CPU ones) or for a torch without its kernels
            (`missing_kernels`), or an int4 layer whose input size is not a multiple of
            `INT4_GROUP_SIZE`.
    """
    if not isinstance(lm, CausalLM):
        raise DraftModelError(
            f"a self-draft needs the Hugging Face backend (a CausalLM), not a "
            f"{type(lm).__name__}; "
            "drop draft_model or use backend='huggingface'"
        )
    name = kind if is_self_draft(kind) else SELF_DRAFT_PREFIX + kind
    chosen = self_draft_kind(name)
    if chosen != "bf16" and lm.device.type != "cpu":
        raise DraftModelError(
            f"the self:{chosen} draft runs CPU kernels, and the base model is on "
            f"{lm.device}; use draft_model='self:bf16' there"
        )
    missing = missing_kernels(chosen)
    if missing:
        raise DraftModelError(
            f"torch {torch.__version__} has no {', '.join(missing)} kernel, which the "
            f"self:{chosen} draft runs on; upgrade torch (2.6 or later) or use "
            f"{'self:int8 or ' if chosen == 'int4' else ''}self:bf16"
        )
    if chosen == "bf16" and lm.model.dtype == torch.bfloat16:
        raise DraftModelError(
            "the base model is already in bfloat16, so self:bf16 would draft with the base "
            "model itself at the same cost; use self:int8 or self:int4"
        )
    model = copy.deepcopy(lm.model).to(torch.bfloat16)
    if chosen != "bf16":
        _quantize_linears(model, chosen)
    return CausalLM(
        model.eval(),
        lm.tokenizer,
        allow_special_tokens_in_content=lm.allow_special_tokens_in_content,
    )
