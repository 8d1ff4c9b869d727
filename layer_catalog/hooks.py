"""The capture core of both backends: attach taps to a network for one run, capture their tensors, detached unless
asked to keep them on the autograd graph (grad=True).

    with FeatureCapture(unet, taps, device="cpu", early_exit=True) as cap:
        cap.run(sample, t, encoder_hidden_states=text)     # a forward of the network itself
        cap.call(model.apply_model, x, sigma, **cond)      # or anything that calls it (ComfyUI's model call)
    features = cap.features            # {layer id: tensor}, in the order the ids were requested

Everything is read by plain forward hooks: module outputs, the network's input, and attention maps rebuilt from
each attention's own query and key projections (attention_maps.py). The same class serves diffusers denoisers and
ComfyUI's networks; only the taps' module paths differ. Whatever happens inside the `with` block (an exception,
KeyboardInterrupt, an early exit), the network leaves it with exactly the hooks it had.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .attention_maps import apply_rope, attention_params, attention_probs, head_probs, split_heads
from .errors import DiffusionFeatureError, echo
from .hook_set import AttachedHooks, HookSet, module_lookup
from .tap import Tap

# The names under which the hooked modules take their input: diffusers' blocks and attentions take hidden_states,
# its UNet sample, ComfyUI's blocks x.
_INPUT_NAMES = ("hidden_states", "sample", "x")


class _EarlyExit(Exception):
    """Raised by the last tap to fire, to skip the rest of the forward. Never leaves `FeatureCapture.run`."""


class TokenGridError(DiffusionFeatureError, RuntimeError):
    """A token-shaped tensor does not match the spatial grid recorded for it."""


class ReferenceImageError(DiffusionFeatureError, ValueError):
    """A reference-image id (`vit-block{B}-ref{I}-...`) asked of a run with fewer reference images."""


# What a reference id asked of a run without references is told, by where the run's references come from (the
# Tap's ref_read form): ComfyUI's network takes them from the conditioning; diffusers' only as a pipeline passes them.
_NO_REFERENCE = {
    "latents": "this conditioning carries no reference image; add one with ReferenceLatent / TextEncodeQwenImageEdit",
    "shapes": "the network was called without reference images (DF_MODEL runs take none: capture reference ids from "
              "ComfyUI's MODEL with DFExtractNative / DFCaptureLayers and ReferenceLatent)",
}
_NO_REFERENCE["ids"] = _NO_REFERENCE["shapes"]


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, (torch.Tensor, list)):  # a list: per-sample latents (diffusers' Z-Image)
        return sample
    raise TypeError(f"cannot read a tensor from a {type(output).__name__}")


def first_input(args, kwargs, names=_INPUT_NAMES):
    """The tensor a module was called with: its first positional argument, else the first of `names` given."""
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise TypeError("the hooked module was called without its input tensor")


def tokens_to_grid(layer_id: str, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, H, W) on the grid recorded for them (never guessed from sqrt(N))."""
    h, w = grid
    b, n, c = x.shape
    if n != h * w:
        raise TokenGridError(f"{layer_id}: {n} tokens do not fit the recorded {h}x{w} grid")
    return x.transpose(1, 2).reshape(b, c, h, w)


def pack_tokens(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p): the inverse of unpack_tokens (diffusers' FluxPipeline layout)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_tokens(layer_id: str, x: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, N, C * p * p) patchified tokens (channel, then patch row, then patch column, as Flux packs its latent)
    -> (B, C, h * p, w * p)."""
    h, w = grid
    b, n, cpp = x.shape
    if n != h * w or cpp % (patch * patch):
        raise TokenGridError(f"{layer_id}: {n} tokens of width {cpp} are not a {h}x{w} grid of {patch}x{patch} patches")
    c = cpp // (patch * patch)
    return x.reshape(b, h, w, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * patch, w * patch)


# Kinds that feature_resize never pools: maps, text tokens (C, T) and per-sample vectors have no spatial grid.
UNPOOLED_KINDS = ("map", "text", "vector")


def pool_spatial(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool the last two (spatial) dimensions to (H // factor, W // factor), each at least 1."""
    h, w = x.shape[-2:]
    return F.adaptive_avg_pool2d(x, (max(1, h // factor), max(1, w // factor)))


def owned(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """x, copied if it still shares memory with the model's activation `source` (a view, a row slice): the model
    may reuse or edit its activation in place afterwards (ControlNet residuals are added with +=), and a feature
    must not change."""
    if x.device.type != "meta" and x.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return x.clone()
    return x


def _slice(x: torch.Tensor, part: tuple[int, int] | None) -> torch.Tensor:
    """The i-th of n equal slices of the last axis (one projection of a fused qkv linear)."""
    if part is None:
        return x
    i, n = part
    width = x.shape[-1] // n
    return x[..., i * width:(i + 1) * width]


def _pick_output(output, item):
    return _first_tensor(output) if item is None else output[item]


def _pick_input(args, kwargs, item):
    if item is None:
        return first_input(args, kwargs)
    name, position = item
    return kwargs[name] if name in kwargs else args[position]


def _pick_optional(args, kwargs, item: tuple[str, int]):
    """An input the module may be called without (a keyword, or its position): None when absent."""
    name, position = item
    return kwargs.get(name, args[position] if len(args) > position else None)


def _batched(x):
    """A list of per-sample latents (C, F, H, W) with one frame, as diffusers' Z-Image takes and returns them, as one
    batch (B, C, H, W); a tensor as it is."""
    if isinstance(x, (list, tuple)):
        return torch.stack(list(x)).flatten(2, 3)
    return x


def _merge_heads(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-head tensors as (B, N, heads * d)."""
    if layout == "bnhd":
        return x.flatten(2)
    if layout == "bhnd":
        return x.transpose(1, 2).flatten(2)
    return x


def _rms_per_head(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """(B, N, heads * d) -> (B, N, heads, d) with each head's d channels RMS-normalised by `norm`'s weight (d,) and
    eps, as the model's q_norm / k_norm would have."""
    weight = norm.weight.to(device=x.device, dtype=x.dtype)
    heads = x.reshape(*x.shape[:-1], -1, weight.shape[0])
    return torch.nn.functional.rms_norm(heads, weight.shape, weight, norm.eps)


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)  # patchifying networks pad a side that the patch does not divide


def _text_padding(mask: torch.Tensor | None, k: torch.Tensor, text: tuple[int, int], select) -> torch.Tensor | None:
    """An additive bias (B, 1, 1, keys) of -inf at the padded text keys of a joint sequence whose text tokens are
    `text` = (start, length), from a (B, T) mask true at real tokens; None without a mask."""
    if mask is None:
        return None
    padded = ~select(mask).to(device=k.device, dtype=torch.bool)
    bias = torch.zeros(padded.shape[0], 1, 1, k.shape[2], dtype=k.dtype, device=k.device)
    bias[..., text[0]:text[0] + text[1]].masked_fill_(padded[:, None, None, :], float("-inf"))
    return bias


class FeatureCapture(AttachedHooks):
    """Captures the tensors of `taps` on every forward of `model` while the context is open.

    dtype / device: where captured tensors go (None keeps the tensor's own; device="cpu" offloads as captured).
    feature_resize: an integer factor f >= 1; spatial taps are average-pooled to (H // f, W // f). Maps never.
    early_exit: `run` / `call` stop the forward once every tap has fired (returning None).
    token_grid: (H, W) of the latent for networks whose input does not show it (diffusers' Flux takes packed
    tokens); taps without a grid_path read their grid from it.
    grad: keep captured tensors on the autograd graph (no detach, maps computed with grad) so a loss on the
    features trains the network; by default they are detached.
    on_capture: optional callback(layer_id, tensor) after each capture (e.g. to count or stream).
    enabled / rows: attributes a multi-step run may change between forwards: `enabled = False` makes the hooks
    return at once (steps that are not captured); `rows` (None for all, a slice, or a 1-D LongTensor of row
    indices) keeps only those batch rows, e.g. the conditional half of a classifier-free-guidance batch, before any
    copy is made; maps are computed for those rows only.
    """

    def __init__(self, model: torch.nn.Module, taps: Iterable[Tap], *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, feature_resize: int = 1, early_exit: bool = False,
                 on_capture: Callable[[str, torch.Tensor], None] | None = None,
                 rows: slice | torch.Tensor | None = None, token_grid: tuple[int, int] | None = None,
                 grad: bool = False):
        self.model = model
        self.taps = list(taps)
        ids = [t.id for t in self.taps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a layer id was requested twice: {sorted({i for i in ids if ids.count(i) > 1})}")
        if not isinstance(feature_resize, int) or feature_resize < 1:
            raise ValueError(f"feature_resize must be an integer >= 1, got {echo(feature_resize)}")
        self.dtype, self.device = dtype, (torch.device(device) if device is not None else None)
        self.feature_resize, self.early_exit, self.on_capture = feature_resize, early_exit, on_capture
        self.enabled = True
        self.rows = rows
        self.token_grid = token_grid
        self.grad = grad
        self.features: dict[str, torch.Tensor] = {}
        self._grids: dict[tuple[str | None, int], tuple[int, int]] = {}
        self._texts: dict[str, int] = {}
        self._queries: dict[str, tuple[torch.Tensor, int]] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._pieces: dict[str, dict[str, torch.Tensor]] = {}
        self._norms: dict[str, torch.nn.Module] = {}  # norm_path -> the RMSNorm module a column read applies
        self._references: dict[tuple, object] = {}  # ref_read -> what the network's call says of its references
        self._ref_grids: dict[tuple, list[tuple[int, int]]] = {}

    # ---- attach (AttachedHooks removes it all when the block ends) ------------------------------------------
    def _attach(self, hooks: HookSet) -> None:
        module = module_lookup(self.model, "network")
        self._norms = {path: module(path) for t in self.taps for path in (t.norm_path, t.key_norm_path) if path}
        for grid in {(t.grid_path, t.grid_divisor) for t in self.taps if t.grid_path is not None and (
                t.kind in ("tokens", "packed", "map") or t.text_path is not None)}:  # text: for token_ranges
            hooks.forward_pre_hook(module(grid[0]), self._grid_hook(grid), with_kwargs=True)
        for read in {t.ref_read for t in self.taps if t.ref_read is not None}:
            hooks.forward_pre_hook(module(""), self._reference_hook(read), with_kwargs=True)
        for path, item, mask in {(t.text_path, t.text_item, t.text_kept_arg) for t in self.taps
                                 if t.text_path is not None}:
            hooks.forward_pre_hook(module(path), self._text_hook(path, item, mask), with_kwargs=True)
        for tap in self.taps:
            target = module(tap.module_path)
            if tap.kind == "input" or tap.at == "input":
                hooks.forward_pre_hook(target, self._input_hook(tap), with_kwargs=True)
            elif tap.kind != "map":
                hooks.forward_hook(target, self._output_hook(tap))
            elif tap.text_path is not None:
                self._attach_joint_map(hooks, module, tap)
            else:
                attention = module(tap.attention_path)
                heads, upcast = attention_params(attention)
                if hasattr(attention, "prepare_attention_mask"):  # diffusers: the mask arrives as a keyword
                    hooks.forward_pre_hook(attention, self._mask_hook(tap, attention, heads), with_kwargs=True)
                if tap.key_path == tap.module_path:  # q and k from one fused projection
                    hooks.forward_hook(target, self._fused_map_hook(tap, heads, upcast))
                else:
                    hooks.forward_hook(target, self._query_hook(tap))
                    hooks.forward_hook(module(tap.key_path), self._key_hook(tap, heads, upcast))

    def _attach_joint_map(self, hooks: HookSet, module, tap: Tap) -> None:
        heads, upcast = attention_params(module(tap.attention_path))
        roles = {"q": tap.module_path, "k": tap.key_path}
        if tap.text_query_path is not None:
            roles.update(q_txt=tap.text_query_path, k_txt=tap.text_key_path)
        for role, path in roles.items():
            hooks.forward_hook(module(path), self._piece_hook(tap, role, len(roles), heads, upcast))
        if tap.rope is not None or tap.text_mask_arg is not None:
            hooks.forward_pre_hook(module(tap.rope_path), self._rope_hook(tap), with_kwargs=True)

    def _detached(self) -> None:
        self._queries.clear()
        self._masks.clear()
        self._pieces.clear()

    # ---- hooks -----------------------------------------------------------------------------------------
    def _select(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return x
        if isinstance(rows, slice):
            return x[rows]
        return x.index_select(0, rows.to(x.device))

    def _grid_hook(self, grid: tuple[str, int]):
        def hook(_module, args, kwargs):
            x = _batched(first_input(args, kwargs))
            self._grids[grid] = (_ceil_div(x.shape[-2], grid[1]), _ceil_div(x.shape[-1], grid[1]))
        return hook

    def _grid(self, tap: Tap) -> tuple[int, int]:
        if tap.grid_path is None:
            if self.token_grid is None:
                raise RuntimeError(f"{tap.id}: this network does not show its token grid; pass token_grid")
            return tuple(_ceil_div(n, tap.grid_divisor) for n in self.token_grid)
        return self._grids[(tap.grid_path, tap.grid_divisor)]

    def _reference_hook(self, read: tuple[str, str, int]):
        """What the network's call says of its reference images (kept as given; read by _reference_grids)."""
        def hook(_module, args, kwargs):
            self._references[read] = _pick_optional(args, kwargs, read[1:])
            self._ref_grids.pop(read, None)
        return hook

    def _reference_grids(self, tap: Tap) -> list[tuple[int, int]]:
        """The token grid of each reference image of this call, in the order their tokens follow the generated
        image's: read off the call (see Tap), never guessed from token counts."""
        read = tap.ref_read
        if read in self._ref_grids:
            return self._ref_grids[read]
        value, form = self._references.get(read), read[0]
        grids: list[tuple[int, int]] = []
        if value is None:
            pass
        elif form == "latents":  # each padded to the patch size by the network
            grids = [(_ceil_div(r.shape[-2], tap.grid_divisor), _ceil_div(r.shape[-1], tap.grid_divisor))
                     for r in value]
        elif form == "shapes":  # per sample [(frames, h, w) of the generated image, then of each reference]
            sample = value[0] if value and isinstance(value[0], list) else value
            grids = [(int(f) * int(h), int(w)) for f, h, w in list(sample)[1:]]
        elif form == "ids":
            grids = self._id_grids(tap, value)
        else:
            raise ValueError(f"{tap.id}: unknown reference form {form!r}")
        self._ref_grids[read] = grids
        return grids

    def _id_grids(self, tap: Tap, ids: torch.Tensor) -> list[tuple[int, int]]:
        """Reference grids from image-token positions: the tokens after the generated image's, one reference per run
        of equal axis-0 values, its grid its distinct rows x distinct columns."""
        h, w = self._grid(tap)
        ids = ids[0] if ids.ndim == 3 else ids
        rest = ids[h * w:]
        if rest.shape[0] == 0 or rest.device.type == "meta":
            return []
        rest = rest.detach().cpu()
        change = torch.nonzero(rest[1:, 0] != rest[:-1, 0]).flatten() + 1
        grids = []
        for i, group in enumerate(torch.tensor_split(rest, change)):
            grid = (int(group[:, 1].unique().numel()), int(group[:, 2].unique().numel()))
            if grid[0] * grid[1] != group.shape[0]:
                raise TokenGridError(f"{tap.id}: reference {i}'s {group.shape[0]} tokens are not the {grid[0]}x"
                                     f"{grid[1]} grid of their positions")
            grids.append(grid)
        return grids

    def _reference_span(self, tap: Tap) -> tuple[int, int]:
        """(start, length) of reference `tap.ref`'s tokens: after the generated image's and the earlier
        references' (in the image stream, or in the joint sequence after the text)."""
        grids = self._reference_grids(tap)
        if tap.ref >= len(grids):
            if not grids:
                raise ReferenceImageError(f"{tap.id}: {_NO_REFERENCE[tap.ref_read[0]]}")
            which = "ref0" if len(grids) == 1 else f"ref0 to ref{len(grids) - 1}"
            plural = "s" if len(grids) > 1 else ""
            raise ReferenceImageError(f"{tap.id}: this run has {len(grids)} reference image{plural} ({which}), so "
                                      f"there is no ref{tap.ref}")
        h, w = self._grid(tap)
        start = (self._parts(tap)[1][0] if tap.span == "image" else 0) + h * w
        start += sum(rh * rw for rh, rw in grids[:tap.ref])
        rh, rw = grids[tap.ref]
        return start, rh * rw

    def token_ranges(self) -> list[dict] | None:
        """The parts of the last forward's joint token sequence, in order: text, the generated image (with its grid)
        and each reference image (`ref0`, ...; with its grid), each as its [start, stop) in the sequence the joint
        attention sees. None where the taps carry no text stream (UNets, PixArt)."""
        tap = next((t for t in self.taps if t.text_path is not None and t.text_path in self._texts), None)
        if tap is None or (tap.grid_path is not None and (tap.grid_path, tap.grid_divisor) not in self._grids) or (
                tap.grid_path is None and self.token_grid is None):
            return None
        (text, length), (image, count) = self._parts(tap)
        parts = [{"part": "text", "start": text, "stop": text + length},
                 {"part": "image", "start": image, "stop": image + count, "grid": list(self._grid(tap))}]
        if tap.ref_read is not None:
            start = image + count
            for i, (rh, rw) in enumerate(self._reference_grids(tap)):
                parts.append({"part": f"ref{i}", "start": start, "stop": start + rh * rw, "grid": [rh, rw]})
                start += rh * rw
        return sorted(parts, key=lambda p: p["start"])

    def _text_hook(self, path: str, item: tuple[str, int] | None, kept: tuple[str, int] | None):
        def hook(_module, args, kwargs):
            text = _pick_input(args, kwargs, item)
            mask = None if kept is None else _pick_optional(args, kwargs, kept)
            if mask is not None and mask.device.type != "meta":  # the caption tokens the network keeps, per sample
                lengths = sorted(set(mask.sum(dim=1).tolist()))
            elif isinstance(text, (list, tuple)):  # per-sample captions
                lengths = sorted({t.shape[0] for t in text})
            else:
                lengths = [text.shape[1]]
            if len(lengths) > 1:  # one length, or no span would fit them all
                raise TokenGridError(f"captions of {', '.join(str(int(n)) for n in lengths)} tokens in one batch: "
                                     "their tokens cannot be split by one length; capture each length in its own "
                                     "batch")
            self._texts[path] = int(lengths[0])
        return hook

    def _parts(self, tap: Tap) -> tuple[tuple[int, int], tuple[int, int]]:
        """(start, length) of the text and of the image tokens in a joint sequence, padding excluded."""
        text, (h, w) = self._texts[tap.text_path], self._grid(tap)
        after = _ceil_div(h * w if tap.image_first else text, tap.pad_multiple) * tap.pad_multiple
        return ((after, text), (0, h * w)) if tap.image_first else ((0, text), (after, h * w))

    def _span(self, tap: Tap, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The text or image part of a joint [text, image, ...] sequence (image: the generated image's tokens)."""
        if tap.span is None or tap.kind == "map":
            return x
        if tap.ref is not None:  # a reference image's tokens
            return x.narrow(dim, *self._reference_span(tap))
        if tap.span == "grid":  # an image stream that reference-image tokens may follow (Flux Kontext)
            h, w = self._grid(tap)
            return x.narrow(dim, 0, h * w)
        text, image = self._parts(tap)
        return x.narrow(dim, *(text if tap.span == "text" else image))

    def _read(self, tap: Tap, x: torch.Tensor) -> torch.Tensor:
        x = _slice(_merge_heads(_batched(x), tap.layout), tap.part)
        if tap.columns is not None:
            x = x[..., tap.columns[0]:tap.columns[1]]
        if tap.norm_path is not None:
            x = _rms_per_head(x, self._norms[tap.norm_path]).flatten(2)
        return self._span(tap, x)

    def _input_hook(self, tap: Tap):
        def hook(_module, args, kwargs):
            if self.enabled:  # a step that is not captured pays nothing (reading may stack per-sample latents)
                self._store(tap, self._read(tap, _pick_input(args, kwargs, tap.item)))
        return hook

    def _output_hook(self, tap: Tap):
        def hook(_module, _args, output):
            if self.enabled:
                self._store(tap, self._read(tap, _pick_output(output, tap.item)))
        return hook

    def _rope_hook(self, tap: Tap):
        """The rotary embedding and the text padding mask a joint attention is called with (either may be absent)."""
        def hook(_module, args, kwargs):
            if self.enabled:
                pieces = self._pieces.setdefault(tap.id, {})
                if tap.rope is not None:
                    pieces["rope"] = _pick_input(args, kwargs, tap.rope_arg)
                if tap.text_mask_arg is not None:
                    pieces["text_mask"] = _pick_optional(args, kwargs, tap.text_mask_arg)
        return hook

    def _piece_hook(self, tap: Tap, role: str, count: int, heads: int, upcast: bool):
        """One of the q / k tensors of a joint map; the last to arrive builds the map."""
        def hook(_module, _args, output):
            if not self.enabled:
                return
            x = self._cut(_pick_output(output, tap.item))
            columns, norm = (tap.key_columns, tap.key_norm_path) if role[0] == "k" else (tap.columns, tap.norm_path)
            if columns is not None:  # q or k as columns of a fused projection, normalised here (norm_path)
                x = x[..., columns[0]:columns[1]]
            if norm is not None:  # (B, N, heads, d), as a bnhd read
                x = _rms_per_head(x, self._norms[norm])
            x = x.transpose(1, 2) if tap.layout == "bnhd" or norm is not None else x
            pieces = self._pieces.setdefault(tap.id, {})
            pieces[role] = split_heads(self._select(x), heads)  # (B, heads, N, d)
            if sum(r in pieces for r in ("q", "k", "q_txt", "k_txt")) == count:
                self._store_joint_map(tap, self._pieces.pop(tap.id), upcast)
        return hook

    def _store_joint_map(self, tap: Tap, pieces: dict, upcast: bool) -> None:
        q, k = pieces["q"], pieces["k"]
        if "q_txt" in pieces:  # two streams: the joint sequence is [text, image], as the models concatenate it
            q, k = torch.cat([pieces["q_txt"], q], dim=2), torch.cat([pieces["k_txt"], k], dim=2)
        if tap.rope is not None:
            rope = pieces["rope"]
            if isinstance(rope, torch.Tensor) and rope.shape[0] > 1:
                rope = self._select(rope)
            q, k = apply_rope(tap.rope, q, k, rope)
        if k.shape[1] != q.shape[1]:  # grouped-query attention (Lumina2: 24 query heads over 8 key heads): each key
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # head serves its group of query heads, in order
        text, image = self._parts(tap)
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            probs = head_probs(q.narrow(2, *image), k, upcast, _text_padding(pieces.get("text_mask"), k, text,
                                                                             self._select))
            keys = probs.narrow(-1, *(text if tap.span == "text" else image))
            self._store(tap, keys.contiguous(), selected=True)

    def _mask_hook(self, tap: Tap, attention, heads: int):
        def hook(_module, args, kwargs):
            mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
            if mask is None or not self.enabled:
                self._masks.pop(tap.id, None)
                return
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            x = first_input(args, kwargs)
            keys, batch = (context if context is not None else x).shape[1], x.shape[0]
            mask = attention.prepare_attention_mask(mask, keys, batch)  # diffusers' own reading of its mask
            self._masks[tap.id] = mask.view(batch, heads, -1, mask.shape[-1]).detach()
        return hook

    def _query_hook(self, tap: Tap):
        def hook(_module, _args, output):
            if self.enabled:
                q = _slice(_merge_heads(output, tap.layout), tap.part)
                self._queries[tap.id] = (self._select(self._cut(q)), output.shape[0])
        return hook

    def _key_hook(self, tap: Tap, heads: int, upcast: bool):
        def hook(_module, _args, output):
            if not self.enabled:
                return
            if tap.id not in self._queries:  # k before q: not the call order of any attention we know
                raise RuntimeError(f"{tap.id}: {tap.key_path} ran before {tap.module_path}; cannot build the map")
            q, batch = self._queries.pop(tap.id)
            if output.shape[0] != batch:  # ComfyUI's PixArt: every image's text in one flat sequence (1, B*T, C)
                output = output.reshape(batch, -1, output.shape[-1])
            k = _slice(_merge_heads(output, tap.layout), tap.key_part)
            self._store_map(tap, q, self._select(self._cut(k)), heads, upcast)
        return hook

    def _fused_map_hook(self, tap: Tap, heads: int, upcast: bool):
        def hook(_module, _args, output):
            if self.enabled:
                x = self._select(self._cut(output))
                self._store_map(tap, _slice(x, tap.part), _slice(x, tap.key_part), heads, upcast)
        return hook

    def _store_map(self, tap: Tap, q: torch.Tensor, k: torch.Tensor, heads: int, upcast: bool) -> None:
        mask = self._masks.pop(tap.id, None)
        if mask is not None and mask.shape[0] > 1:
            mask = self._select(mask)
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            self._store(tap, attention_probs(q, k, heads, upcast, mask), selected=True)

    # ---- capture ---------------------------------------------------------------------------------------
    def _cut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.grad else x.detach()

    def _shape(self, tap: Tap, x: torch.Tensor) -> torch.Tensor:
        if tap.kind == "tokens":
            x = tokens_to_grid(tap.id, x, self._grid(tap) if tap.ref is None else
                               self._reference_grids(tap)[tap.ref])
        elif tap.kind == "packed":
            x = unpack_tokens(tap.id, x, self._grid(tap), tap.grid_divisor)
        elif tap.kind == "text":
            x = x.transpose(1, 2)
        elif tap.kind == "vector":
            x = x.reshape(x.shape[0], -1)
        if tap.kind not in UNPOOLED_KINDS and self.feature_resize > 1:
            x = pool_spatial(x, self.feature_resize)
        return x

    def _store(self, tap: Tap, x: torch.Tensor, selected: bool = False) -> None:
        if not self.enabled:
            return
        source = x
        if not selected:
            x = self._select(self._cut(x))
        x = self._shape(tap, x)
        x = x.to(dtype=self.dtype or x.dtype, device=self.device or x.device)
        if tap.kind != "map":  # a map is a tensor made for us
            x = owned(x, source)
        self.features[tap.id] = x
        if self.on_capture is not None:
            self.on_capture(tap.id, x)
        if self.early_exit and len(self.features) == len(self.taps):
            raise _EarlyExit()

    def run(self, *args, **kwargs):
        """One forward of the network with fresh features. Returns its output, or None after an early exit."""
        return self.call(self.model, *args, **kwargs)

    def call(self, fn: Callable, *args, **kwargs):
        """Call fn (the network, or anything that calls it once) with fresh features; None after an early exit."""
        if not self.attached:
            raise RuntimeError("FeatureCapture needs the context to be open (use `with FeatureCapture(...)`)")
        self.features, self._grids, self._texts = {}, {}, {}
        self._references, self._ref_grids = {}, {}
        try:
            output = fn(*args, **kwargs)
        except _EarlyExit:
            output = None
        missing = [t.id for t in self.taps if t.id not in self.features]
        if missing and self.enabled:
            raise RuntimeError(f"these taps never fired during the forward: {missing}")
        self.features = {t.id: self.features[t.id] for t in self.taps if t.id in self.features}
        return output


def residue(model: torch.nn.Module) -> dict[str, int]:
    """What hooks a model carries now (all of them, ours or not): after any run of ours the
    counts are what they were before it. Used by tests and by the pack's status route."""
    counts = {"forward_hooks": 0, "forward_pre_hooks": 0}
    for module in model.modules():
        counts["forward_hooks"] += len(module._forward_hooks)
        counts["forward_pre_hooks"] += len(module._forward_pre_hooks)
    return counts
