"""Test helper: a checkpoint that ComfyUI's own CheckpointLoaderSimple detects as SD1.5, plus a ControlNet and a
LoRA for it, written from seeded random weights into a ComfyUI's model folders (cached there: ~460 MB, never
committed).

ComfyUI recognises SD1.5 by the UNet's model_channels 320 and context_dim 768, and then builds the text encoder
(CLIP-L) and the VAE at full size from its own configs, so those two are full size here; the UNet may be smaller,
and has two levels (320 with attention, 640 without), one resnet per down level. Weights are written in the
original single-file layout (tests/ldm_export.py) and in float16.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

NATIVE_CKPT = "df-native-sd15-2level.safetensors"
NATIVE_CN = "df-native-sd15-canny.safetensors"
NATIVE_LORA = "df-native-sd15-lora.safetensors"
NATIVE_FLUX = "df-native-flux-1single.safetensors"
NATIVE_SD3 = "df-native-sd35-1block.safetensors"
NATIVE_TAESD3 = "df-native-taesd3.safetensors"
NATIVE_LUMINA2 = "df-native-lumina2-1layer.safetensors"
NATIVE_QWEN = "df-native-qwen-image-1block.safetensors"


def native_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8).eval()


def _clip_l(seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768)).eval()


def _vae(seed: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=512).eval()


def _half(state: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _lora(unet, seed: int = 3) -> dict:
    """A rank-4 kohya LoRA on every attention q/v projection of the UNet (diffusers module names, as ComfyUI's
    LoraLoader maps them)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, sub in unet.named_modules():
        if isinstance(sub, torch.nn.Linear) and name.endswith(("to_q", "to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            state[key + ".lora_down.weight"] = torch.randn(4, sub.in_features, generator=g) * 0.2
            state[key + ".lora_up.weight"] = torch.randn(sub.out_features, 4, generator=g) * 0.2
            state[key + ".alpha"] = torch.tensor(4.0)
    return state


def _controlnet(unet, seed: int = 4):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet).eval()
    with torch.no_grad():  # a fresh ControlNet adds exact zeros, which would prove nothing
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.05)
    return net


def write_native_models(comfy_dir: Path) -> dict[str, Path]:
    """The three files in `comfy_dir`/models/{checkpoints,controlnet,loras}; built only when one is missing."""
    from ldm_export import controlnet_to_ldm, sd15_single_file_state

    paths = {"checkpoint": comfy_dir / "models" / "checkpoints" / NATIVE_CKPT,
             "controlnet": comfy_dir / "models" / "controlnet" / NATIVE_CN,
             "lora": comfy_dir / "models" / "loras" / NATIVE_LORA}
    if all(p.is_file() for p in paths.values()):
        return paths
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    unet = native_unet()
    with torch.no_grad():
        tmp = paths["checkpoint"].with_suffix(".tmp")
        save_file(_half(sd15_single_file_state(unet, _vae(), _clip_l())), str(tmp))
        tmp.replace(paths["checkpoint"])
        save_file(_half(controlnet_to_ldm(_controlnet(unet))), str(paths["controlnet"]))
        save_file(_lora(unet), str(paths["lora"]))
    return paths


# ComfyUI detects Flux from its keys (a double block's key norm) but fixes its widths (model_detection: hidden 3072,
# 24 heads, T5 width 4096, MLP ratio 4), so only the depth can be small: one double-stream block (the text and image
# streams meet in its joint attention) and no single block. vector_in's input width is read from the file: CLIP-L's
# pooled 768.
_FLUX_SHAPES = {
    "img_in": (3072, 64), "time_in.in_layer": (3072, 256), "time_in.out_layer": (3072, 3072),
    "vector_in.in_layer": (3072, 768), "vector_in.out_layer": (3072, 3072), "guidance_in.in_layer": (3072, 256),
    "guidance_in.out_layer": (3072, 3072), "txt_in": (3072, 4096),
    "final_layer.linear": (64, 3072), "final_layer.adaLN_modulation.1": (2 * 3072, 3072),
    **{f"double_blocks.0.{s}_{name}": shape for s in ("img", "txt") for name, shape in (
        ("mod.lin", (6 * 3072, 3072)), ("attn.qkv", (3 * 3072, 3072)), ("attn.proj", (3072, 3072)),
        ("mlp.0", (4 * 3072, 3072)), ("mlp.2", (3072, 4 * 3072)))}}


def write_native_flux(comfy_dir: Path) -> Path:
    """A Flux dev-type diffusion model (guidance embedding) that ComfyUI's UNETLoader detects, stored in float8
    (~400 MB, which ComfyUI computes in with its manual cast; cached in `comfy_dir`/models/diffusion_models, built
    only when missing). Weights scaled by 1/sqrt(fan-in) so activations stay of order one."""
    path = comfy_dir / "models" / "diffusion_models" / NATIVE_FLUX
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    state = {}
    for name, (out, inp) in _FLUX_SHAPES.items():
        state[f"{name}.weight"] = (torch.randn(out, inp, generator=g) / inp ** 0.5).to(torch.float8_e4m3fn)
        state[f"{name}.bias"] = (torch.randn(out, generator=g) * 0.02).to(torch.float8_e4m3fn)
    for s in ("img", "txt"):
        for norm in ("query_norm", "key_norm"):
            state[f"double_blocks.0.{s}_attn.norm.{norm}.scale"] = torch.ones(128, dtype=torch.float8_e4m3fn)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


# ComfyUI v0.3.64 detects Lumina2 from cap_embedder.1.weight and fixes its widths (model_detection: 2304 channels, 24
# query and 8 key-value heads of 96, rope axes 32 + 32 + 32, two refiners of each stream as NextDiT's default); the
# caption width and the depth are read from the file: Qwen3-4B's 2560 (the width Z-Image's prompts have) and one
# main layer. No pad tokens (Lumina2 has none).
def _lumina2_shapes() -> dict[str, tuple[int, ...]]:
    d, hidden = 2304, 4 * 2304
    block = {"attention.qkv": (3840, d), "attention.out": (d, d), "feed_forward.w1": (hidden, d),
             "feed_forward.w2": (d, hidden), "feed_forward.w3": (hidden, d),
             **{f"{n}": (d,) for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")},
             "attention.q_norm": (96,), "attention.k_norm": (96,)}
    shapes = {"x_embedder": (d, 64), "t_embedder.mlp.0": (1024, 256), "t_embedder.mlp.2": (1024, 1024),
              "cap_embedder.0": (2560,), "cap_embedder.1": (d, 2560), "norm_final": (d,),
              "final_layer.linear": (64, d), "final_layer.adaLN_modulation.1": (d, 1024)}
    for prefix, modulated in (("noise_refiner.0", True), ("noise_refiner.1", True), ("context_refiner.0", False),
                              ("context_refiner.1", False), ("layers.0", True)):
        shapes.update({f"{prefix}.{n}": shape for n, shape in block.items()})
        if modulated:
            shapes[f"{prefix}.adaLN_modulation.1"] = (4 * d, 1024)
    return shapes


def _fp8_diffusion_model(comfy_dir: Path, name: str, shapes: dict, seed: int, biased) -> Path:
    """A diffusion model file of `shapes` (module -> weight shape) in float8 (computed in with ComfyUI's manual cast),
    cached in `comfy_dir`/models/diffusion_models (built only when missing): weights scaled by 1/sqrt(fan-in),
    biases (where biased(module)) small, 1-D weights (RMSNorm scales) 1."""
    path = comfy_dir / "models" / "diffusion_models" / name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, shape in shapes.items():
        if len(shape) == 1:
            state[f"{module}.weight"] = torch.ones(shape, dtype=torch.float8_e4m3fn)
            continue
        state[f"{module}.weight"] = (torch.randn(*shape, generator=g) / shape[1] ** 0.5).to(torch.float8_e4m3fn)
        if biased(module):
            state[f"{module}.bias"] = (torch.randn(shape[0], generator=g) * 0.02).to(torch.float8_e4m3fn)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


def write_native_lumina2(comfy_dir: Path) -> Path:
    """A Lumina2 diffusion model (ComfyUI's NextDiT) that v0.3.64's UNETLoader detects (~430 MB): the network of
    z-image's native example on a ComfyUI too old for Z-Image. NextDiT's attention and FFN have no biases."""
    return _fp8_diffusion_model(comfy_dir, NATIVE_LUMINA2, _lumina2_shapes(), 7,
                                lambda m: not m.split(".")[-1].startswith(("qkv", "out", "w")))


# ComfyUI v0.3.64 detects Qwen-Image from txt_norm.weight and reads only the input width and the depth from the file
# (every other width is its model's default: 24 heads x 128 = 3072, Qwen2.5-VL's 3584 text width): one block.
def _qwen_image_shapes() -> dict[str, tuple[int, ...]]:
    d, b = 3072, "transformer_blocks.0"
    shapes = {"time_text_embed.timestep_embedder.linear_1": (d, 256),
              "time_text_embed.timestep_embedder.linear_2": (d, d), "txt_norm": (3584,), "img_in": (d, 64),
              "txt_in": (d, 3584), "norm_out.linear": (2 * d, d), "proj_out": (64, d)}
    for s in ("img", "txt"):
        shapes.update({f"{b}.{s}_mod.1": (6 * d, d), f"{b}.{s}_mlp.net.0.proj": (4 * d, d),
                       f"{b}.{s}_mlp.net.2": (d, 4 * d)})
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        shapes[f"{b}.attn.{n}"] = (d, d)
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        shapes[f"{b}.attn.{n}"] = (128,)
    return shapes


def write_native_qwen_image(comfy_dir: Path) -> Path:
    """A Qwen-Image diffusion model that v0.3.64's UNETLoader detects (one block at the real widths, ~380 MB)."""
    return _fp8_diffusion_model(comfy_dir, NATIVE_QWEN, _qwen_image_shapes(), 8, lambda m: True)


# ComfyUI detects SD3 from its keys (joint_blocks.0.context_block.attn.qkv) and reads every width from the file but
# the head width (64 channels, as many heads as blocks): one joint block of width 64, SD3.5 medium's kind (RMS
# QK-norm, the second image attention), its text stream pre-only as any last block's; T5's width 4096 and the pooled
# CLIP-L + CLIP-G 2048 in; position embeddings for a 96 x 96 patch grid (DFExtractNative resizes to the area of
# 1024 x 1024 pixels: a 3:2 image is 80 patches wide).
_SD3_WIDTH = 64
_SD3_SHAPES = {
    "x_embedder.proj": (64, 16, 2, 2), "t_embedder.mlp.0": (64, 256), "t_embedder.mlp.2": (64, 64),
    "y_embedder.mlp.0": (64, 2048), "y_embedder.mlp.2": (64, 64), "context_embedder": (64, 4096),
    "joint_blocks.0.context_block.attn.qkv": (192, 64), "joint_blocks.0.context_block.adaLN_modulation.1": (128, 64),
    "joint_blocks.0.x_block.attn.qkv": (192, 64), "joint_blocks.0.x_block.attn.proj": (64, 64),
    "joint_blocks.0.x_block.attn2.qkv": (192, 64), "joint_blocks.0.x_block.attn2.proj": (64, 64),
    "joint_blocks.0.x_block.mlp.fc1": (256, 64), "joint_blocks.0.x_block.mlp.fc2": (64, 256),
    "joint_blocks.0.x_block.adaLN_modulation.1": (9 * 64, 64), "final_layer.linear": (64, 64),
    "final_layer.adaLN_modulation.1": (128, 64)}
_SD3_NORMS = [f"joint_blocks.0.{a}.ln_{n}.weight" for a in ("context_block.attn", "x_block.attn", "x_block.attn2")
              for n in ("q", "k")]


def _random_file(path: Path, state: dict) -> Path:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)
    return path


def write_native_sd3(comfy_dir: Path) -> tuple[Path, Path]:
    """An SD3.5 medium-kind diffusion model that ComfyUI's UNETLoader detects (one block, ~0.8 M weights) and a
    16-channel TAESD-format VAE that its VAELoader loads (SD3's tiny autoencoder's layout; random weights), in
    float16, cached in `comfy_dir`/models, built only when missing. Weights scaled by 1/sqrt(fan-in)."""
    unet = comfy_dir / "models" / "diffusion_models" / NATIVE_SD3
    vae = comfy_dir / "models" / "vae" / NATIVE_TAESD3
    g = torch.Generator().manual_seed(6)
    if not unet.is_file():
        unet.parent.mkdir(parents=True, exist_ok=True)
        state = {"pos_embed": torch.randn(1, 96 * 96, _SD3_WIDTH, generator=g) * 0.1,
                 **{k: 1 + 0.1 * torch.randn(64, generator=g) for k in _SD3_NORMS}}
        for name, shape in _SD3_SHAPES.items():
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            state[f"{name}.weight"] = torch.randn(*shape, generator=g) / fan_in ** 0.5
            state[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.02
        _random_file(unet, state)
    if not vae.is_file():
        vae.parent.mkdir(parents=True, exist_ok=True)
        _random_file(vae, _taesd_state(16, g))
    return unet, vae


def _taesd_state(latent: int, g: torch.Generator) -> dict:
    """Random weights in the layout of ComfyUI's TAESD (comfy/taesd/taesd.py: Sequentials of 3x3 convolutions and
    residual blocks of three), which its VAE class recognises by `taesd_decoder.1.weight`."""
    state = {"vae_scale": torch.tensor(1.0), "vae_shift": torch.tensor(0.0)}

    def conv(name, n_in, n_out, bias=True):
        state[f"{name}.weight"] = torch.randn(n_out, n_in, 3, 3, generator=g) / (9 * n_in) ** 0.5
        if bias:
            state[f"{name}.bias"] = torch.zeros(n_out)

    def block(name):
        for i in (0, 2, 4):
            conv(f"{name}.conv.{i}", 64, 64)

    blocks = {"taesd_encoder": [1, 3, 4, 5, 7, 8, 9, 11, 12, 13], "taesd_decoder": [3, 4, 5, 8, 9, 10, 13, 14, 15, 18]}
    for part, indices in blocks.items():
        for i in indices:
            block(f"{part}.{i}")
    conv("taesd_encoder.0", 3, 64)
    for i in (2, 6, 10):
        conv(f"taesd_encoder.{i}", 64, 64, bias=False)
    conv("taesd_encoder.14", 64, latent)
    conv("taesd_decoder.1", latent, 64)
    for i in (7, 12, 17):
        conv(f"taesd_decoder.{i}", 64, 64, bias=False)
    conv("taesd_decoder.19", 64, 3)
    return state
