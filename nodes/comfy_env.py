"""The one module that touches ComfyUI's own modules (folder_paths, comfy.*, server). Everything else imports
without ComfyUI.

Each helper has a plain fallback when ComfyUI is absent (library use, unit tests): model folders and the output
folder come from environment variables, progress is silent, interrupts never happen, memory is not managed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..engine.safe_paths import check_length
from ..layer_catalog.errors import echo
from ..layer_catalog.families import FAMILIES

log = logging.getLogger("diffusion_feature")

try:  # inside ComfyUI these are top-level modules of the server process
    import folder_paths  # type: ignore
except ImportError:  # pragma: no cover - depends on the host
    folder_paths = None


def inside_comfyui() -> bool:
    return folder_paths is not None


# ---- socket types ------------------------------------------------------------------------------------------
class AnyOfTypes(str):
    """An input socket that takes several types, e.g. DF_MODEL or ComfyUI's MODEL: "DF_MODEL,MODEL".

    Current ComfyUI and every frontend read the comma-separated union themselves; the 2024-03 server compares a
    link's type with `!=`, and Python asks this subclass's __ne__ first, so the union holds there too."""

    def __new__(cls, *types: str):
        union = super().__new__(cls, ",".join(types))
        union.types = frozenset(types)
        return union

    def __ne__(self, other) -> bool:
        if isinstance(other, str) and set(other.split(",")) & self.types:
            return False
        return super().__ne__(other)

    def __eq__(self, other) -> bool:
        return not self.__ne__(other)

    __hash__ = str.__hash__


# ---- files ---------------------------------------------------------------------------------------------------
def _fallback_dir(kind: str) -> Path:
    return Path(os.environ.get(f"DF_{kind.upper()}_DIR", Path.cwd() / "models" / kind))


def _roots(kind: str) -> list[str]:
    return folder_paths.get_folder_paths(kind) if folder_paths is not None else [str(_fallback_dir(kind))]


def _walk_files(root: Path):
    """Every file under `root`, relative to it. Directory links are followed, as ComfyUI's own folder walk does
    (models often live on another drive); a folder reached twice through links (a loop) is walked once."""
    seen = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        for f in files:
            path = Path(folder, f)
            if path.is_file():
                yield path.relative_to(root)


def model_names(kind: str) -> list[str]:
    """File (or folder, for 'diffusers') names of a model folder kind: checkpoints, diffusers, controlnet, loras."""
    if folder_paths is not None and kind != "diffusers":
        return sorted(folder_paths.get_filename_list(kind))
    names = []
    for root in map(Path, _roots(kind)):
        if not root.is_dir():
            continue
        for rel in _walk_files(root):
            if kind != "diffusers":
                names.append(str(rel))
            elif rel.name == "model_index.json":  # a diffusers model is a folder holding model_index.json
                names.append(str(rel.parent))
    return sorted(set(names))


def _check_name(kind: str, name: str) -> None:
    """A model name is a relative path inside the model folder: no '..' part, not absolute (links inside the
    folder may point anywhere, as in ComfyUI; a name may not)."""
    path = Path(name)
    if not name or path.is_absolute() or path.drive or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{echo(name)} is not in the {kind} folder: names are relative paths inside it, "
                         f"without '..' (one of: {', '.join(model_names(kind)) or 'none there'})")
    for part in Path(name).parts:  # a name no filesystem holds is refused here, not by a raw OSError later
        check_length(part, f"{kind} name {echo(name)}")


def model_path(kind: str, name: str) -> Path:
    """The full path of a model file or folder listed by model_names; refuses names outside the model folders."""
    _check_name(kind, name)
    if folder_paths is not None and kind != "diffusers":
        path = folder_paths.get_full_path(kind, name)
        if path is None:
            raise ValueError(f"{echo(name)} is not in ComfyUI's {kind} folder")
        return Path(path)
    roots = _roots(kind)
    for root in roots:
        candidate = Path(root).absolute() / name
        if candidate.exists():
            return candidate
    raise ValueError(f"{echo(name)} is not in the {kind} folder ({', '.join(map(str, roots))})")


def output_dir() -> Path:
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    return Path(os.environ.get("DF_OUTPUT_DIR", Path.cwd() / "output"))


def input_dir() -> Path:
    if folder_paths is not None:
        return Path(folder_paths.get_input_directory())
    return Path(os.environ.get("DF_INPUT_DIR", Path.cwd() / "input"))


def layer_file(name: str) -> Path:
    """A layer JSON file named in a widget: only from the input folder (where users upload files)."""
    from ..engine.safe_paths import inside

    return inside(input_dir(), name, f"layer file {echo(name)}", "ComfyUI's input folder")


# ---- device, progress, interrupts ----------------------------------------------------------------------------
def default_device() -> str:
    if folder_paths is not None:
        import comfy.model_management as mm

        return str(mm.get_torch_device())
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _bar(total: int):
    """ComfyUI's progress bar on the node; None outside ComfyUI, where progress is silent."""
    if folder_paths is None:
        return None
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def batch_progress(total: int):
    """The on_batch(n) callback of a run over `total` images: advances the node's bar by n and honours Cancel
    between batches."""
    bar = _bar(total)

    def on_batch(n: int) -> None:
        if bar is not None:
            bar.update(n)
        check_interrupt()
    return on_batch


def step_progress(total: int, family: str | None = None):
    """The on_step(i, steps, latents=None, x0=None) callback of a sampling loop: sets the node's bar, with a preview
    of x0 (else latents) when `family` is given and ComfyUI's preview method allows one, and honours Cancel."""
    bar = _bar(total)

    def on_step(i: int, steps: int, latents=None, x0=None) -> None:
        if bar is not None:
            shown = x0 if x0 is not None else latents
            bar.update_absolute(i + 1, steps, _preview(family, shown) if shown is not None and family else None)
        check_interrupt()
    return on_step


def _preview(family: str, latents):
    """ComfyUI's own latent previewer (its preview-method setting decides: none, latent2rgb, taesd); None when
    this ComfyUI has no compatible previewer API."""
    try:
        import comfy.latent_formats
        import comfy.model_management as mm
        import latent_preview  # type: ignore

        fmt = getattr(comfy.latent_formats, FAMILIES[family].latent_format)()
        previewer = latent_preview.get_previewer(mm.get_torch_device(), fmt)
        if previewer is None:
            return None
        return previewer.decode_latent_to_preview_image("JPEG", latents[:1].float())
    except Exception as e:  # a preview is a nicety: never fail a run for it
        log.debug("diffusion_feature: no preview (%s)", e)
        return None


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel/Interrupt (no-op outside ComfyUI)."""
    if folder_paths is not None:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()


def current_prompt_id():
    """The id of the prompt ComfyUI is running now (the server sets it before executing one, in every supported
    version); None outside ComfyUI."""
    if folder_paths is None:
        return None
    try:
        from server import PromptServer  # type: ignore
    except ImportError:
        return None
    return getattr(getattr(PromptServer, "instance", None), "last_prompt_id", None)


def interrupt_callback():
    """What a run calls between blocks of a forward to honour Cancel: check_interrupt inside ComfyUI, None outside
    (then no hooks are registered at all)."""
    return check_interrupt if folder_paths is not None else None


# ---- memory --------------------------------------------------------------------------------------------------
def _load_managed(store: dict, key: str, modules: dict, device) -> None:
    """Load `modules` to `device` through ComfyUI's memory manager, as one holder (a ModuleDict) built once and
    cached in `store` under `key`: current ComfyUI assigns `.device` on what it manages, which a diffusers model
    has as a read-only property. The holder's ModelPatcher is kept on the holder itself: they live and die
    together (a registry outside would keep every module alive, as the patcher refers to it)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    if key not in store:
        store[key] = torch.nn.ModuleDict(modules)
    holder = store[key]
    patcher = holder.__dict__.get("_df_comfy_patcher")
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(holder, load_device=device,
                                                   offload_device=mm.unet_offload_device())
        holder.__dict__["_df_comfy_patcher"] = patcher
    mm.load_models_gpu([patcher])


def manage(model) -> None:
    """Put a FeatureModel's modules under ComfyUI's memory management: before a run they are loaded to the
    compute device (unloading other models if VRAM is short) and ComfyUI may offload them to free memory for
    others, or on a "free memory" request. Outside ComfyUI this does nothing."""
    if folder_paths is None:
        return
    import torch

    try:  # the holder is kept in model.extra, shared by the model's clones like their modules
        _load_managed(model.extra, "comfy_holder", {"denoiser": model.denoiser, "vae": model.vae,
                                                    "text": torch.nn.ModuleList(model.text_encoders)}, model.device)
    except (TypeError, AttributeError) as e:  # another ComfyUI's ModelPatcher API: run unmanaged, say so once
        if not model.extra.get("unmanaged_warned"):
            log.warning("diffusion_feature: this ComfyUI's memory manager did not accept the model (%s); it stays "
                        "on %s outside ComfyUI's offloading", e, model.device)
            model.extra["unmanaged_warned"] = True


def manage_module(module, device) -> None:
    """The same for a lone module (a ControlNet): loaded to `device` under ComfyUI's memory management, its
    holder kept on the module."""
    if folder_paths is None:
        return
    try:
        _load_managed(module.__dict__, "_df_comfy_holder", {"module": module}, device)
    except (TypeError, AttributeError) as e:
        log.warning("diffusion_feature: this ComfyUI's memory manager did not accept a module (%s); moving it to "
                    "%s directly", e, device)
        module.to(device)


# ---- HTTP routes ---------------------------------------------------------------------------------------------
def register_routes(handlers: dict) -> bool:
    """Register GET routes {path: async handler(request)} on ComfyUI's server; False outside ComfyUI."""
    try:
        from server import PromptServer  # type: ignore
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    for path, handler in handlers.items():
        instance.routes.get(path)(handler)
    return True


def comfy_tokenizer_dir(name: str) -> Path | None:
    """ComfyUI's bundled tokenizer folder of that name, when running inside ComfyUI. Current ComfyUI keeps them in
    comfy/text_encoders/ (t5_tokenizer), older ones and sd1_tokenizer in comfy/: both are looked in, current first."""
    if folder_paths is None:
        return None
    import comfy

    root = Path(next(iter(comfy.__path__))).resolve()  # the 2024-03 `comfy` is a namespace package: no __file__
    return next((folder for folder in (root / "text_encoders" / name, root / name) if folder.is_dir()), None)
