"""Loading ControlNets (SD1.5, SD2.1, SDXL) offline, and checking that one can drive a given model's UNet.

Three formats: a diffusers folder (config.json + weights), a single file in the original layout of lllyasviel's
ControlNet (`control_model.input_blocks...`, `zero_convs`, `input_hint_block`, `middle_block_out`), and a single
file in the diffusers layout (what diffusers' training scripts save, common for SDXL). A single file has no config
of its own: we take one beside it (`<stem>.json` or `<stem>.config/config.json`) or the bundled config of the
family its tensor shapes show (layer_catalog/model_configs/<family>/controlnet). Nothing is downloaded, and a
pickle is only read through torch.load(weights_only=True).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..layer_catalog.errors import echo
from ..layer_catalog.families import FAMILIES, family_names, family_of_unet, get_family, spoken
from .checkpoint_files import SINGLE_FILE_SUFFIXES, CheckpointError, load_pickle_state_dict, read_key_shapes
from .memory_guard import meta_copy
from .model import parse_dtype

CONTROLNET_FAMILIES = family_names(lambda f: f.controlnet)  # families a ControlNet is made for (and detected as)
LDM_PREFIX = "control_model."
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


class ControlNetError(CheckpointError):
    """A ControlNet that cannot be loaded, or cannot drive the given model; the message says which and why.
    A CheckpointError (and so a ValueError), so callers that catch bad checkpoints catch these too."""


@dataclass(frozen=True)
class ControlNet:
    """A loaded ControlNet (DF_CONTROLNET): the diffusers module in eval mode without gradients, its family when
    its sizes are a standard one (None for custom or test sizes), and where it came from."""

    module: torch.nn.Module
    family: str | None
    source: str
    name: str

    @property
    def config(self):
        return self.module.config

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device=None, dtype=None) -> "ControlNet":
        """Move the weights in place (shared by every holder of this object) and return the same object."""
        self.module.to(device=device, dtype=parse_dtype(dtype) if dtype is not None else None)
        return self


# ---- what a file is ------------------------------------------------------------------------------------------
def strip_prefix(keys_to_values: dict) -> dict:
    """The ControlNet's own entries of an original-layout file, without the `control_model.` prefix. Old
    lllyasviel files hold the whole SD model beside it; the ControlNet is only the prefixed part."""
    if any(k.startswith(LDM_PREFIX) for k in keys_to_values):
        return {k[len(LDM_PREFIX):]: v for k, v in keys_to_values.items() if k.startswith(LDM_PREFIX)}
    return dict(keys_to_values)


def layout_of(shapes: dict, path="the file") -> str:
    """'original' (lllyasviel's layout, prefix stripped or not) or 'diffusers'; other files are refused by name:
    the controlnet folder also holds T2I-Adapters and Control-LoRAs, which are different models."""
    keys = strip_prefix(shapes).keys()
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    if any(k.startswith(("input_hint_block.", "zero_convs.")) for k in keys):
        return "original"
    if "lora_controlnet" in keys or any(".down.weight" in k or ".up.weight" in k for k in keys):
        what = "a Control-LoRA"
    elif any(k.startswith(("adapter.", "body.")) for k in keys):
        what = "a T2I-Adapter"
    else:
        what = "no ControlNet"
    raise ControlNetError(f"{echo(str(path))} is {what}: a ControlNet has input_hint_block/zero_convs (original "
                          "layout) or controlnet_cond_embedding/controlnet_down_blocks (diffusers layout) weights. "
                          f"Supported: ControlNets for {spoken(CONTROLNET_FAMILIES)}")


def _text_width(keys_to_shapes: dict) -> int | None:
    widths = [s[-1] for k, s in keys_to_shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2]
    return widths[0] if widths else None


def detect_family(shapes: dict) -> str | None:
    """The family a ControlNet was trained for, from its tensor names and shapes (either layout): the width of
    its cross-attention and whether it has SDXL's added text/time embedding. None when the sizes are not a
    standard family's (custom or test models)."""
    keys = strip_prefix(shapes)
    pooled = "add_embedding.linear_1.weight" in keys or "label_emb.0.0.weight" in keys
    return family_of_unet(_text_width(keys), pooled)


def family_of_config(config) -> str | None:
    """The family a ControlNet config is the architecture of (same rule as detect_family)."""
    pooled = config.get("addition_embed_type") == "text_time"
    if not pooled and (config.get("addition_embed_type") or config.get("class_embed_type")):
        return None
    return family_of_unet(config.get("cross_attention_dim"), pooled)


def _standard_widths() -> str:
    """'768 sd15, ...': the cross-attention width of each ControlNet family."""
    return ", ".join(f"{FAMILIES[f].text_width}{' with added text/time embedding' if FAMILIES[f].pooled_text else ''}"
                     f" {f}" for f in CONTROLNET_FAMILIES)


def bundled_config(family: str) -> dict:
    """The shipped diffusers config of the family's standard ControlNet (lllyasviel sd15, thibaud-style sd21,
    diffusers/controlnet-canny-sdxl-1.0)."""
    if family not in CONTROLNET_FAMILIES:
        get_family(family)  # an unknown name gets the family list
        raise ControlNetError(f"ControlNet is supported for {', '.join(CONTROLNET_FAMILIES)}; not for {family}")
    return get_family(family).config("controlnet")


def _check_family_arg(family):
    if family is not None and family not in CONTROLNET_FAMILIES:
        raise ControlNetError(f"unknown ControlNet family {echo(family)}; valid: {', '.join(CONTROLNET_FAMILIES)} "
                              "(or None to detect it)")


def _settle_family(detected: str | None, family: str | None, path) -> str | None:
    """The detected family unless the caller named another: then the file contradicts them, which is an error."""
    _check_family_arg(family)
    if family is not None and detected is not None and detected != family:
        raise ControlNetError(f"{echo(str(path))} was given as a {family} ControlNet but its weights are for "
                              f"{detected}; "
                              f"pass family={detected!r} or 'auto'")
    return detected if detected is not None else family


# ---- state dicts: layouts and fit ----------------------------------------------------------------------------
def to_diffusers_layout(state: dict, config) -> dict:
    """Entries of either layout under diffusers' names. The original layout goes through diffusers' own converter
    (the one from_single_file uses); it drops SDXL's label_emb (added text/time embedding), which we map here.
    Values may be meta tensors: that gives the converted shapes of a file without reading its weights."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = strip_prefix(state)
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return state
    out = convert_controlnet_checkpoint(state, dict(config))
    target = "add_embedding" if config.get("addition_embed_type") else "class_embedding"
    for ldm, new in (("label_emb.0.0", "linear_1"), ("label_emb.0.2", "linear_2")):
        for what in ("weight", "bias"):
            if f"{ldm}.{what}" in state:
                out[f"{target}.{new}.{what}"] = state[f"{ldm}.{what}"]
    return {k: v for k, v in out.items() if v is not None}  # the converter .get()s entries a file may lack


def mismatches(config, shapes: dict) -> list[str]:
    """How diffusers-named shapes differ from the architecture of `config` (empty when the file fits)."""
    from diffusers import ControlNetModel

    meta = meta_copy(ControlNetModel, json.dumps(dict(config), sort_keys=True, default=str), torch.float32)
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    problems = [f"{k} {tuple(shapes[k])} where the config has {want[k]}"
                for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    missing = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
    return problems


def _meta_state(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _diffusers_shapes(shapes: dict, config) -> dict:
    return {k: tuple(v.shape) for k, v in to_diffusers_layout(_meta_state(shapes), config).items()}


def _fit_transformer_depths(config: dict, diff_shapes: dict) -> dict:
    """The bundled config with the number of transformer blocks per level read off the file: SDXL ControlNets
    come in full, "mid" and "small" depths that all drive the same UNet."""
    types = config["down_block_types"]
    depths = []
    for i, kind in enumerate(types):
        prefix = f"down_blocks.{i}.attentions.0.transformer_blocks."
        found = {k[len(prefix):].split(".")[0] for k in diff_shapes if k.startswith(prefix)}
        depths.append(len(found) if "CrossAttn" in kind else 1)
    current = config.get("transformer_layers_per_block", 1)
    current = list(current) if isinstance(current, (list, tuple)) else [current] * len(types)
    return config if depths == current else {**config, "transformer_layers_per_block": depths}


# ---- loading -------------------------------------------------------------------------------------------------
def _sidecar_config(path: Path) -> dict | None:
    """A config kept beside a single file: `<stem>.config/config.json` (as checkpoints have, see loading.py) or
    `<stem>.json` holding a ControlNetModel config."""
    for candidate in (path.with_name(path.stem + ".config") / "config.json", path.with_name(path.stem + ".json")):
        if not candidate.is_file():
            continue
        try:
            config = json.loads(candidate.read_text())
        except (OSError, ValueError) as e:
            raise ControlNetError(f"sidecar config {echo(str(candidate))} of {echo(str(path))} is not valid JSON "
                                  f"({e})") from None
        if isinstance(config, dict) and ("block_out_channels" in config
                                         or config.get("_class_name") == "ControlNetModel"):
            return config
    return None


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors; of a file that holds a whole SD model beside its `control_model.` part, only that part."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            if any(k.startswith(LDM_PREFIX) for k in keys):
                keys = [k for k in keys if k.startswith(LDM_PREFIX)]
            return {k: f.get_tensor(k) for k in keys}
    return _safe_pickle(path)


def _build(config, state: dict, path) -> torch.nn.Module:
    """A ControlNetModel of `config` holding exactly the tensors of `state` (diffusers names). Strict on purpose:
    diffusers' from_single_file only warns about tensors a file lacks and leaves them uninitialised."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        module = ControlNetModel.from_config(dict(config))
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ControlNetError(f"{echo(str(path))} does not fit its config ({str(e).splitlines()[0][:300]})") from None
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ControlNetError(f"{echo(str(path))} lacks {len(left)} tensors (e.g. {left[0]})")
    return module


def _finish(module, family, path: Path, dtype, device) -> ControlNet:
    module.to(device=device, dtype=parse_dtype(dtype))
    module.eval().requires_grad_(False)
    return ControlNet(module, family, str(path), path.stem if path.is_file() else path.name)


def load_controlnet_folder(folder, family: str | None = None, dtype="float32", device="cpu") -> ControlNet:
    """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.*), read locally only."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ControlNetError(f"{echo(str(folder))} is not a diffusers ControlNet folder (no config.json)")
    config = json.loads(cfg_path.read_text())
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ControlNetError(f"{echo(str(folder))} holds a {config['_class_name']}, not a ControlNetModel")
    weights = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
    if not weights:
        raise ControlNetError(f"{echo(str(folder))} has no weights (expected one of {', '.join(WEIGHT_NAMES)})")
    family = _settle_family(family_of_config(config), family, folder)
    if weights[0].suffix == ".safetensors":
        from diffusers import ControlNetModel

        variant = "fp16" if ".fp16." in weights[0].name else None
        try:
            module = ControlNetModel.from_pretrained(folder, local_files_only=True, variant=variant)
        except (ValueError, RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ControlNetError(f"{echo(str(folder))}: its weights do not fit its config.json ({first})") from None
    else:  # diffusers would unpickle .bin itself; read it with weights_only and load it strictly
        module = _build(config, _safe_pickle(weights[0]), weights[0])
    return _finish(module, family, folder, dtype, device)


@contextlib.contextmanager
def _as_controlnet_error():
    """A checkpoint-reading error, re-raised as the ControlNetError it is here (one already is stays as it is)."""
    try:
        yield
    except ControlNetError:
        raise
    except CheckpointError as e:
        raise ControlNetError(str(e)) from None


def _safe_pickle(path: Path) -> dict:
    with _as_controlnet_error():
        return load_pickle_state_dict(path)


def load_controlnet_file(path, family: str | None = None, dtype="float32", device="cpu") -> ControlNet:
    """A single-file ControlNet in the original or the diffusers layout; see the module docstring for configs."""
    path = Path(path)
    with _as_controlnet_error():
        shapes = read_key_shapes(path)
    layout = layout_of(shapes, path)
    detected = detect_family(shapes)
    family = _settle_family(detected, family, path)
    config = _sidecar_config(path)
    if config is not None:
        where = "its sidecar config"
    elif family is None:
        width = _text_width(strip_prefix(shapes))
        raise ControlNetError(
            f"cannot tell which model family {echo(str(path))} is for (cross-attention width {width}; standard: "
            f"{_standard_widths()}). For a ControlNet of non-standard size, "
            f"put its diffusers config beside it as {path.stem}.json or {path.stem}.config/config.json")
    else:
        config, where = bundled_config(family), f"the bundled {family} ControlNet config"
        if path.stem.lower().endswith(("_shuffle", "_shuffle_fp16")):  # as ComfyUI does for control_v11e_*_shuffle
            config["global_pool_conditions"] = True
        config = _fit_transformer_depths(config, _diffusers_shapes(shapes, config))
    problems = mismatches(config, _diffusers_shapes(shapes, config))
    if problems:
        raise ControlNetError(
            f"{echo(str(path))} ({layout} layout) does not fit {where}: {'; '.join(problems[:3])}. A ControlNet of "
            f"non-standard size needs its diffusers config beside it as {path.stem}.json or "
            f"{path.stem}.config/config.json")
    state = to_diffusers_layout(_read_state(path), config)
    return _finish(_build(config, state, path), family, path, dtype, device)


def load_controlnet(path, family: str | None = None, dtype="float32", device="cpu") -> ControlNet:
    """A ControlNet from a diffusers folder or a single file (.safetensors; .ckpt/.pt/.pth/.bin through
    weights_only loading), with its weights in `dtype` on `device`. `family` (sd15, sd21, sdxl) is detected
    unless given; giving one the weights contradict is an error."""
    p = Path(path)
    _check_family_arg(family)
    parse_dtype(dtype)
    if p.is_dir():
        return load_controlnet_folder(p, family, dtype, device)
    if not p.exists():
        raise ControlNetError(f"ControlNet {echo(str(p))} does not exist")
    if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ControlNetError(f"{echo(str(p))}: expected a diffusers ControlNet folder or a "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)} file")
    return load_controlnet_file(p, family, dtype, device)


# ---- compatibility -------------------------------------------------------------------------------------------
COMPARED_FIELDS = ("in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block",
                   "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                   "class_embed_type")


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def unet_residual_channels(unet) -> list[int]:
    """Channels of the skip tensors a UNet's down path makes, in order: the ones a ControlNet adds to."""
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels += [r.out_channels for r in block.resnets]
        channels += [d.out_channels for d in (block.downsamplers or [])]
    return channels


def check_compatible(controlnet: ControlNet, model) -> None:
    """Raise ControlNetError unless `controlnet` can drive `model`'s UNet: same text width, added conditioning,
    input channels and widths, and one residual of the right width for every skip tensor of the UNet."""
    family = getattr(model, "family", None)
    unet = model.denoiser
    if not hasattr(unet, "down_blocks"):
        raise ControlNetError(f"ControlNet is supported for {spoken(CONTROLNET_FAMILIES)} UNets; this model is "
                              f"{family}")
    c, u = controlnet.module.config, unet.config
    problems = [f"{f} {_norm(c.get(f))} vs {_norm(u.get(f))}" for f in COMPARED_FIELDS
                if _norm(c.get(f)) != _norm(u.get(f))]
    mine = [conv.out_channels for conv in controlnet.module.controlnet_down_blocks]
    theirs = unet_residual_channels(unet)
    if len(mine) != len(theirs):
        problems.append(f"the ControlNet makes {len(mine)} down residuals, the UNet's down blocks take {len(theirs)}")
    elif mine != theirs:
        problems.append(f"down residual channels {mine} vs {theirs}")
    if controlnet.module.controlnet_mid_block.out_channels != unet.mid_block.resnets[-1].out_channels:
        problems.append(f"mid residual channels {controlnet.module.controlnet_mid_block.out_channels} vs "
                        f"{unet.mid_block.resnets[-1].out_channels}")
    if not problems:
        return
    cf = controlnet.family
    other = cf and family and get_family(cf).denoiser_family != get_family(family).denoiser_family
    head = (f"this ControlNet is for {cf}; the model is {family}" if other
            else f"ControlNet {echo(controlnet.name)} does not fit this {family} model's UNet")
    raise ControlNetError(f"{head} (ControlNet vs UNet: {'; '.join(problems)})")
