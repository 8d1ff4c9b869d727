"""What a model family is: every fact the rest of the pack asks about one (architecture, text encoders,
conditioning, latents, ComfyUI's names for it, presets, PnP defaults). One module per family declares one."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "model_configs"


@dataclass(frozen=True)
class TextEncoder:
    kind: str  # "clip", "t5", or the decoder language model whose hidden states it hands on ("mistral3")
    width: int  # the hidden width it hands the denoiser
    pad: str | None = None  # a CLIP tokenizer's pad token: the bundled CLIP vocabulary serves every CLIP encoder
    use: str = "hidden"  # "hidden": its hidden states are the denoiser's text tokens; "pooled": only its pooled
    #                      embedding is (the denoiser's pooled_projections: Flux's CLIP-L); "both": its hidden states
    #                      (side by side with the other "both" encoders', zero-padded to the "hidden" encoders' width
    #                      and put before their tokens) and its pooled embedding (side by side): SD3's two CLIPs
    window: int | None = None  # tokens of one window of its hidden states (default: the family's text_tokens)
    optional: bool = False  # a model may come without it: its tokens are then zeros (SD3's T5, as diffusers does)
    # Decoder language models (kinds of engine/lm_prompts): the hidden states handed on, side by side per token
    # (indices into transformers' output_hidden_states: -1 the last, -2 the second-to-last, 10 after layer 10)
    layers: tuple[int, ...] = (-1,)
    # ... and the chat template its pipeline wraps a prompt in ({} the prompt), whose first `drop` tokens' hidden
    # states are left out (the template's fixed prefix)
    template: str | None = None
    drop: int = 0
    # Qwen3's chat template with thinking enabled (ZImagePipeline) or disabled (Flux2KleinPipeline)
    thinking: bool = True
    # the whole max_length sequence handed on, padding included and unmasked (Flux2KleinPipeline, Flux2Pipeline),
    # instead of the prompts' real tokens with a mask (ZImagePipeline)
    keep_padding: bool = False


@dataclass(frozen=True)
class Sampling:
    """Sampling defaults of a family or one of its models, as its diffusers pipeline's __call__ (or the model card
    that diffusers' docs quote) gives them: what generation uses where the user gives no steps / cfg."""
    steps: int
    cfg: float  # our cfg: > 1 runs classifier-free guidance over the negative prompt, 1 the positive branch only
    model: str  # which model the values are for, and where they come from (recorded in the features' metadata)


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    denoiser: str  # the diffusers subfolder of the denoiser: "unet" or "transformer"
    native_size: int  # the side, in pixels, the shipped catalog's shapes are computed at
    text_encoders: tuple[TextEncoder, ...]
    presets: dict = field(default_factory=dict)  # preset name -> layer ids ("full" is every id, not listed)
    text_tokens: int = 77  # tokens the text encoder hands the denoiser (cross-map's last axis)
    penultimate_text: bool = False  # CLIP's penultimate hidden state instead of the last
    pooled_text: bool = False  # SDXL's added conditioning: the last encoder's pooled projection and the time ids
    zero_negative: bool = False  # unconditional branch = zeros (diffusers' force_zeros_for_empty_prompt default)
    vae_float32: bool = False  # the VAE overflows in float16: keep it float32 below float32
    latent_format: str = "SD15"  # comfy.latent_formats class of its latents (previews)
    comfy_configs: tuple[str, ...] = ()  # comfy/supported_models.py classes ComfyUI loads this family as
    checkpoint_marks: tuple[str, ...] = ()  # regexes that each match a key of its single-file checkpoints
    single_file: bool = True  # single-file checkpoints load (through the pipeline of model_index.json)
    transformer_file: bool = False  # its single files hold the transformer alone (load_transformer_file)
    same_denoiser_as: str | None = None  # another family with this very denoiser (its ControlNets, LoRAs fit)
    native: bool = True  # the native (ComfyUI MODEL) taps cover it
    pnp_feature_layers: tuple[str, ...] = ()  # Plug-and-Play's injected residual features; empty: no PnP
    pnp_attention_skip: str | None = None  # decoder self-attention ids under this prefix are not injected
    # Diffusion transformers: network class name (diffusers' or ComfyUI's) -> function reading a loaded network of
    # that class as a DitLayout (its ids and taps), or None for a network of that class that is another family's.
    # Empty for the families whose taps live in taps.py.
    networks: dict[str, Callable] = field(default_factory=dict)
    # ComfyUI's networks that a ComfyUI builds without this family's options (an older ComfyUI than the model):
    # network -> what the native taps need instead, named in the refusal; None where the network holds the family
    comfy_missing: Callable | None = None
    # Rectified-flow families (DF_MODEL): x_t = (1 - sigma) x0 + sigma eps with sigma = t / 1000 (DDIM-based PnP,
    # inversion and denoise_from do not apply); their diffusers network takes sigma * timestep_scale as its timestep.
    flow: bool = False
    timestep_scale: float = 1.0
    latent_patch: int = 1  # > 1: the diffusers network takes latents packed in p x p patches with position ids
    guidance: float | None = None  # default of a guidance-embedding input (diffusers' pipeline default), if any
    # Sampling: its pipeline hands the flow scheduler sigmas linspace(1, 1 / steps) (FluxPipeline) instead of letting
    # the scheduler space its own timesteps (StableDiffusion3Pipeline).
    linspace_sigmas: bool = False
    # Diffusion transformers whose diffusers network takes other inputs than Flux's (packed) or SD3's (latents as
    # they are): network_inputs(denoiser, x_t (B, C, H, W), sigma, conditioning kwargs, guidance) -> the network's
    # keyword arguments; network_output(prediction, latent_hw) -> the prediction as (B, C, H, W) velocity in the
    # flow convention x0 = x_t - sigma v (engine/flow.py).
    network_inputs: Callable | None = None
    network_output: Callable | None = None
    # Its pipeline's classifier-free guidance when it is not uncond + cfg (cond - uncond):
    # guided(cond, uncond, cfg, latent_hw) -> the prediction (both (B, C, H, W)); QwenImagePipeline's true CFG
    # rescales the combination to the conditional prediction's norm per token.
    guided: Callable | None = None
    # A diffusers folder this backend cannot run although its transformer is the family's: folder_refusal(model
    # index) -> the one-line reason, or None (Qwen-Image-Edit: the reference image's path is the native backend's).
    folder_refusal: Callable | None = None
    # Sampling with a dynamically shifting scheduler: sampling_mu(image tokens, steps) -> mu, where the pipeline
    # computes its own (Flux2Pipeline) instead of the scheduler config's line in the token count (FluxPipeline)
    sampling_mu: Callable | None = None
    # Text encoders a model of the family may come with instead of text_encoders, chosen by the loaded encoder's
    # config model_type (Flux.2 Klein: Qwen3 where dev has Mistral3); see encoders_of
    text_variants: dict[str, tuple[TextEncoder, ...]] = field(default_factory=dict)
    # Sampling defaults (generation's steps and cfg when none are given): the family's, and sampling_variant(denoiser
    # config, scheduler config, pipeline options of model_index.json) -> a variant's (Flux schnell, Z-Image Turbo,
    # Flux.2 Klein) or None
    sampling: Sampling = Sampling(50, 7.5, "StableDiffusionPipeline's __call__ defaults")
    sampling_variant: Callable | None = None
    # Some of its models take reference images (Kontext, Flux.2 editing, Qwen-Image-Edit): its block ids then have
    # reference twins `vit-block{B}-ref{I}-...` (grammar.DIT_REF_SUFFIXES), listed in no catalog (how many
    # references a run has is the run's) and checked when the run reads them.
    reference_images: bool = False

    def encoders_of(self, text_encoders) -> tuple[TextEncoder, ...]:
        """The TextEncoder specs of a model's loaded text encoders: a variant's where the first one's config
        model_type names one (text_variants), else the family's own."""
        first = text_encoders[0] if text_encoders else None
        return self.text_variants.get(getattr(getattr(first, "config", None), "model_type", None), self.text_encoders)

    def sampling_defaults(self, denoiser_config, scheduler_config: dict, pipeline: dict) -> Sampling:
        """The sampling defaults of one model of the family: its variant's, else the family's."""
        variant = self.sampling_variant and self.sampling_variant(denoiser_config, scheduler_config or {},
                                                                  pipeline or {})
        return variant or self.sampling

    @property
    def config_dir(self) -> Path:
        return CONFIG_ROOT / self.name

    def config(self, component: str, file: str = "config.json") -> dict:
        """A shipped diffusers config of one component (unet, vae, text_encoder, scheduler, ...)."""
        return json.loads((self.config_dir / component / file).read_text())

    def denoiser_config(self) -> dict:
        return self.config(self.denoiser)

    @property
    def pipeline(self) -> str:
        """The diffusers pipeline class of the family (model_index.json), which converts its single files."""
        return self.config(".", "model_index.json")["_class_name"]

    @property
    def text_width(self) -> int:
        """The denoiser's cross-attention width: the "hidden" encoders' hidden states side by side (the "both"
        encoders' are zero-padded to it)."""
        return sum(e.width for e in self.text_encoders if e.use == "hidden")

    @property
    def controlnet(self) -> bool:
        """Standard ControlNets are made for it (one ships as its bundled controlnet config)."""
        return (self.config_dir / "controlnet" / "config.json").is_file()

    @property
    def denoiser_family(self) -> str:
        """The family whose denoiser this is: itself, or the one it shares it with."""
        return self.same_denoiser_as or self.name

