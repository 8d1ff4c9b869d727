"""LoRA files (kohya / sd-scripts, diffusers and peft formats) on a FeatureModel as peft adapters, active only in
the runs of the clone that carries them.

Names: diffusers reads the file's spelling (`StableDiffusionLoraLoaderMixin.lora_state_dict` converts kohya names,
SDXL's LDM block names through the UNet's config; `convert_unet_state_dict_to_peft` and `DIFFUSERS_OLD_TO_PEFT` the
older diffusers spellings, `.processor.to_q_lora` included). Our own code only reads the file safely (safetensors,
or a pickle through torch.load(weights_only=True)), skips parts that are no plain LoRA (DoRA, LoHa, ...) instead of
half-applying them, and finds a CLIP text module with or without `text_model.` (transformers >= 5.6 dropped it
from CLIPTextModel, while diffusers still writes it).

Sharing: a DF_MODEL's clones share their modules. `with_lora` injects the LoRA once into those modules as a peft
adapter (`inject_adapter_in_model` + `set_peft_model_state_dict`) and returns a clone that carries it; every adapter
is disabled outside `lora_applied`, which enables the clone's own adapters at the clone's strengths for one run
and disables them again however the run ends. The weights themselves are never written, and the other branches
(the base model, another LoRA or strength) compute exactly what they computed before. An adapter goes away with
its LoraWeights.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import re
import threading
import warnings
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from ..layer_catalog.errors import DiffusionFeatureError, echo
from .checkpoint_files import SINGLE_FILE_SUFFIXES

log = logging.getLogger("diffusion_feature")

COMPONENTS = ("denoiser", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_PREFIX_COMPONENT = {"unet": "denoiser", "transformer": "denoiser", "text_encoder": "text_encoder",
                     "text_encoder_2": "text_encoder_2"}
_ADAPTER_IDS = itertools.count()


class LoraError(DiffusionFeatureError, ValueError):
    """A LoRA file that cannot be read or does not fit the model; the message names the file and what is valid."""


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A loaded LoRA file: its usable tensors as the file names them, and per module (`groups`, the file's name of
    it) the (down, up, alpha or None) of its update. Compared by identity: two loads of one file are two LoRAs,
    two peft adapters."""

    name: str
    path: str
    tensors: Mapping[str, torch.Tensor]
    groups: Mapping[str, tuple]
    metadata: Mapping[str, dict] = field(default_factory=dict)  # peft's lora_adapter_metadata, by prefix (unet, ...)
    ignored: tuple[str, ...] = ()  # keys of the file that are no usable LoRA tensor (with the reason)
    adapter: str = field(default_factory=lambda: f"df_lora_{next(_ADAPTER_IDS)}")

    def __len__(self) -> int:
        return len(self.groups)

    def keys(self) -> list[str]:
        return list(self.groups)

    def __repr__(self) -> str:  # short: a DF_MODEL's repr shows its LoRAs, never their tensors
        return f"LoraWeights({self.name!r}, {len(self)} modules)"


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
    (".down.weight.alpha", "alpha"), (".down.weight", "down"), (".up.weight", "up"),  # to_q_lora.down.weight
    (".lora.alpha", "alpha"), (".alpha", "alpha"),
    # parts that make a module's update something other than up @ down: the module is skipped, not half-applied
    (".lora_mid.weight", "LoCon with a Tucker middle (lora_mid)"), (".dora_scale", "DoRA"),
    (".lora_magnitude_vector.weight", "DoRA"), (".lora_magnitude_vector", "DoRA"),
    (".lora_B.bias", "LoRA bias"), (".lora_up.bias", "LoRA bias"),
)
# other network types we cannot apply, by the name given to the user
_UNSUPPORTED = ((("hada_w", "hada_t"), "LoHa (LyCORIS)"), (("lokr_w", "lokr_t"), "LoKr (LyCORIS)"),
                ((".diff", ".diff_b"), "full-weight diffs"), ((".oft_", ".boft_"), "OFT"))


def _split_key(key: str) -> tuple[str | None, str | None]:
    """(module name as the file spells it, role) of a tensor name: role is down / up / alpha, or the name of a
    part we cannot apply; (None, None) for a tensor that is no part of a LoRA."""
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            group = key[: -len(suffix)]
            processor = re.search(r"\.(to_q|to_k|to_v|to_out)_lora$", group)
            if suffix in (".down.weight.alpha", ".down.weight", ".up.weight") and not processor:
                return None, None  # a plain module's weight, not a LoRA
            return group, role
    return None, None


def _unsupported_reason(key: str) -> str:
    for needles, reason in _UNSUPPORTED:
        if any(n in key for n in needles):
            return reason
    return "not a LoRA tensor"


def _peft_metadata(metadata: dict) -> dict[str, dict]:
    """The LoraConfig fields diffusers/peft recorded in a file (lora_adapter_metadata), by prefix (unet, ...)."""
    try:
        flat = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    out: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        prefix, _, name = key.partition(".")
        out.setdefault(prefix, {})[name] = value
    return out


def load_lora(path) -> LoraWeights:
    """Read a LoRA file (.safetensors, or a .ckpt/.pt/.bin through torch.load(weights_only=True)) and group its
    tensors by module. Nothing is matched to a model here: with_lora does that."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA {echo(str(path))} does not exist")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise LoraError(f"LoRA {echo(str(path))}: expected a {', '.join(SINGLE_FILE_SUFFIXES)} file")
    tensors, metadata = _read_tensors(path)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    ignored = []
    for key, value in tensors.items():
        key = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)  # peft adapter names: lora_A.default
        group, role = _split_key(key) if torch.is_tensor(value) else (None, None)
        if group is None:
            ignored.append((key, _unsupported_reason(key)))
        else:
            parts.setdefault(group, {})[role] = (key, value)
    usable, groups = {}, {}
    for group, found in parts.items():
        problem = _group_problem(group, {role: value for role, (_, value) in found.items()})
        if problem:
            ignored.append(problem)
            continue
        usable.update(dict(found.values()))
        alpha = found.get("alpha")
        groups[group] = (found["down"][1], found["up"][1], float(alpha[1]) if alpha else None)
    if not groups:
        few = ", ".join(list(tensors)[:4]) or "none"
        kinds = sorted({reason for _, reason in ignored} - {"not a LoRA tensor"})
        raise LoraError(f"LoRA {echo(str(path))} holds no usable LoRA weights (keys: {few}"
                        f"{', ...' if len(tensors) > 4 else ''})" + (f"; skipped: {', '.join(kinds)}" if kinds
                                                                     else "")
                        + ". Supported: kohya (lora_unet_/lora_te*.lora_down/lora_up.weight + alpha), "
                        "peft (unet./text_encoder.*.lora_A/lora_B.weight) and diffusers (*.lora.down/up.weight)")
    return LoraWeights(path.name, str(path), MappingProxyType(usable), MappingProxyType(groups),
                       MappingProxyType(_peft_metadata(metadata)),
                       tuple(f"{key} ({reason})" for key, reason in ignored))


def _group_problem(group: str, parts: dict) -> tuple[str, str] | None:
    """(key, reason) when a module's tensors are no plain LoRA update we can apply; None when they are."""
    unsupported = sorted(set(parts) - {"down", "up", "alpha"})
    if unsupported:
        return group, ", ".join(unsupported)
    if "down" not in parts or "up" not in parts:
        role = "down" if "down" in parts else "up" if "up" in parts else "alpha"
        return f"{group}.{role}", f"no matching {'up' if role == 'down' else 'down'} weight"
    down, up = parts["down"], parts["up"]
    if "alpha" in parts and parts["alpha"].numel() != 1:
        return f"{group}.alpha", f"alpha of shape {tuple(parts['alpha'].shape)}, not one number"
    if not (down.is_floating_point() and up.is_floating_point()):
        return group, "not floating point"
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        return group, f"down {tuple(down.shape)} / up {tuple(up.shape)} are neither linear nor conv weights"
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        return group, f"up {tuple(up.shape)} is not a 1x1 convolution"
    if up.shape[1] != down.shape[0]:
        return group, f"rank of down {tuple(down.shape)} and up {tuple(up.shape)} differ"
    return None


# ---- matching modules: diffusers' names ----------------------------------------------------------------------
def _component_module(model, component: str):
    if component == "denoiser":
        return model.denoiser
    index = TEXT_COMPONENTS.index(component)
    return model.text_encoders[index] if len(model.text_encoders) > index else None


def _diffusers_names(model, lora: LoraWeights) -> dict[str, tuple[str, str]]:
    """group -> (component, module path) as diffusers converts the file's names (its tensors are followed by
    identity through the renaming)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import (DIFFUSERS_OLD_TO_PEFT, convert_state_dict,
                                                  convert_unet_state_dict_to_peft)

    config = getattr(model.denoiser, "config", None)
    unet_config = config if isinstance(getattr(config, "layers_per_block", None), int) else None
    try:
        state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(lora.tensors), unet_config=unet_config)
    except (ValueError, KeyError, IndexError) as e:  # diffusers' kohya converter refuses a name it does not know
        raise LoraError(f"LoRA {echo(lora.name)}: diffusers cannot read its key names ({e})") from None
    group_of = {id(down): group for group, (down, _, _) in lora.groups.items()}
    out = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        component = _PREFIX_COMPONENT.get(prefix)
        if component is None:  # a file without prefixes applies to the denoiser
            component, rest = "denoiser", key
        text = component != "denoiser"
        peft_key = next(iter(convert_unet_state_dict_to_peft(
            convert_state_dict({rest: value}, DIFFUSERS_OLD_TO_PEFT) if text else {rest: value})))
        if id(value) in group_of and peft_key.endswith(".lora_A.weight"):
            out[group_of[id(value)]] = (component, peft_key[: -len(".lora_A.weight")])
    return out


def _resolve(model, lora: LoraWeights, check_shapes: bool = True):
    """([(group, component, module name, module)], [unmatched groups]) of a LoRA on a model; a shape mismatch is a
    LoraError."""
    names = _diffusers_names(model, lora)
    found, unmatched, modules = [], [], {}
    for group, (down, up, _) in lora.groups.items():
        component, path = names.get(group, ("denoiser", None))
        root = _component_module(model, component)
        if root is not None and component not in modules:
            modules[component] = dict(root.named_modules())
        # CLIP with or without text_model. (transformers >= 5.6 dropped it from CLIPTextModel, diffusers writes it)
        candidates = [path] if component == "denoiser" or path is None else \
            [path, path.removeprefix("text_model."), f"text_model.{path}"]
        name = next((c for c in candidates if c in modules.get(component, {})), None)
        module = modules[component][name] if name is not None else None
        if not isinstance(_base(module), (torch.nn.Linear, torch.nn.Conv2d)):
            unmatched.append(group)
            continue
        delta, weight = (up.shape[0], *down.shape[1:]), tuple(_base(module).weight.shape)
        if check_shapes and not _fits(delta, weight):
            raise LoraError(
                f"LoRA {echo(lora.name)} does not fit this {model.family} model: {group} targets "
                f"{component} module {name} whose weight is {weight}, but the LoRA's update is {delta} "
                f"(down {tuple(down.shape)}, up {tuple(up.shape)}). Was it made for another model family?")
        found.append((group, component, name, module))
    return found, unmatched


def _fits(delta_shape: tuple, weight_shape: tuple) -> bool:
    """A LoRA delta fits a weight as is, or as a 1x1 conv for a linear weight (or the other way round): SD1.5's
    proj_in/proj_out are 1x1 convolutions where SD2/SDXL have linear layers, and LoRAs store either."""
    if delta_shape == weight_shape:
        return True
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return len(delta_shape) in (2, 4) and squeeze(delta_shape) == squeeze(weight_shape)


def _is_lora_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _base(module):
    return module.get_base_layer() if _is_lora_layer(module) else module


def lora_targets(model, lora: LoraWeights) -> dict[str, str | None]:
    """Where each module of a LoRA lands on a model: the file's name -> "component:module name" (None: none)."""
    found, unmatched = _resolve(model, lora, check_shapes=False)
    out = {group: f"{component}:{name}" for group, component, name, _ in found}
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

    Every module is matched and its shape checked now, so a wrong LoRA fails here rather than in the middle of a
    run; the LoRA becomes a (disabled) peft adapter of the shared modules. Strengths are any finite numbers
    (negative ones subtract the LoRA)."""
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
            "model family?")
    skipped = unmatched + list(lora.ignored)
    if skipped:
        log.warning("diffusion_feature: LoRA %r: %d of its %d entries apply to this %s model; %d keys are skipped, "
                    "e.g. %s", lora.name, len(found), len(found) + len(unmatched), model.family, len(skipped),
                    ", ".join(skipped[:5]))
    for component in {c for _, c, _, _ in found}:
        _inject(_component_module(model, component), component, lora, [f for f in found if f[1] == component])
    return model.clone(loras=tuple(model.loras) + ((lora, strength_model, strength_clip),))


# ---- adapters on the shared modules --------------------------------------------------------------------------
def _inject(root: torch.nn.Module, component: str, lora: LoraWeights, found: list) -> None:
    """Add the LoRA's modules of one component to it as a disabled peft adapter named lora.adapter (once)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    with _LOCK:
        if lora.adapter in getattr(root, "peft_config", {}):
            return
        if id(root) in _ACTIVE:
            raise RuntimeError("a LoRA cannot be added to a model while a run of it (or of a clone) is going on")
        meta = next((lora.metadata[p] for p, c in _PREFIX_COMPONENT.items() if c == component and p in lora.metadata),
                    {})
        ranks, alphas, state = {}, {}, {}
        for group, _, name, module in found:
            down, up, alpha = lora.groups[group]
            ranks[re.escape(name)] = down.shape[0]
            if alpha is not None or not meta.get("lora_alpha"):  # no alpha anywhere: scale 1
                alphas[re.escape(name)] = alpha if alpha is not None else down.shape[0]
            conv = isinstance(_base(module), torch.nn.Conv2d)  # 1x1 conv <-> linear: as the module wants it
            for part, tensor in (("lora_A", down), ("lora_B", up)):
                state[f"{name}.{part}.weight"] = (tensor if tensor.ndim == 4 else tensor[..., None, None]) if conv \
                    else tensor.flatten(1)
        config = LoraConfig(r=max(ranks.values()), lora_alpha=meta.get("lora_alpha", 1), rank_pattern=ranks,
                            alpha_pattern={**alphas, **(meta.get("alpha_pattern") or {})},
                            use_rslora=bool(meta.get("use_rslora")), target_modules=[f[2] for f in found])
        with warnings.catch_warnings():  # several adapters on one model is what we want
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, root, adapter_name=lora.adapter)
        set_peft_model_state_dict(root, state, adapter_name=lora.adapter)
        for layer in _lora_layers(root):
            layer.enable_adapters(False)
        weakref.finalize(lora, _forget, lora.adapter, weakref.ref(root))


def _forget(adapter: str, root_ref) -> None:
    """Remove an adapter whose LoraWeights is gone from the modules that still exist; a module left with no adapter
    gets its original module back in its place (peft's wrapper would otherwise stay, and the shared model's state
    dict keep its `base_layer` names)."""
    root = root_ref()
    if root is None:
        return
    for name, layer in [(n, m) for n, m in root.named_modules() if _is_lora_layer(m)]:
        if adapter in layer.lora_A:
            layer.delete_adapter(adapter)
        if not layer.lora_A:
            parent, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, leaf, layer.get_base_layer())
    peft_config = getattr(root, "peft_config", None)
    if peft_config is not None:
        peft_config.pop(adapter, None)
        if not peft_config:
            del root.peft_config


def _lora_layers(root: torch.nn.Module) -> list:
    return [m for m in root.modules() if _is_lora_layer(m)]


# ---- enabled for one run -------------------------------------------------------------------------------------
# id(component root) -> (owner token, depth) for every component inside an active lora_applied
_ACTIVE: dict[int, tuple[tuple, int]] = {}
_LOCK = threading.RLock()


def _token(loras) -> tuple:
    return tuple((lora.adapter, sm, sc) for lora, sm, sc in loras)


@contextmanager
def lora_applied(model, components=COMPONENTS):
    """Enable the model's LoRA adapters (at its strengths) for the body of the with-block and disable them on exit,
    however it exits; the base weights are never written.

    Re-entrant: an inner block for the same LoRAs (the same model, or a clone with the same LoRAs) leaves them as
    the outer one set them. A model with another set of LoRAs (none included) entered while this one runs is a
    RuntimeError: its modules would compute with the wrong adapters. `components` limits it (encoding a prompt
    needs only the text encoders)."""
    token = _token(getattr(model, "loras", ()))
    roots = {c: r for c in components if (r := _component_module(model, c)) is not None}
    entered = []
    try:
        with _LOCK:
            for root in roots.values():
                if _ACTIVE.get(id(root), (token,))[0] != token:
                    raise RuntimeError(
                        "a different set of LoRAs is enabled on this model's modules by a run that is still going "
                        "on: differently patched clones of one model cannot run at the same time (nested or in "
                        "parallel)")
            for component, root in roots.items():
                owner, depth = _ACTIVE.get(id(root), (token, 0))
                if depth == 0 and token:
                    _enable(root, _strengths(model, component))
                _ACTIVE[id(root)] = (owner, depth + 1)
                entered.append(root)
        yield model
    finally:
        with _LOCK:
            for root in entered:
                owner, depth = _ACTIVE.pop(id(root))
                if depth > 1:
                    _ACTIVE[id(root)] = (owner, depth - 1)
                elif owner:
                    for layer in _lora_layers(root):
                        layer.enable_adapters(False)


def _strengths(model, component: str) -> dict[str, float]:
    """adapter -> the summed strength of the model's LoRAs on one component (zero: not enabled at all)."""
    out: dict[str, float] = {}
    for lora, strength_model, strength_clip in model.loras:
        out[lora.adapter] = out.get(lora.adapter, 0.0) + (strength_model if component == "denoiser"
                                                          else strength_clip)
    return {k: v for k, v in out.items() if v != 0.0}


def _enable(root: torch.nn.Module, strengths: dict[str, float]) -> None:
    for layer in _lora_layers(root):
        names = [name for name in strengths if name in layer.lora_A]
        if names:
            layer.enable_adapters(True)
            layer.set_adapter(names)
            for name in names:
                layer.set_scale(name, strengths[name])
