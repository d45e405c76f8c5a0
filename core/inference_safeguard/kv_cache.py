"""Fan-out, pruning and block rewinding of a transformers cache, for every layer layout.

The search copies rows of the cache (fan-out), keeps some of them (pruning) and, when
it resamples a block, puts the cache back as it was before the block. transformers'
`crop` can do the last only for full-attention layers: a sliding-window layer has
already dropped the tokens the block pushed out of its window, and a linear-attention
layer (Mamba, Mamba2, gated DeltaNet, short convolutions: a fixed-size recurrent or
convolution state) overwrites its state in place. So a `CacheCheckpoint` keeps, per
layer, only what that layer cannot get back by itself:

- full attention (`DynamicLayer`): nothing; the block is cropped off.
- sliding window (`DynamicSlidingWindowLayer`): a copy of the oldest `min(block, window)`
  cached tokens, the only ones a block can push out (block-sized, not window-sized);
  restoring joins them to what is left of the window.
- linear attention (`LinearAttentionLayer`): a copy of its convolution and recurrent
  states (their size does not grow with the text).
- hybrid layers (linear attention plus full or sliding attention): both of the above.
- a layer class not listed here (a model's own subclass): a copy of every tensor it
  holds; exact for any layer, at the price of copying its cache once per block.

Merging the rows of two full-attention caches (requests that join a running search)
left-pads the shorter one's keys and values (`merge_rows`).

A full-attention layer of transformers (`DynamicLayer`) grows by `torch.cat` at every
token, copying every row's keys and values: work per row that a batch of many rows pays
at every step. `with_headroom` turns those layers into `HeadroomLayer`s, which keep their
keys and values in a buffer with room for `HEADROOM` more positions and write each new
token into it, copying only when the room runs out or the rows change (fan-out, pruning,
merging give the layer new tensors).

Fan-out and pruning go through the Cache API: `batch_repeat_interleave` and
`batch_select_indices`, except where a layer's versions miss part of its state
(linear-attention layers in transformers 5.x implement neither, and hybrid layers
inherit the attention-only ones); those are reordered with `reorder_cache`, which
covers all of it. A cache that is not a list of layers (the per-model hybrid caches
of older transformers releases) is rejected by `check_cache_support`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, cache_utils

from inference_safeguard.hf_compat import output_cache

_FULL = cache_utils.DynamicLayer
HEADROOM = 32
"""Positions a `HeadroomLayer` allocates beyond what it holds when it copies: a block of
up to 32 tokens decodes without a copy after its first token."""


class HeadroomLayer(cache_utils.DynamicLayer):
    """A `DynamicLayer` whose `(rows, heads, seq, head_dim)` keys and values are views of
    the first `seq` positions of larger buffers, so that `update` writes the new positions
    in place instead of concatenating. Everything else (crop, fan-out, pruning, merging)
    is `DynamicLayer`'s: they replace `keys` and `values` (a crop by a shorter view of
    the same buffer, whose dropped positions the next `update` overwrites), and `update`
    copies into new buffers whenever `keys` is no longer such a view or has no room."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `(rows, heads, new, head_dim)` states; returns all keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        buffers = self._buffers if self._has_room(end) else None
        if buffers is None:
            self._buffers = None  # freed before the new ones are allocated
            buffers = (
                _with_room(self.keys, key_states, length, end + HEADROOM),
                _with_room(self.values, value_states, length, end + HEADROOM),
            )
            self._buffers = buffers
        keys, values = buffers
        keys[..., length:end, :] = key_states
        values[..., length:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        """`DynamicLayer`'s, and the buffers are let go at once (the rows are new)."""
        super().batch_repeat_interleave(repeats)
        self._buffers = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """`DynamicLayer`'s, and the buffers are let go at once (the rows are new)."""
        super().batch_select_indices(indices)
        self._buffers = None

    def _has_room(self, end: int) -> bool:
        """Whether `keys` and `values` are the first positions of the buffers, which hold
        `end` positions and can be written here (an inference tensor only in inference
        mode)."""
        if self._buffers is None or self.get_seq_length() == 0:
            return False
        return all(
            held is not None
            and held.data_ptr() == buffer.data_ptr()
            and held.stride() == buffer.stride()
            and held.shape[:2] == buffer.shape[:2]
            and end <= buffer.shape[-2]
            and (torch.is_inference_mode_enabled() or not buffer.is_inference())
            for held, buffer in zip((self.keys, self.values), self._buffers, strict=True)
        )


def _with_room(
    held: torch.Tensor | None, new: torch.Tensor, length: int, size: int
) -> torch.Tensor:
    """A `(rows, heads, size, head_dim)` buffer like `new` whose first `length` positions
    are `held`'s."""
    rows, heads, _, head_dim = new.shape
    buffer = new.new_empty((rows, heads, size, head_dim))
    if length and held is not None:
        buffer[..., :length, :] = held
    return buffer


def with_headroom(cache: Any) -> Any:
    """`cache` with its `DynamicLayer`s (exactly that class) replaced by `HeadroomLayer`s
    holding the same state, in place; other layers and caches are left as they are."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return cache
    for index, layer in enumerate(layers):
        if type(layer) is _FULL:
            roomy = HeadroomLayer.__new__(HeadroomLayer)
            roomy.__dict__.update(layer.__dict__)
            layers[index] = roomy
    return cache


_LINEAR = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
"""Base of linear-attention layers (absent before transformers added them to `Cache`)."""

_LAYOUTS: dict[type, tuple[str | None, bool]] = {
    cls: layout
    for name, layout in (
        ("DynamicLayer", ("full", False)),
        ("DynamicSlidingWindowLayer", ("sliding", False)),
        ("LinearAttentionLayer", (None, True)),
        ("LinearAttentionAndFullAttentionLayer", ("full", True)),
        ("LinearAttentionAndSlidingWindowAttentionLayer", ("sliding", True)),
        ("DummyLayer", (None, False)),
    )
    if (cls := getattr(cache_utils, name, None)) is not None
}
_LAYOUTS[HeadroomLayer] = ("full", False)
"""Exact layer class -> (attention kind or None, whether it holds linear-attention states).
Subclasses are not matched: they may hold state their base does not know of."""

_FULL_ATTENTION_ONLY = (("full", False), (None, False))
"""Layouts of layers that hold the keys and values of every token only (or nothing)."""

_LINEAR_STATE = (
    "conv_states",
    "recurrent_states",
    "has_previous_state",
    "is_conv_states_initialized",
    "is_recurrent_states_initialized",
)
"""Attributes of a linear-attention layer that a block changes."""


def check_cache_support(model: PreTrainedModel, cache_keyword: str, device: torch.device) -> bool:
    """Check, with a one-token forward, that the guard can fan out, prune and rewind the
    cache `model` builds.

    Args:
        cache_keyword: the keyword `model.forward` takes its cache by (see
            `inference_safeguard.hf_compat.cache_keyword`).
        device: where the model takes its input ids.

    Returns:
        Whether the model attends over past tokens. One that does not (Mamba: every
        layer a recurrent state) reads its attention mask as that of the tokens fed
        now, not of the whole sequence.

    Raises:
        NotImplementedError: the model keeps its state in a form this module cannot
            fan out, prune or rewind (no cache, or one that is not a list of transformers
            cache layers, as older transformers releases do for hybrid models), saying
            which model and what to do.
    """
    if device.type == "meta":
        return True
    with torch.inference_mode():
        out = model(
            input_ids=torch.zeros((1, 1), dtype=torch.long, device=device),
            attention_mask=torch.ones((1, 1), dtype=torch.long, device=device),
            use_cache=True,
            **{cache_keyword: None},
        )
    cache = output_cache(out)
    if isinstance(cache, cache_utils.Cache) and isinstance(getattr(cache, "layers", None), list):
        return any(_LAYOUTS.get(type(layer), ("opaque",))[0] for layer in cache.layers)
    raise _unsupported(
        model, "no cache" if cache is None else f"its state in a {type(cache).__name__}"
    )


def no_cache_error(model: PreTrainedModel) -> Exception:
    """The error for a model whose `forward` takes no cache by a name the guard knows:
    NotImplementedError for a recurrent state passed as `cache_params` (Mamba models
    under older transformers releases), else TypeError (not an incremental decoder)."""
    if "cache_params" in inspect.signature(model.forward).parameters:
        return _unsupported(model, "its recurrent state as `cache_params`")
    return TypeError(
        f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor "
        "`past_key_values`); the guard needs a causal LM that decodes incrementally"
    )


def _unsupported(model: PreTrainedModel, found: str) -> NotImplementedError:
    model_type = getattr(model.config, "model_type", None) or type(model).__name__
    return NotImplementedError(
        f"{type(model).__name__} (model type {model_type!r}) returns {found} under "
        f"transformers {transformers.__version__}, which the guard cannot fan out, prune "
        "or rewind: it needs a transformers Cache made of layers (linear-attention and "
        "hybrid models have one in releases with LinearAttentionLayer, such as 5.24); "
        "upgrade transformers if this release is older, else use another model"
    )


def is_full_attention_cache(cache: Any) -> bool:
    """Whether `cache` is a transformers cache whose layers all keep the keys and values
    of every token (no sliding window, no recurrent state, no layer class unknown here)."""
    layers = getattr(cache, "layers", None)
    return (
        isinstance(cache, cache_utils.Cache)
        and isinstance(layers, list)
        and all(_LAYOUTS.get(type(layer)) in _FULL_ATTENTION_ONLY for layer in layers)
    )


def repeat_rows(cache: Any, repeats: int, rows: int) -> None:
    """Repeat every row of `cache` (`rows` of them) `repeats` times, in place: row i
    becomes rows `i*repeats .. i*repeats + repeats-1`."""
    if _overrides(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(repeats)
        return
    index: torch.Tensor | None = None
    for layer in cache.layers:
        if _reorders(layer):
            if index is None:
                index = torch.arange(rows).repeat_interleave(repeats)
            layer.reorder_cache(index)
        else:
            layer.batch_repeat_interleave(repeats)


def select_rows(cache: Any, indices: torch.Tensor) -> None:
    """Keep rows `indices` of `cache` (`(new_rows,)` long, repeats allowed), in place."""
    if _overrides(cache, "batch_select_indices"):
        cache.batch_select_indices(indices)
        return
    for layer in cache.layers:
        if _reorders(layer):
            layer.reorder_cache(indices)
        else:
            layer.batch_select_indices(indices)


def merge_rows(cache: Any, other: Any) -> None:
    """Append `other`'s rows to `cache`, in place, for full-attention caches (see
    `is_full_attention_cache`): per layer, the shorter `(rows, heads, seq, head_dim)` keys
    and values are left-padded with zeros along `seq` (positions the attention mask
    hides) and the rows concatenated.

    Raises:
        NotImplementedError: either cache is not full attention. A sliding window holds a
            suffix whose start differs between the two, and a recurrent state has no
            sequence axis to pad; their rows are decoded in separate batches instead.
    """
    if not (is_full_attention_cache(cache) and is_full_attention_cache(other)):
        raise NotImplementedError(
            "only full-attention caches can take the rows of another batch; a "
            "sliding-window or linear-attention model decodes each batch on its own"
        )
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        if _kv_length(extra) == 0:
            continue
        if _kv_length(layer) == 0:
            raise ValueError("cannot merge a cache layer that holds no keys yet")
        length = max(_kv_length(layer), _kv_length(extra))
        layer.keys = torch.cat([_left_pad(layer.keys, length), _left_pad(extra.keys, length)])
        layer.values = torch.cat([_left_pad(layer.values, length), _left_pad(extra.values, length)])


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    """`(rows, heads, seq, head_dim)` padded with zeros on the left of `seq` to `length`."""
    return torch.nn.functional.pad(states, (0, 0, length - states.shape[-2], 0))


def _overrides(cache: Any, method: str) -> bool:
    """Whether `cache`'s class replaces `Cache`'s own per-layer `method` (a model's own
    cache that knows its layers better than this module)."""
    return getattr(type(cache), method, None) is not getattr(cache_utils.Cache, method)


def _reorders(layer: Any) -> bool:
    """Whether `layer` must be fanned out and pruned with `reorder_cache`: its
    `batch_*` methods are missing or skip its linear-attention states."""
    if _LINEAR is not None and isinstance(layer, _LINEAR):
        return True
    return not callable(getattr(layer, "batch_select_indices", None))


# ------------------------------------------------------------------------ rewinding
@dataclass(frozen=True)
class CacheCheckpoint:
    """What it takes to put a cache back as it was before a block of at most `tokens`
    tokens was decoded into it; `restore` may be called any number of times."""

    layers: tuple[tuple[Callable[[Any], None], ...], ...]

    @classmethod
    def take(cls, cache: Any, tokens: int) -> CacheCheckpoint:
        """Checkpoint `cache` before decoding a block of `tokens` tokens into it."""
        return cls(tuple(_layer_checkpoint(layer, tokens) for layer in cache.layers))

    def restore(self, cache: Any) -> None:
        """Put `cache` (the checkpointed one, same rows) back as it was."""
        for layer, restorers in zip(cache.layers, self.layers, strict=True):
            for restore in restorers:
                restore(layer)


def _layer_checkpoint(layer: Any, tokens: int) -> tuple[Callable[[Any], None], ...]:
    layout = _LAYOUTS.get(type(layer))
    if layout is None:  # all of it, tensors copied
        return (_Attributes.take(layer, tuple(vars(layer))),)
    attention, linear = layout
    parts: list[Callable[[Any], None]] = []
    if attention == "full":
        parts.append(_FullAttention(_kv_length(layer)))
    elif attention == "sliding":
        parts.append(_SlidingWindow.take(layer, tokens))
    if linear:
        parts.append(_Attributes.take(layer, _LINEAR_STATE))
    return tuple(parts)


def _kv_length(layer: Any) -> int:
    """Tokens held in the layer's key tensor (`(rows, heads, seq, head_dim)`)."""
    keys = getattr(layer, "keys", None)
    if keys is None or keys.numel() == 0:
        return 0
    return keys.shape[-2]


@dataclass(frozen=True)
class _FullAttention:
    """A full-attention layer keeps every token: cropping the block off restores it."""

    length: int

    def __call__(self, layer: Any) -> None:
        extra = _kv_length(layer) - self.length
        if extra > 0:  # `crop(0)` empties the layer on older transformers releases
            # Called on the attention base so that a hybrid layer's `crop` does not
            # also try to crop its linear-attention states.
            _FULL.crop(layer, -extra)


@dataclass(frozen=True)
class _SlidingWindow:
    """A sliding-window layer holds a suffix of the token stream, at most its window.

    A block of `block` tokens pushes at most `block` of the cached tokens out, always
    the oldest, so those are all a checkpoint copies.
    """

    keys_head: torch.Tensor | None
    values_head: torch.Tensor | None
    length: int
    cumulative_length: int
    block: int

    @classmethod
    def take(cls, layer: Any, block: int) -> _SlidingWindow:
        length = _kv_length(layer)
        head = min(block, length)
        return cls(
            keys_head=layer.keys.narrow(-2, 0, head).clone() if length else None,
            values_head=layer.values.narrow(-2, 0, head).clone() if length else None,
            length=length,
            cumulative_length=layer.cumulative_length,
            block=block,
        )

    def __call__(self, layer: Any) -> None:
        fed = layer.cumulative_length - self.cumulative_length
        if fed == 0:
            return
        if not 0 < fed <= self.block:
            raise RuntimeError(
                f"a sliding-window cache layer took {fed} tokens since its checkpoint, "
                f"which was taken for a block of {self.block}; it cannot be rewound"
            )
        kept = min(max(_kv_length(layer) - fed, 0), self.length)
        missing = self.length - kept
        if self.keys_head is None or self.values_head is None:
            layer.keys = layer.keys.narrow(-2, 0, 0)
            layer.values = layer.values.narrow(-2, 0, 0)
        else:
            layer.keys = torch.cat(
                [self.keys_head.narrow(-2, 0, missing), layer.keys.narrow(-2, 0, kept)], dim=-2
            )
            layer.values = torch.cat(
                [self.values_head.narrow(-2, 0, missing), layer.values.narrow(-2, 0, kept)],
                dim=-2,
            )
        layer.cumulative_length = self.cumulative_length


@dataclass(frozen=True)
class _Attributes:
    """Copies of some of a layer's attributes (tensors cloned, containers copied)."""

    saved: dict[str, Any]

    @classmethod
    def take(cls, layer: Any, names: tuple[str, ...]) -> _Attributes:
        return cls({name: _copy(getattr(layer, name)) for name in names if hasattr(layer, name)})

    def __call__(self, layer: Any) -> None:
        # Copies again: a layer updates some states in place, and a checkpoint may be
        # restored more than once.
        for name, value in self.saved.items():
            setattr(layer, name, _copy(value))


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    return value
