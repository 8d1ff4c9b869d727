"""Loading a FeatureModel: diffusers folders, single-file checkpoints, or random weights of a family's architecture.

Everything is offline: configs come from the folder itself or from the JSON configs shipped for each family
(layer_catalog/model_configs), tokenizers from the folder, ComfyUI, or the bundled CLIP vocabulary. Nothing is
downloaded, and a pickle checkpoint is only read through torch.load(weights_only=True).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
import weakref
from pathlib import Path

import torch

from ..layer_catalog import FAMILIES, get_family
from ..layer_catalog.families import denoiser_from_config, family_of_checkpoint, family_of_unet
from ..layer_catalog.errors import echo, public_module
from .checkpoint_files import SINGLE_FILE_SUFFIXES, CheckpointError, load_pickle_state_dict, read_key_shapes
from .model import FeatureModel, parse_device, parse_dtype
from . import lm_prompts, tokenizers
from .tokenizers import TokenizerMissingError, clip_tokenizer, load_tokenizer
from .transformer_files import load_transformer

LIVE_DENOISERS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # for the status route: what is loaded now
RANDOM_PREFIX = "random:"  # load_model("random:FAMILY"): the family's real architecture with random weights
RANDOM_SOURCE = "random weights"  # FeatureModel.source of such a model


class RandomWeightsWarning(UserWarning):
    """A model with random weights was loaded: everything runs, but its features mean nothing."""


RandomWeightsWarning.__module__ = public_module(__name__)  # a warning, not under DiffusionFeatureError


# ---- family detection ----------------------------------------------------------------------------------------
def detect_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """The family of a single-file (original layout) checkpoint from its tensor names and shapes: the families'
    checkpoint marks (the text encoder tells SD1 from SD2), else the width of a bare UNet's cross-attention."""
    family = family_of_checkpoint(shapes)
    if family is not None:
        return family
    ctx = [s for k, s in shapes.items() if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")]
    if ctx:
        return family_of_unet(ctx[0][-1], pooled=False) or f"an unknown UNet with text width {ctx[0][-1]}"
    if "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in shapes):
        return "a diffusers UNet state dict (not a full checkpoint)"
    return "no known diffusion checkpoint"


def _check_family(detected: str, family: str | None, path) -> str:
    known = detected in FAMILIES
    if family is None:
        if not known:
            raise CheckpointError(f"{echo(str(path))} looks like {detected}; cannot tell its family (valid: "
                                  f"{', '.join(FAMILIES)})")
        return detected
    get_family(family)
    if known and get_family(family).denoiser_family == get_family(detected).denoiser_family:
        return family
    raise CheckpointError(f"{echo(str(path))} was given as {family} but looks like {detected}; "
                          f"pass family={detected!r}" + ("" if known else " or check the file"))


# ---- tokenizers ----------------------------------------------------------------------------------------------
# diffusers' folders of the text encoders and their tokenizers, in the order of the family's text_encoders
ENCODER_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


def default_tokenizers(family: str) -> list:
    """Tokenizers for a checkpoint that ships none: the bundled CLIP vocabulary, or ComfyUI's T5 tokenizer."""
    return [default_tokenizer(family, i) for i in range(len(get_family(family).text_encoders))]


def default_tokenizer(family: str, index: int, specs=None):
    """The default tokenizer of the family's text encoder number `index` (see default_tokenizers); `specs`: the
    TextEncoders of the encoders loaded (a variant's, Family.encoders_of), default the family's own."""
    spec = (specs or get_family(family).text_encoders)[index]
    return clip_tokenizer(spec.pad) if spec.kind == "clip" else _host_tokenizer(family, spec.kind)


# Text encoder kinds whose tokenizer ComfyUI bundles (comfy/text_encoders/<folder>), with its name in messages
HOST_TOKENIZERS = {"t5": ("t5_tokenizer", "T5"), "qwen2.5-vl": ("qwen25_tokenizer", "Qwen2.5-VL"),
                   "qwen3": ("qwen25_tokenizer", "Qwen3"),  # Qwen3 shares Qwen2.5's vocabulary (ComfyUI's Z-Image)
                   "mistral3": (None, "Mistral3")}  # no host ships Mistral's Tekken vocabulary: a folder's only


def _host_tokenizer(family: str, kind: str):
    folder_name, name = HOST_TOKENIZERS.get(kind, (None, kind))
    folder = tokenizers.host_tokenizer_dir(folder_name) if folder_name else None
    if folder is None:
        raise TokenizerMissingError(
            f"{family} needs its {name} tokenizer: load it from a diffusers folder that has tokenizer/"
            + (", or run inside ComfyUI (which bundles one)" if folder_name else "") + ". It is never downloaded.")
    tokenizer = load_tokenizer(folder)
    template = getattr(lm_prompts.module_of(kind), "CHAT_TEMPLATE", None)  # a vocabulary shared without its template
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


# ---- loaders -------------------------------------------------------------------------------------------------
def _finish(model: FeatureModel, dtype: torch.dtype, device) -> FeatureModel:
    """Check the text encoders' kinds, move to device/dtype. SDXL's VAE stays float32 below float32: it overflows
    in float16."""
    vae_dtype = torch.float32 if (dtype != torch.float32 and get_family(model.family).vae_float32) else dtype
    for module, want in [(model.denoiser, dtype), (model.vae, vae_dtype)] + [(e, dtype) for e in model.text_encoders]:
        module.to(device)
        if next(module.parameters()).dtype != want:
            module.to(want)
        module.eval()
    _use_xformers_when_possible(model.denoiser)
    LIVE_DENOISERS.add(model.denoiser)
    return model


def _use_xformers_when_possible(denoiser) -> None:
    if next(denoiser.parameters()).device.type != "cuda":
        return
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    denoiser.enable_xformers_memory_efficient_attention()


def build_random(family: str, dtype="float32", device="cpu", seed: int = 0) -> FeatureModel:
    """The family's full architecture with random weights (for demos and benchmarks: its features mean nothing)."""
    import transformers

    fam = get_family(family)
    parse_device(device)  # before minutes of building
    tokenizers = default_tokenizers(family)
    torch.manual_seed(seed)
    denoiser = denoiser_from_config(fam.denoiser_config(), "cpu")
    vae = _vae_class(fam.config("vae")).from_config(fam.config("vae"))
    index = fam.config(".", "model_index.json")
    encoders = []
    for sub, _ in ENCODER_FOLDERS:
        cfg_path = fam.config_dir / sub / "config.json"
        if cfg_path.exists():
            config = transformers.AutoConfig.from_pretrained(str(cfg_path.parent), local_files_only=True)
            # the class the pipeline loads (model_index.json: Qwen3Model for Z-Image, not the config's causal LM),
            # else the one the config names (T5EncoderModel for PixArt: AutoModel would build T5's decoder too)
            named = (index.get(sub) or [None, None])[1]
            cls = getattr(transformers, named, None) or getattr(transformers, config.architectures[0])
            encoders.append(cls._from_config(config))
    scheduler = fam.config("scheduler", "scheduler_config.json")
    model = FeatureModel(family, denoiser, vae, encoders, tokenizers, scheduler, source=RANDOM_SOURCE)
    return _finish(model, parse_dtype(dtype), device)


def _vae_class(config: dict):
    """The diffusers VAE class a VAE config names (AutoencoderKL unless it says otherwise: Qwen-Image's
    AutoencoderKLQwenImage)."""
    import diffusers

    return getattr(diffusers, config.get("_class_name") or "AutoencoderKL")


def _read_config(path: Path, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{echo(folder.name)} is not a diffusers model folder: it has no "
                              f"{path.relative_to(folder)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{echo(folder.name)}: {path.relative_to(folder)} is not readable JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{echo(folder.name)}: {path.relative_to(folder)} must hold a JSON object")
    return data


def detect_folder_family(folder: Path) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{echo(folder.name)} is not a diffusers model folder (a folder holding "
                              "model_index.json)")
    index = _read_config(folder / "model_index.json", folder)
    if "transformer" in index:  # a transformer family: the one whose denoiser class the folder names
        named = index["transformer"][1] if isinstance(index["transformer"], list) else None
        other = [f.name for f in FAMILIES.values() if f.denoiser == "transformer"
                 and f.denoiser_config()["_class_name"] == named]
        return other[0] if other else f"a transformer of class {echo(str(named))}"
    unet = _read_config(folder / "unet" / "config.json", folder)
    return family_of_unet(unet.get("cross_attention_dim"), unet.get("addition_embed_type") == "text_time",
                          exact=False)


def load_diffusers_folder(folder, family: str | None = None, dtype="float32", device="cpu") -> FeatureModel:
    """A diffusers folder (model_index.json + component subfolders), read locally only."""
    import diffusers

    parse_device(device)  # before reading gigabytes
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{echo(str(folder))} is not a diffusers folder (no model_index.json)")
    family = _check_family(detect_folder_family(folder), family, folder)
    fam = get_family(family)
    _check_pipeline(fam, folder)
    # the components first: a text encoder of another family is refused before gigabytes of transformer are read
    vae, encoders, tokenizers, scheduler = _folder_components(folder, family)
    denoiser_cls = getattr(diffusers, fam.denoiser_config()["_class_name"])
    denoiser = denoiser_cls.from_pretrained(folder, subfolder=fam.denoiser, local_files_only=True)
    model = FeatureModel(family, denoiser, vae, encoders, tokenizers, scheduler, source=str(folder),
                         extra={"pipeline": pipeline_options(_read_config(folder / "model_index.json", folder))})
    return _finish(model, parse_dtype(dtype), device)


def pipeline_options(index: dict) -> dict:
    """The pipeline's own settings in a model_index.json (its class, is_distilled, ...), its components left out:
    what tells models of one family apart where their networks do not (Flux.2 Klein step-distilled or base)."""
    return {k: v for k, v in index.items() if not isinstance(v, (list, dict))}


def _check_pipeline(fam, folder: Path) -> None:
    """Refuse a folder of the family's transformer that this backend cannot run (Family.folder_refusal)."""
    reason = fam.folder_refusal and fam.folder_refusal(_read_config(folder / "model_index.json", folder))
    if reason:
        raise CheckpointError(f"{echo(folder.name)}: {reason}")


def _check_encoder(fam, config_path: Path, where: str) -> None:
    """A text encoder of another family's model (its config's model_type is neither the family's shipped one's nor
    one of its text_variants: T5 where Qwen2.5-VL belongs) is refused in one line naming what fits."""
    want_path = fam.config_dir / config_path.parent.name / "config.json"
    if not want_path.is_file() or not config_path.is_file():
        return
    want = json.loads(want_path.read_text())
    try:
        got = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # transformers' own load names an unreadable config
    if isinstance(got, dict) and got.get("model_type") and got.get("model_type") != want.get("model_type") \
            and got.get("model_type") not in fam.text_variants:
        named = (got.get("architectures") or [got["model_type"]])[0]
        raise CheckpointError(f"{where} is a {named} ({got['model_type']}), not {fam.name}'s text encoder: "
                              f"{fam.name} takes a {want['architectures'][0]} ({want['model_type']})"
                              + "".join(f" or a {kind} model" for kind in fam.text_variants))


def _folder_components(folder: Path, family: str) -> tuple:
    """(VAE, text encoders, tokenizers, scheduler config) of a diffusers folder, read locally only; a missing
    tokenizer folder falls back to default_tokenizers."""
    import transformers
    from transformers import AutoModel

    index = _read_config(folder / "model_index.json", folder)
    kw = {"local_files_only": True}
    vae = _vae_class(_read_config(folder / "vae" / "config.json", folder)).from_pretrained(folder, subfolder="vae",
                                                                                         **kw)
    fam = get_family(family)
    encoders, tokenizers = [], []
    for i, (enc_name, tok_name) in enumerate(ENCODER_FOLDERS):
        if enc_name not in index or index[enc_name][1] is None:  # e.g. SD3 saved without T5 (optional)
            continue
        _check_encoder(fam, folder / enc_name / "config.json", f"{echo(folder.name)}/{enc_name}")
        # the class the folder names (Qwen2_5_VLForConditionalGeneration: its hidden states are the pipeline's)
        cls = getattr(transformers, str(index[enc_name][1]), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else AutoModel
        encoders.append(cls.from_pretrained(folder / enc_name, **kw))
        tok_dir = folder / tok_name
        tokenizers.append(load_tokenizer(tok_dir) if tok_dir.is_dir()
                          else default_tokenizer(family, i, fam.encoders_of(encoders)))
    scheduler = _read_config(folder / "scheduler" / "scheduler_config.json", folder)
    return vae, encoders, tokenizers, scheduler


def load_transformer_file(path, family: str, components, dtype="float32", device="cpu",
                          config_dir=None) -> FeatureModel:
    """A single-file diffusion transformer in its original layout (Flux's, SD3's, as their makers and ComfyUI ship
    them; only the transformer is read, whatever else the file holds), converted (transformer_files.py) for the
    family's config (or `config_dir`, or the `<stem>.config/` folder beside the file). The text encoders,
    tokenizers, VAE and scheduler come from `components`: a diffusers folder of the family (its transformer is not
    read), or single files by diffusers component name, {"vae": ae.safetensors, "text_encoder":
    clip_l.safetensors, "text_encoder_2": t5xxl...}, built from the same configs with the bundled / host
    tokenizers (an optional encoder, SD3's T5, may be left out)."""
    path, fam = Path(path), get_family(family)
    needed, optional = _file_component_names(fam, fam.config_dir), _optional_components(fam)
    folder_only = _vae_class(fam.config("vae")).__name__ != "AutoencoderKL"  # component files read as SD / Flux's
    if folder_only and (components is None or isinstance(components, dict)):
        raise CheckpointError(f"{echo(str(path))} is read for its {family} transformer only: give components= (the "
                              f"CLI's --components) as a {family} diffusers folder with its text encoder, tokenizer "
                              f"and VAE (its component files one by one are not read)")
    if components is None:
        raise CheckpointError(f"{echo(str(path))} is read for its {family} transformer only: give components= (the "
                              f"CLI's --components), a {family} diffusers folder with its text encoders, tokenizers "
                              f"and VAE, or its files as "
                              f"{', '.join(f'{n}=FILE' + (' (optional)' if n in optional else '') for n in needed)}")
    sidecar = path.with_name(path.stem + ".config")
    if config_dir is None and (sidecar / fam.denoiser / "config.json").is_file():
        config_dir = sidecar
    config_dir = Path(config_dir) if config_dir is not None else fam.config_dir
    if isinstance(components, dict):
        parts = _file_components(components, family, config_dir)
    else:
        components = Path(components)
        if not (components / "model_index.json").is_file():
            raise CheckpointError(f"components {echo(str(components))} is not a diffusers folder (no "
                                  "model_index.json)")
        _check_family(detect_folder_family(components), family, components)
        parts = _folder_components(components, family)
    denoiser = load_transformer(path, _read_config(config_dir / fam.denoiser / "config.json", config_dir))
    model = FeatureModel(family, denoiser, *parts, source=str(path))
    return _finish(model, parse_dtype(dtype), device)


def _file_component_names(fam, config_dir: Path) -> list[str]:
    return ["vae", *(sub for sub, _ in ENCODER_FOLDERS if (config_dir / sub / "config.json").is_file())]


def _optional_components(fam) -> set[str]:
    """The text encoders a model may come without (SD3's T5)."""
    return {sub for (sub, _), spec in zip(ENCODER_FOLDERS, fam.text_encoders) if spec.optional}


def _file_components(files: dict, family: str, config_dir: Path) -> tuple:
    """(VAE, text encoders, tokenizers, scheduler config) from single files: the VAE in its original layout
    (converted by diffusers), each text encoder in transformers' layout (as ComfyUI's clip_l / t5xxl files are),
    on the configs of config_dir."""
    from diffusers import AutoencoderKL

    names, optional = _file_component_names(get_family(family), config_dir), _optional_components(get_family(family))
    missing = [n for n in names if n not in files and n not in optional]
    unknown = sorted(set(files) - set(names))
    if missing or unknown:
        raise CheckpointError(f"a {family} transformer's component files are "
                              f"{', '.join(f'{n}=FILE' + (' (optional)' if n in optional else '') for n in names)}"
                              + (f"; missing {', '.join(missing)}" if missing else "")
                              + (f"; unknown {', '.join(map(echo, unknown))}" if unknown else ""))
    names = [n for n in names if n in files]
    for name in names:
        if not Path(files[name]).is_file():
            raise CheckpointError(f"component {name}: {echo(str(files[name]))} does not exist")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _as_safetensors(Path(files["vae"])) as vae_file:
        vae = AutoencoderKL.from_single_file(str(vae_file), config=str(config_dir), subfolder="vae",
                                             local_files_only=True)
    encoders = [_text_encoder_file(Path(files[n]), config_dir / n) for n in names[1:]]
    order = [sub for sub, _ in ENCODER_FOLDERS]
    tokenizers = [default_tokenizer(family, order.index(n)) for n in names[1:]]
    scheduler = _read_config(config_dir / "scheduler" / "scheduler_config.json", config_dir)
    return vae, encoders, tokenizers, scheduler


def _text_encoder_file(path: Path, config_folder: Path):
    """A transformers text encoder of the class its config names, from one weights file, read by transformers
    itself (its own key conversions apply) from a temporary folder holding the config and a link to the file."""
    import shutil
    import tempfile

    import transformers

    config = transformers.AutoConfig.from_pretrained(str(config_folder), local_files_only=True)
    with _as_safetensors(path) as weights, tempfile.TemporaryDirectory(prefix="df-encoder-") as tmp:
        shutil.copy(config_folder / "config.json", Path(tmp) / "config.json")
        os.symlink(Path(weights).resolve(), Path(tmp) / "model.safetensors")
        try:
            model, info = getattr(transformers, config.architectures[0]).from_pretrained(
                tmp, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{echo(str(path))} is not a {config.architectures[0]} of {config_folder} "
                                  f"({first})") from None
    # transformers fills weights a file lacks with random values and only warns: another model's encoder file (its
    # names all different) would load as a random encoder. Most of the weights missing means the wrong file.
    missing, total = len(info.get("missing_keys") or ()), len(model.state_dict())
    if missing * 2 > total:
        raise CheckpointError(f"{echo(str(path))} is not a {config.architectures[0]} ({config_folder.name}): "
                              f"{missing} of its {total} weights are not in the file; give the "
                              f"{config.architectures[0]} file this component takes")
    return model


def load_single_file(path, family: str | None = None, dtype="float32", device="cpu",
                     config_dir=None, components=None) -> FeatureModel:
    """A single-file checkpoint in the original (LDM) layout, converted by diffusers with our shipped configs.

    A checkpoint of a non-standard size (a custom or test architecture) can carry its own diffusers config folder
    beside it, named `<file stem>.config/` (model_index.json and component configs); it is used instead.
    """
    parse_device(device)  # before reading gigabytes
    path = Path(path)
    family = _check_family(detect_family(read_key_shapes(path)), family, path)
    sidecar = path.with_name(path.stem + ".config")
    if config_dir is None and (sidecar / "model_index.json").is_file():
        config_dir = sidecar
    fam = get_family(family)
    if fam.transformer_file:  # a file of the transformer alone, without its text encoders and VAE
        return load_transformer_file(path, family, components, dtype, device, config_dir)
    if not fam.single_file:
        raise CheckpointError(f"single-file {family} checkpoints are not supported: load {family} from its "
                              "diffusers folder")
    config_dir = Path(config_dir) if config_dir is not None else fam.config_dir
    import diffusers

    tokenizers = default_tokenizers(family)
    pipe_cls = getattr(diffusers, fam.pipeline)
    extra = {"tokenizer": tokenizers[0]}
    if len(tokenizers) > 1:
        extra["tokenizer_2"] = tokenizers[1]
    else:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # diffusers reads pickles itself; give it tensors we have read safely
        with _as_safetensors(path) as source:
            pipe = pipe_cls.from_single_file(str(source), config=str(config_dir), local_files_only=True, **extra)
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{echo(str(path))} does not fit the {family} architecture of {config_dir} ({first}). "
                              f"A checkpoint of a non-standard size needs its diffusers config folder beside it "
                              f"as {path.stem}.config/") from None
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if len(tokenizers) > 1 else [])
    scheduler = dict(pipe.scheduler.config)
    model = FeatureModel(family, pipe.unet, pipe.vae, encoders, tokenizers, scheduler, source=str(path))
    return _finish(model, parse_dtype(dtype), device)


@contextlib.contextmanager
def _as_safetensors(path: Path):
    """The file itself if it is safetensors, else a temporary safetensors copy of its tensors (read with
    weights_only=True), removed afterwards."""
    if path.suffix == ".safetensors":
        yield path
        return
    tmp = _as_temporary_safetensors(path)
    try:
        yield tmp
    finally:
        os.unlink(tmp)


def _as_temporary_safetensors(path: Path) -> Path:
    import tempfile

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in load_pickle_state_dict(path).items()}
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    save_file(state, tmp)
    return Path(tmp)


def random_family(spec) -> str | None:
    """The family of a model spec "random:FAMILY" (None for anything else: a path)."""
    if not (isinstance(spec, str) and spec.startswith(RANDOM_PREFIX)):
        return None
    family = spec[len(RANDOM_PREFIX):]
    if family not in FAMILIES:
        raise CheckpointError(f"model {echo(spec)}: unknown family {echo(family)}; valid: "
                              f"{', '.join(RANDOM_PREFIX + f for f in FAMILIES)}")
    return family


def random_weights_notice(family: str) -> str:
    """What a model of random weights must say wherever it is loaded (the CLI prints it as a banner)."""
    return (f"RANDOM WEIGHTS of the real {family} architecture: every stage runs for real (VAE, text encoder, "
            "denoiser, hooks, saving, PCA), but features of random weights are NOT meaningful. Give a checkpoint "
            "(a diffusers folder or a .safetensors file) for real features.")


def load_model(path, family: str | None = None, dtype="float32", device="cpu", components=None) -> FeatureModel:
    """A diffusers folder or a single-file checkpoint; the family is detected unless given.

    "random:FAMILY" (e.g. "random:sd15") builds the family's real architecture with random weights, so everything
    can be tried without a checkpoint; it warns (RandomWeightsWarning) that its features mean nothing.
    components: for a single file holding a transformer only (Flux), the diffusers folder of its text encoders,
    tokenizers and VAE (see load_transformer_file)."""
    random_of = random_family(path)
    if random_of is not None:
        if family is not None and family != random_of:
            raise CheckpointError(f"model {echo(path)} was given with family {echo(family)}; give one of them")
        warnings.warn(random_weights_notice(random_of), RandomWeightsWarning, stacklevel=2)
        return build_random(random_of, dtype, device)
    p = Path(path)
    if p.is_dir():
        return load_diffusers_folder(p, family, dtype, device)
    if not p.exists():
        raise CheckpointError(f"checkpoint {echo(str(p))} does not exist")
    if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{echo(str(p))}: expected a diffusers folder or a "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)} file")
    return load_single_file(p, family, dtype, device, components=components)
