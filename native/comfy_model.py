"""The one module of the native backend that touches ComfyUI's objects (MODEL = comfy.model_patcher.ModelPatcher).

It imports `comfy` only inside functions, so the pack still imports without ComfyUI. Everything here works on both
supported ComfyUI generations: the keyed wrappers of current ComfyUI (`add_wrapper_with_key`, APPLY_MODEL) and the
single `model_function_wrapper` slot of the 2024-03 one, which we chain rather than replace.
"""
from __future__ import annotations

import weakref

import torch

from ..layer_catalog.attention_maps import ROPES
from ..layer_catalog.families import FAMILIES, family_of_comfy_config, network_family
from ..layer_catalog.families.meta import native_takes_guidance
from ..layer_catalog.hooks import FeatureCapture
from .capture import (WRAPPER_KEY, ApplyModelWrapper, NativeCapture, OuterSampleWrapper, UnetFunctionWrapper,
                      is_flow, register)
from .memory import feature_sizes
from .names import (NativeLayout, UnsupportedModelError, is_native_pixart, native_ids, native_taps,
                    unreadable_message, unsupported_message)

def _comfy_flux_rope(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor):
    """ComfyUI's own rotary embedding of its Flux-type networks (q, k: (B, heads, N, d); pe as its blocks get it)."""
    from comfy.ldm.flux.math import apply_rope

    return apply_rope(q, k, pe)


def _comfy_qwen_rope(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor):
    """ComfyUI's own rotary embedding of its Qwen-Image network: on (B, N, heads, d), so q, k (B, heads, N, d) are
    turned there and back."""
    from comfy.ldm.qwen_image.model import apply_rotary_emb

    return tuple(apply_rotary_emb(x.transpose(1, 2), pe).transpose(1, 2) for x in (q, k))


ROPES["comfy"] = _comfy_flux_rope
ROPES["comfy-qwen"] = _comfy_qwen_rope

# The native networks this process has tapped (weakly: ComfyUI decides their lifetime), for the status route's
# hook count: between runs every one of them carries no hook of ours.
LIVE_NETWORKS: weakref.WeakSet = weakref.WeakSet()


def _base_model(model):
    """The comfy.model_base.BaseModel of a MODEL (ModelPatcher), or the BaseModel itself."""
    base = getattr(model, "model", model)
    if not hasattr(base, "diffusion_model"):
        raise UnsupportedModelError(unsupported_message(f"a {type(model).__name__} (not a ComfyUI MODEL)"))
    return base


def diffusion_model(model) -> torch.nn.Module:
    """The native network of a MODEL (ComfyUI's UNetModel, PixArtMS, or a diffusion transformer whose family reads
    ComfyUI's class, e.g. Flux); a clear error naming the supported families for any other architecture, and one
    naming what is needed for a network this ComfyUI builds without its family's options (Family.comfy_missing)."""
    base = _base_model(model)
    unet = base.diffusion_model
    config = getattr(base, "model_config", None)
    owner = f"ComfyUI's {type(base).__name__} model" + (f" ({type(config).__name__})" if config is not None else "")
    dit = network_family(unet)
    claimed = family_of_comfy_config(type(config).__name__) if config is not None else None
    family = claimed if claimed is not None and FAMILIES[claimed].networks else dit  # ComfyUI's word first
    # only where ComfyUI's own config names the family: a network no config claims (v0.3.64's Lumina2 NextDiT) is
    # read as the family its class belongs to, with the options it was built with
    missing = FAMILIES[claimed].comfy_missing if claimed is not None else None
    need = missing(unet) if missing is not None else None
    if need is not None:  # e.g. a ZImage config around a NextDiT without Z-Image's options
        raise UnsupportedModelError(unreadable_message(f"{owner} with network {type(unet).__name__}", family, need))
    if dit is not None:
        if not FAMILIES[dit].native:  # its family reads the module tree, but the native backend does not run it yet
            raise UnsupportedModelError(unsupported_message(f"{owner} with network {type(unet).__name__}"))
    elif not (type(unet).__name__ == "PixArtMS" and is_native_pixart(unet)):
        if type(unet).__name__ != "UNetModel" or getattr(unet, "num_classes", None) not in (None, "sequential"):
            raise UnsupportedModelError(unsupported_message(f"{owner} with network {type(unet).__name__}"))
        try:
            NativeLayout(unet)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{owner}: {e}") from None
    LIVE_NETWORKS.add(unet)
    return unet


def native_family(model) -> str | None:
    """Our family id for a MODEL, from ComfyUI's own model detection, else from the class of its diffusion
    transformer (Lumina2's NextDiT: z-image) (None: a UNet we tap but have no catalog for, e.g. the SDXL refiner;
    its ids still come from its module tree)."""
    net = diffusion_model(model)
    config = type(getattr(_base_model(model), "model_config", None)).__name__
    return family_of_comfy_config(config) or network_family(net)


def model_layer_ids(model) -> list[str]:
    """Every layer id of this MODEL (read from its module tree), in forward order: for DFShowLayers / the picker."""
    return native_ids(diffusion_model(model))


def model_layer_shapes(model, height: int, width: int) -> dict[str, list[int]]:
    """Every layer id of this MODEL with its per-sample shape at height x width pixels (no computation: see
    shapes.py), for DFShowLayers."""
    from .shapes import layer_shapes

    return layer_shapes(diffusion_model(model), native_family(model), height, width, inference_dtype(model))


def inference_dtype(model) -> torch.dtype:
    """The dtype ComfyUI runs the MODEL's network in: its manual-cast dtype when the weights are stored in another
    (fp8, quantized), else the weights' own (BaseModel.get_dtype_inference, where ComfyUI has it)."""
    base = _base_model(model)
    if hasattr(base, "get_dtype_inference"):
        return base.get_dtype_inference()
    return base.manual_cast_dtype or base.get_dtype()


def capture_layers(model, layers, steps="all", branch: str = "cond", *, dtype: torch.dtype | None = None,
                   device=None) -> tuple[object, NativeCapture]:
    """A clone of MODEL that records `layers` during sampling, and the capture that receives the rows.

    The original MODEL is not changed and never records. The clone carries one small wrapper (the capture's
    key); torch hooks are put on the shared UNet only while one of the clone's model calls runs and removed in
    `finally`. Other packs' patches and wrappers stay where they are (the 2024-03 wrapper slot is chained).
    """
    unet = diffusion_model(model)
    family = native_family(model)
    from ..engine.dit_transforms import ditf_run

    taps = native_taps(layers, unet, family)
    capture = NativeCapture(taps, steps, branch, family=family, dtype=dtype, device=device,
                            ditf=ditf_run(layers, unet, taps))
    capture.sizes = feature_sizes(unet, family, capture.taps, inference_dtype(model))  # see memory.FeatureSizes
    return _wrapped(model, capture.key), capture


def _wrapped(model, key: str):
    """A clone of MODEL whose model calls run through the capture registered under `key` (capture.register). The
    wrappers hand it the network each call runs, which need not be MODEL's own: current ComfyUI swaps in a
    non-dynamic copy when the conditioning carries hooks, and MultiGPU runs each device's copy."""
    tapped = model.clone()
    if hasattr(tapped, "add_wrapper_with_key"):
        import comfy.patcher_extension

        wrappers = comfy.patcher_extension.WrappersMP
        tapped.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, ApplyModelWrapper(key))
        tapped.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, OuterSampleWrapper(key))
    else:
        inner = tapped.model_options.get("model_function_wrapper")
        tapped.set_model_unet_function_wrapper(UnetFunctionWrapper(key, inner))
    return tapped


# ---- DFCaptureLayers' MODEL seen by other nodes ------------------------------------------------------------------
def capture_of(model) -> NativeCapture | None:
    """The capture a MODEL from capture_layers (or a clone of it: LoraLoader, other patches) records into."""
    from .capture import UnetFunctionWrapper, lookup

    if hasattr(model, "get_wrappers"):
        import comfy.patcher_extension

        for wrapper in model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
            found = lookup(wrapper.key)
            if found is not None:
                return found
    wrapper = getattr(model, "model_options", {}).get("model_function_wrapper")
    while isinstance(wrapper, UnetFunctionWrapper):
        found = lookup(wrapper.key)
        if found is not None:
            return found
        wrapper = wrapper.inner
    return None


def without_capture(model):
    """A clone of MODEL without our capture wrapper (other packs' wrappers stay): a direct extraction must not
    replace the rows a DFCaptureLayers capture holds."""
    from .capture import UnetFunctionWrapper

    clone = model.clone()
    if hasattr(clone, "remove_wrappers_with_key"):
        import comfy.patcher_extension

        clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    wrapper = clone.model_options.get("model_function_wrapper")
    while isinstance(wrapper, UnetFunctionWrapper):  # the 2024-03 slot: unchain ours, keep the rest
        wrapper = wrapper.inner
    if wrapper is None:
        clone.model_options.pop("model_function_wrapper", None)
    else:
        clone.model_options["model_function_wrapper"] = wrapper
    return clone


# ---- direct extraction (DFExtractNative) -------------------------------------------------------------------------
def _model_sampling(model):
    """The MODEL's noise schedule as its samplers see it (a ModelSamplingFlux / -SD3 node's patch included)."""
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else None
    return sampling if sampling is not None else _base_model(model).model_sampling


def is_flow_model(model) -> bool:
    """A rectified-flow MODEL (Flux, SD3): x_t = (1 - sigma) x0 + sigma eps, t = 1000 sigma."""
    return is_flow(_model_sampling(model))


def sigmas_at(model, timesteps: list[int], shift: bool = False) -> torch.Tensor:
    """The sigmas of training timesteps (0..999) on the MODEL's own noise schedule.

    Discrete (UNet) models: sigma_t = sqrt((1 - abar_t) / abar_t) from their 1000-step table. Rectified-flow models
    (Flux, SD3): sigma = t / 1000, so x_t = (1 - t/1000) x0 + t/1000 eps whatever the image size; shift=True maps
    it through the MODEL's own shifted schedule instead (its model_sampling, with a ModelSamplingFlux node's
    resolution shift when one patched it): the sigma its sampler would reach at that fraction of the run."""
    sampling = _model_sampling(model)
    if is_flow(sampling):
        if shift:
            return torch.tensor([float(sampling.percent_to_sigma(1.0 - t / 1000.0)) for t in timesteps])
        return torch.tensor([t / 1000.0 for t in timesteps])
    if shift:
        raise ValueError("shift applies to rectified-flow models (Flux, SD3); this MODEL's schedule is discrete")
    table = getattr(sampling, "sigmas", None)
    if table is None or table.shape[0] != 1000:
        raise UnsupportedModelError(unsupported_message(f"a model whose noise schedule is {type(sampling).__name__}"
                                                        " (neither 1000 discrete training timesteps nor a flow)"))
    return torch.stack([table[t].float() for t in timesteps]).cpu()


def flow_shift(model) -> float | None:
    """The shift parameter of a flow MODEL's schedule (for the metadata of a shifted extraction)."""
    value = getattr(_model_sampling(model), "shift", None)
    return None if value is None else float(value)


def takes_guidance(model) -> bool:
    """The MODEL's network has a guidance embedding (Flux dev): DFExtractNative hands it the guidance value."""
    return native_takes_guidance(diffusion_model(model))


def encode_pixels(vae, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """ComfyUI VAE latents (LATENT space, before the model's latent_format.process_in) of an IMAGE [B, H, W, C].
    Current ComfyUI's encode returns the posterior mean; the 2024-03 one samples with torch's global generator.
    Each image is encoded on its own with that generator seeded by `seed` (and restored after), so on both an
    image's latent depends only on the image and the seed, never on its batch."""
    out = []
    with torch.random.fork_rng(devices=[]):
        for image in pixels[..., :3].split(1):
            torch.manual_seed(seed)
            out.append(vae.encode(image).float().cpu())
    return torch.cat(out)


def conditioning_controls(positive) -> list:
    """The ControlNets (and T2I adapters) attached to a CONDITIONING, each with its chain of previous ones."""
    found = []
    for _, extra in positive:
        control = extra.get("control")
        while control is not None:
            found.append(control)
            control = getattr(control, "previous_controlnet", None)
    return found


def run_at_sigmas(model, positive, latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, layers, *,
                  seed: int = 0, dtype: torch.dtype | None = None, device=None, early_exit: bool = True,
                  feature_resize: int = 1, guidance: float | None = None, transform_meta: dict | None = None
                  ) -> dict[str, torch.Tensor]:
    """Features of `layers` at the last of `sigmas`, through ComfyUI's own sampling path.

    comfy.sample.sample_custom does what every core sampler does: loads the MODEL (with its LoRA patches) and the
    ControlNets of `positive` through comfy.model_management.load_models_gpu, converts the conditioning (SDXL's size
    conditioning from the latent size), runs ControlNets inside each model call and cleans up after. Our sampler
    function makes the calls: x = latent + sigma_0 * noise (the model scales it to sqrt(abar) x0 + sqrt(1 - abar)
    eps; a flow model's to (1 - sigma) x0 + sigma eps), deterministic DDIM (Euler in sigma) steps through the sigmas
    with the positive prompt only (cfg 1, no negative), then one call at the last sigma with our hooks on, stopped
    after the last tap when `early_exit`. The hooks exist only during that call, on the network it runs (see
    _wrapped). guidance: the value a guidance-distilled network (Flux dev) gets, in place of the conditioning's own
    (FluxGuidance's). A request naming the ditf preset gets DiTF's feature (engine/dit_transforms.DitfRun);
    transform_meta receives its metadata, and a diffusion transformer's token ranges of that call ("tokens":
    FeatureCapture.token_ranges: text, the generated image and each reference image).
    """
    import comfy.sample
    import comfy.samplers

    from ..engine.dit_transforms import ditf_run

    net = diffusion_model(model)
    taps = native_taps(layers, net, native_family(model))
    ditf = ditf_run(layers, net, taps, feature_resize)
    if ditf is not None:  # captured unpooled with the modulations; pooled after the transform
        taps, feature_resize = ditf.taps, 1
    last = _LastCall(taps, dict(dtype=dtype, device=device, early_exit=early_exit, feature_resize=feature_resize))

    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            denoised = model_k(x, a * s_in, **extra_args)
            x = denoised + (x - denoised) * (b / a)
        last.armed = True
        try:
            model_k(x, sigmas[-1] * s_in, **extra_args)
        except _TapsDone:
            pass
        return x

    sampler = comfy.samplers.KSAMPLER(sampler_function)
    # the noise is x0 + sigma * eps at every t: ComfyUI's max-sigma rule (noise * sqrt(1 + sigma^2)) is for sampling
    sampler.max_denoise = lambda model_wrap, sigmas: False
    # positive only; 'control_apply_to_uncond' would ask to copy ControlNets to a negative that does not exist here
    cond = [[c, {k: v for k, v in extra.items() if k != "control_apply_to_uncond"}] for c, extra in positive]
    if guidance is not None:
        cond = [[c, {**extra, "guidance": float(guidance)}] for c, extra in cond]
    tapped = _wrapped(model, register(last))
    fix = getattr(comfy.sample, "fix_empty_latent_channels", None)  # absent in the 2024-03 ComfyUI
    if fix is not None:  # as its sampler nodes do: a 4-D LATENT gains the frame axis of a 5-D model (Qwen-Image)
        latent = fix(model, latent)
        noise = noise.reshape(latent.shape)
    comfy.sample.sample_custom(tapped, noise, 1.0, sampler, sigmas, cond, [], latent, disable_pbar=True, seed=seed)
    if last.features is None:
        raise RuntimeError("the sampler's last model call never reached the MODEL's network")
    if transform_meta is not None and last.tokens is not None:
        transform_meta["tokens"] = last.tokens
    return last.features if ditf is None else ditf.finish(last.features, transform_meta)


class _TapsDone(Exception):
    """Raised out of the last model call once every tap fired (early exit): run_at_sigmas needs nothing more."""


class _LastCall:
    """run_at_sigmas' taps, for the model call made while armed, on the network that call runs (see _wrapped)."""

    def __init__(self, taps, options: dict):
        self.taps, self.options = taps, options
        self.armed, self.features, self.tokens = False, None, None

    def begin_run(self, marked: bool = False) -> None:
        pass

    def run_call(self, unet, x, sigma, transformer_options, call, timestep_of=None, text_tokens=None):
        if not self.armed:
            return call()
        self.armed = False
        LIVE_NETWORKS.add(unet)
        with FeatureCapture(unet, self.taps, **self.options) as hooks:
            out = hooks.call(call)
        self.features, self.tokens = hooks.features, hooks.token_ranges()
        if out is None:  # stopped after the last tap
            raise _TapsDone()
        return out
