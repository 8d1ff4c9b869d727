"""LoRA files (kohya / sd-scripts, diffusers and peft formats) applied to a FeatureModel without ever leaking.

A DF_MODEL's clones share their weight tensors, so a LoRA cannot be merged into the weights once and left there:
every other branch of the graph would see it. Instead (as ComfyUI's ModelPatcher does) `with_lora` returns a clone
that only *carries* the LoRA, and `lora_applied(model)` merges the clone's LoRAs into the shared weights for the
duration of one run and copies the original weights back, bit for bit, when the run ends, however it ends.

File keys name modules in several spellings; each is matched against the real module names of the model
(`named_modules()`), never guessed by splitting on underscores:
- kohya: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, text encoders `lora_te_`
  (one encoder) or `lora_te1_` / `lora_te2_` (SDXL); SDXL files may use the original LDM block names
  (input_blocks / middle_block / output_blocks), which are mapped to diffusers' blocks.
- peft / diffusers: `unet.<dotted path>.lora_A.weight` / `.lora_B.weight`, the older `.lora.down.weight` /
  `.lora.up.weight` and `<attn>.processor.to_q_lora.down.weight`; prefixes unet., transformer., text_encoder.,
  text_encoder_2.; a file without prefixes applies to the denoiser.
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from ..layer_catalog.errors import DiffusionFeatureError, echo

log = logging.getLogger("diffusion_feature")

COMPONENTS = ("denoiser", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class LoraError(DiffusionFeatureError, ValueError):
    """A LoRA file that cannot be read or does not fit the model; the message names the file and what is valid."""


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One module's low-rank update: delta W = scale * up @ down (times the user's strength)."""

    key: str  # the file's name for the module, for messages (e.g. lora_unet_down_blocks_1_..._to_q)
    target: str  # the module path as the file spells it, without the component prefix (dots or underscores)
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank (1 when the file stores no alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def __repr__(self) -> str:
        return (f"LoraEntry({self.key!r}, down={tuple(self.down.shape)}, up={tuple(self.up.shape)}, "
                f"scale={self.scale:g})")

    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A loaded LoRA file: its entries grouped by component ("denoiser", "text_encoder", "text_encoder_2").
    Compared by identity: two loads of one file are two LoRAs."""

    name: str
    path: str
    entries: Mapping[str, tuple[LoraEntry, ...]]
    ignored: tuple[str, ...] = ()  # keys of the file that are no usable LoRA tensor (with the reason)

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def keys(self) -> list[str]:
        return [e.key for v in self.entries.values() for e in v]

    def __repr__(self) -> str:  # short: a DF_MODEL's repr shows its LoRAs, never their tensors
        counts = ", ".join(f"{k}: {len(v)}" for k, v in self.entries.items())
        return f"LoraWeights({self.name!r}, {counts})"


# ---- reading a file ------------------------------------------------------------------------------------------
def _read_tensors(path: Path) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a file; pickles only through torch.load(weights_only=True)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise LoraError(f"LoRA {echo(str(path))} is not a valid safetensors file ({e})") from None
    from .checkpoint_files import CheckpointError, load_pickle_state_dict

    try:
        return load_pickle_state_dict(path), {}
    except CheckpointError as e:
        raise LoraError(f"LoRA {e}") from None


# (suffix, role), longest first; the part before the suffix names the module
_ROLE_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".down.weight.alpha", "alpha"), (".down.weight", "down"), (".up.weight", "up"),  # attention-processor style
    (".lora.alpha", "alpha"), (".alpha", "alpha"),
    # parts that make a module's update something other than up @ down: the module is skipped, not half-applied
    (".lora_mid.weight", "LoCon with a Tucker middle (lora_mid)"), (".dora_scale", "DoRA"),
    (".lora_magnitude_vector.weight", "DoRA"), (".lora_magnitude_vector", "DoRA"),
    (".lora_B.bias", "LoRA bias"), (".lora_up.bias", "LoRA bias"),
)
_ROLES = ("down", "up", "alpha")
# other network types we cannot apply, by the name given to the user
_UNSUPPORTED = ((("hada_w", "hada_t"), "LoHa (LyCORIS)"), (("lokr_w", "lokr_t"), "LoKr (LyCORIS)"),
                ((".diff", ".diff_b"), "full-weight diffs"), ((".oft_", ".boft_"), "OFT"))
_PROCESSOR = re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora")
_PROCESSOR_TARGET = {"denoiser": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_PREFIXES = (  # (prefix, component), kohya's underscore names first
    ("lora_unet_", "denoiser"), ("lora_transformer_", "denoiser"), ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"),
    ("unet.", "denoiser"), ("transformer.", "denoiser"), ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"), ("model.diffusion_model.", "denoiser"), ("diffusion_model.", "denoiser"),
)


def _split_key(key: str) -> tuple[str | None, str | None]:
    """(module name as the file spells it, role) of a tensor name: role is down / up / alpha, or the name of a
    part we cannot apply; (None, None) for a tensor that is no part of a LoRA."""
    key = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)  # peft adapter names: lora_A.default
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            group = key[: -len(suffix)]
            if suffix in (".down.weight.alpha", ".down.weight", ".up.weight") and not _PROCESSOR.fullmatch(group):
                return None, None  # a plain module's weight, not a LoRA
            return group, role
    return None, None


def _component_and_target(group: str) -> tuple[str, str]:
    """Split a module name into its component and the path inside it; old processor names become module paths."""
    component, target = "denoiser", group  # no prefix at all: the denoiser
    for prefix, comp in _PREFIXES:
        if group.startswith(prefix):
            component, target = comp, group[len(prefix):]
            break
    m = _PROCESSOR.fullmatch(target)
    if m:
        table = _PROCESSOR_TARGET["denoiser" if component == "denoiser" else "text"]
        target = f"{m[1]}.{table[m[2]]}"
    return component, target


def _unsupported_reason(key: str) -> str:
    for needles, reason in _UNSUPPORTED:
        if any(n in key for n in needles):
            return reason
    return "not a LoRA tensor"


def _peft_alpha(metadata: dict, component_prefix: str, target: str, rank: int) -> float | None:
    """The scale diffusers/peft recorded in the file's lora_adapter_metadata (alpha / rank, or alpha / sqrt(rank)
    with rsLoRA); None when the file says nothing."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    alpha = meta.get(f"{component_prefix}.lora_alpha")
    for pattern, value in (meta.get(f"{component_prefix}.alpha_pattern") or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?{pattern}", target):
                alpha = value
                break
        except re.error:
            continue
    if alpha is None:
        return None
    rslora = bool(meta.get(f"{component_prefix}.use_rslora"))
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def load_lora(path) -> LoraWeights:
    """Read a LoRA file (.safetensors, or a .ckpt/.pt/.bin through torch.load(weights_only=True)) into entries
    grouped by component. Nothing is matched to a model here: with_lora does that."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA {echo(str(path))} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise LoraError(f"LoRA {echo(str(path))}: expected a {', '.join(SUFFIXES)} file")
    tensors, metadata = _read_tensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, value in tensors.items():
        group, role = _split_key(key) if torch.is_tensor(value) else (None, None)
        if group is None:
            ignored.append((key, _unsupported_reason(key)))
            continue
        groups.setdefault(group, {})[role] = value
    entries: dict[str, list[LoraEntry]] = {}
    for group, parts in groups.items():
        unsupported = sorted(set(parts) - set(_ROLES))
        if unsupported:
            ignored += [(group, reason) for reason in unsupported]
            continue
        if "down" not in parts or "up" not in parts:
            ignored += [(f"{group}.{role}", f"no matching {'up' if role == 'down' else 'down'} weight")
                        for role in parts if role != "alpha"]
            continue
        down, up = parts["down"], parts["up"]
        problem = _entry_problem(down, up)
        if problem:
            ignored.append((group, problem))
            continue
        component, target = _component_and_target(group)
        rank = down.shape[0]
        if "alpha" in parts and parts["alpha"].numel() != 1:
            ignored.append((f"{group}.alpha", f"alpha of shape {tuple(parts['alpha'].shape)}, not one number"))
            continue
        if "alpha" in parts:
            scale = float(parts["alpha"]) / rank
        else:
            prefix = group.split(".", 1)[0] if "." in group else ""
            peft = _peft_alpha(metadata, prefix, target, rank) if prefix else None
            scale = 1.0 if peft is None else peft
        entries.setdefault(component, []).append(LoraEntry(group, target, down, up, scale))
    if not entries:
        few = ", ".join(list(tensors)[:4]) or "none"
        kinds = sorted({reason for _, reason in ignored} - {"not a LoRA tensor"})
        raise LoraError(f"LoRA {echo(str(path))} holds no usable LoRA weights (keys: {few}"
                        f"{', ...' if len(tensors) > 4 else ''})" + (f"; skipped: {', '.join(kinds)}" if kinds
                                                                     else "")
                        + ". Supported: kohya (lora_unet_/lora_te_*.lora_down/lora_up.weight + alpha), "
                        "peft (unet./text_encoder.*.lora_A/lora_B.weight) and diffusers (*.lora.down/up.weight)")
    return LoraWeights(path.name, str(path), MappingProxyType({k: tuple(v) for k, v in entries.items()}),
                       tuple(f"{key} ({reason})" for key, reason in ignored))


def _entry_problem(down: torch.Tensor, up: torch.Tensor) -> str | None:
    if not (down.is_floating_point() and up.is_floating_point()):
        return "not floating point"
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        return f"down {tuple(down.shape)} / up {tuple(up.shape)} are neither linear nor conv weights"
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"up {tuple(up.shape)} is not a 1x1 convolution"
    if up.shape[1] != down.shape[0]:
        return f"rank of down {tuple(down.shape)} and up {tuple(up.shape)} differ"
    return None


# ---- matching entries to modules -----------------------------------------------------------------------------
def _component_module(model, component: str):
    if component == "denoiser":
        return model.denoiser
    index = TEXT_COMPONENTS.index(component)
    return model.text_encoders[index] if len(model.text_encoders) > index else None


_RESNET_LDM = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_LDM_FIXED = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
              "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
              "label_emb_0_2": "add_embedding_linear_2"}


def _ldm_to_diffusers(path: str, per_level: int) -> str | None:
    """An LDM (original SD / SGM) UNet module path, underscored, as diffusers' underscored path; None if it is
    not one. per_level = layers_per_block + 1 (resnets of a level plus its downsampler slot)."""
    if path in _LDM_FIXED:
        return _LDM_FIXED[path]

    def inner(block: str, kind: int, pos: int, rest: str) -> str | None:
        if kind == 0:
            return f"{block}_resnets_{pos}_{_RESNET_LDM.get(rest, rest)}"
        return f"{block}_attentions_{pos}_{rest}" if kind == 1 else None

    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", path)
    if m:
        i, kind, rest = int(m[1]), int(m[2]), m[3]
        level, pos = divmod(i - 1, per_level)
        if pos == per_level - 1:  # the level's downsampler
            return f"down_blocks_{level}_downsamplers_0_" + ("conv" if rest == "op" else rest)
        return inner(f"down_blocks_{level}", kind, pos, rest)
    m = re.fullmatch(r"middle_block_(\d+)_(.+)", path)
    if m:
        part, rest = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(m[1])), m[2]
        if part is None:
            return None
        return f"mid_block_{part}_" + (_RESNET_LDM.get(rest, rest) if part.startswith("resnets") else rest)
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", path)
    if m:
        i, kind, rest = int(m[1]), int(m[2]), m[3]
        level, pos = divmod(i, per_level)
        if kind >= 1 and rest == "conv":  # the upsampler (index 1 when the level has no attention, else 2)
            return f"up_blocks_{level}_upsamplers_0_conv"
        return inner(f"up_blocks_{level}", kind, pos, rest)
    return None


class _ModuleIndex:
    """The real module names of one component, by dotted name and by kohya's underscored spelling."""

    def __init__(self, component: str, module: torch.nn.Module):
        self.component = component
        self.modules = dict(module.named_modules())
        self.underscored: dict[str, str | None] = {}
        for name in self.modules:
            u = name.replace(".", "_")
            self.underscored[u] = None if u in self.underscored else name  # None: two names collide, never match
        self.per_level = None
        if component == "denoiser":
            lpb = getattr(getattr(module, "config", None), "layers_per_block", None)
            if isinstance(lpb, (list, tuple)) and len(set(lpb)) == 1:
                lpb = lpb[0]
            self.per_level = lpb + 1 if isinstance(lpb, int) else None

    def resolve(self, target: str) -> str | None:
        """The module name of a target, trying: as written, without / with CLIP's `text_model.` (transformers
        >= 5.6 dropped it from CLIPTextModel), kohya's underscores, LDM block names."""
        text = self.component != "denoiser"
        dotted = [target]
        if text:
            dotted.append(target[len("text_model."):] if target.startswith("text_model.") else f"text_model.{target}")
        for candidate in dotted:
            if candidate in self.modules:
                return candidate
        u = target.replace(".", "_")
        underscored = [u]
        if text:
            underscored.append(u[len("text_model_"):] if u.startswith("text_model_") else f"text_model_{u}")
        elif self.per_level is not None:
            ldm = _ldm_to_diffusers(underscored[0], self.per_level)
            if ldm is not None:
                underscored.append(ldm)
        for candidate in underscored:
            name = self.underscored.get(candidate)
            if name is not None:
                return name
        return None


def _fits(delta_shape: tuple, weight_shape: tuple) -> bool:
    """A LoRA delta fits a weight as is, or as a 1x1 conv for a linear weight (or the other way round): SD1.5's
    proj_in/proj_out are 1x1 convolutions where SD2/SDXL have linear layers, and LoRAs store either."""
    if delta_shape == weight_shape:
        return True
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return len(delta_shape) in (2, 4) and squeeze(delta_shape) == squeeze(weight_shape)


@dataclass(frozen=True, eq=False)
class _Resolved:
    entry: LoraEntry
    component: str
    name: str  # module name inside the component
    module: torch.nn.Module  # the component's root module (who owns the weight)
    weight: torch.nn.Parameter


def _resolve(model, lora: LoraWeights, components=COMPONENTS, check_shapes: bool = True):
    """([_Resolved], [unmatched entry keys]) of a LoRA on a model; a shape mismatch is a LoraError."""
    found, unmatched = [], []
    for component in components:
        entries = lora.entries.get(component, ())
        if not entries:
            continue
        root = _component_module(model, component)
        if root is None:
            unmatched += [e.key for e in entries]
            continue
        index = _ModuleIndex(component, root)
        for entry in entries:
            name = index.resolve(entry.target)
            weight = getattr(index.modules[name], "weight", None) if name is not None else None
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                unmatched.append(entry.key)
                continue
            if check_shapes and not _fits(entry.delta_shape(), tuple(weight.shape)):
                raise LoraError(
                    f"LoRA {echo(lora.name)} does not fit this {model.family} model: {entry.key} targets "
                    f"{component} module {name} whose weight is {tuple(weight.shape)}, but the LoRA's update is "
                    f"{entry.delta_shape()} (down {tuple(entry.down.shape)}, up {tuple(entry.up.shape)}). "
                    "Was it made for another model family?")
            found.append(_Resolved(entry, component, name, root, weight))
    return found, unmatched


def lora_targets(model, lora: LoraWeights) -> dict[str, str | None]:
    """Where each entry of a LoRA lands on a model: file key -> "component:module name" (None: no module)."""
    found, unmatched = _resolve(model, lora, check_shapes=False)
    out = {r.entry.key: f"{r.component}:{r.name}" for r in found}
    out.update({k: None for k in unmatched})
    return out


def _finite(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LoraError(f"{what} must be a number, got {echo(value)}") from None
    if not math.isfinite(value):
        raise LoraError(f"{what} must be a finite number, got {value}")
    return value


def with_lora(model, lora: LoraWeights, strength_model: float = 1.0, strength_clip: float = 1.0):
    """A clone of `model` that carries `lora` (its runs see it; `model` and its other clones never do).

    Every entry is matched to a module of this model and its shape checked now, so a wrong LoRA fails here rather
    than in the middle of a run. Strengths are any finite numbers (negative ones subtract the LoRA)."""
    strength_model = _finite(strength_model, "strength_model")
    strength_clip = _finite(strength_clip, "strength_clip")
    if not isinstance(lora, LoraWeights):
        raise LoraError(f"expected a LoraWeights (from load_lora), got {type(lora).__name__}")
    found, unmatched = _resolve(model, lora)
    if not found:
        keys = lora.keys()
        raise LoraError(
            f"LoRA {echo(lora.name)} ({lora.path}) matches no module of this {model.family} model "
            f"(its keys look like: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}). Made for another "
            f"model family? It has entries for: {', '.join(lora.entries)}")
    skipped = unmatched + list(lora.ignored)
    if skipped:
        log.warning("diffusion_feature: LoRA %r: %d of its %d entries apply to this %s model; %d keys are skipped, "
                    "e.g. %s", lora.name, len(found), len(found) + len(unmatched), model.family, len(skipped),
                    ", ".join(skipped[:5]))
    return model.clone(loras=tuple(model.loras) + ((lora, strength_model, strength_clip),))


# ---- merging for one run -------------------------------------------------------------------------------------
# id(weight) -> (owner token, weight, id(component root)) for every weight merged by an active lora_applied
_ACTIVE: dict[int, tuple[tuple, torch.Tensor, int]] = {}
_ACTIVE_LOCK = threading.Lock()


def _token(loras) -> tuple:
    return tuple((id(lora), sm, sc) for lora, sm, sc in loras)


def _backup(weight: torch.Tensor) -> torch.Tensor:
    """An exact copy of a weight: beside it on the CPU, in (pinned) host memory for an accelerator, so merging a
    large LoRA does not double the VRAM of the weights it touches."""
    weight = weight.detach()
    if weight.device.type == "cpu":
        return weight.clone()
    try:
        copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    except RuntimeError:  # no pinned memory here (another accelerator): a plain synchronous copy
        return weight.to("cpu", copy=True)
    copy.copy_(weight, non_blocking=True)  # ordered before the in-place merge on the same stream
    return copy


def _check_no_other_owner(model, token: tuple, components) -> None:
    roots = {id(m) for m in (_component_module(model, c) for c in components) if m is not None}
    for owner, _weight, root in _ACTIVE.values():
        if root in roots and owner != token:
            raise RuntimeError(
                "a different set of LoRAs is merged into this model's weights by a run that is still going on: "
                "differently patched clones of one model cannot run at the same time (nested or in parallel)")


@contextmanager
def lora_applied(model, components=COMPONENTS):
    """Merge the model's LoRAs into its (shared) weights for the body of the with-block; on exit, however it
    exits (exception, KeyboardInterrupt), copy the original weights back bit for bit.

    Free when the model carries no LoRA. Re-entrant: an inner block for the same LoRAs (the same model, or a
    clone with the same LoRAs) leaves the weights as the outer one merged them. A model with another set of LoRAs
    (none included) entered while this one's weights are merged is a RuntimeError: it would see the wrong
    weights. `components` limits the merge (encoding a prompt needs only the text encoders).
    Deltas are computed at entry on the weights' current device, in float32, then merged in the weights' dtype.
    """
    if not getattr(model, "loras", ()):
        if _ACTIVE:  # something is merged somewhere: make sure it is not into this model
            with _ACTIVE_LOCK:
                _check_no_other_owner(model, (), components)
        yield model
        return
    token = _token(model.loras)
    plan: dict[int, tuple[_Resolved, list]] = {}  # id(weight) -> (first resolution, [(entry, strength)])
    for lora, strength_model, strength_clip in model.loras:
        found, _ = _resolve(model, lora, components)
        for r in found:
            strength = strength_model if r.component == "denoiser" else strength_clip
            if strength != 0.0:
                plan.setdefault(id(r.weight), (r, []))[1].append((r.entry, strength))
    claimed, saved = [], []
    try:
        with _ACTIVE_LOCK:
            _check_no_other_owner(model, token, components)
            for key, (r, _) in plan.items():
                if key not in _ACTIVE:  # already merged by an outer block for these LoRAs: leave it
                    _ACTIVE[key] = (token, r.weight, id(r.module))
                    claimed.append(key)
        with torch.no_grad():
            for key in claimed:
                r, parts = plan[key]
                weight = r.weight
                saved.append((weight, _backup(weight)))
                total = None
                for entry, strength in parts:
                    d = _delta(entry, weight, strength)
                    total = d if total is None else total + d
                weight.copy_(weight.float() + total)
        yield model
    finally:
        try:
            _restore(saved)
        finally:
            with _ACTIVE_LOCK:
                for key in claimed:
                    _ACTIVE.pop(key, None)


def _restore(saved: list) -> None:
    """Copy every original weight back. A KeyboardInterrupt arriving meanwhile (a second Ctrl-C) waits until all
    are back: a copy is idempotent, so the interrupted one is simply done again."""
    interrupted = None
    for weight, original in reversed(saved):
        while True:
            try:
                with torch.no_grad():
                    weight.copy_(original, non_blocking=original.is_pinned())
                break
            except KeyboardInterrupt as e:
                interrupted = e
    if interrupted is not None:
        raise interrupted


def _delta(entry: LoraEntry, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """strength * scale * up @ down in float32 on the weight's device, shaped like the weight. A conv LoRA is the
    composition of its down convolution and its 1x1 up convolution."""
    down = entry.down.to(device=weight.device, dtype=torch.float32)
    up = entry.up.to(device=weight.device, dtype=torch.float32)
    delta = (up.flatten(1) @ down.flatten(1)) * (strength * entry.scale)
    return delta.reshape(weight.shape)


def lora_residue(model, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of the model's tensors (denoiser, text encoders) that differ bit-wise from `reference` (a saved
    state, see lora_snapshot): what a run left behind. Empty when nothing leaked."""
    now = lora_snapshot(model)
    return sorted(k for k in reference if k not in now or not torch.equal(now[k], reference[k]))


def lora_snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor a LoRA can touch (denoiser and text encoders), to compare with after a run."""
    out = {}
    for component in COMPONENTS:
        module = _component_module(model, component)
        if module is not None:
            out.update({f"{component}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out
