"""Test helper: write an SD1.x-type diffusers model (UNet, VAE, CLIP text encoder) as an original single-file
(LDM layout) state dict. diffusers ships only the other direction; this lets a test make a tiny checkpoint in the
original layout and check that loading it gives the same model."""
from __future__ import annotations

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict) -> str:
    for old, new in table.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    return key


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    sd, out = unet.state_dict(), {}
    per_level = unet.config.layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for key, value in sd.items():
        parts = key.split(".")
        new = None
        for old, repl in fixed.items():
            if key.startswith(old + "."):
                new = repl + key[len(old):]
        if parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[5:]) if kind == "downsamplers" else ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{level * per_level + int(parts[3]) + 1}.0.{_rename(rest, _RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{level * per_level + int(parts[3]) + 1}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(level + 1) * per_level}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = (f"middle_block.{2 * index}.{_rename(rest, _RESNET)}" if kind == "resnets"
                   else f"middle_block.1.{rest}")
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            block = unet.up_blocks[level]
            if kind == "resnets":
                new = f"output_blocks.{level * per_level + int(parts[3])}.0.{_rename('.'.join(parts[4:]), _RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{level * per_level + int(parts[3])}.1.{'.'.join(parts[4:])}"
            else:  # upsamplers.0.conv.*
                slot = 2 if getattr(block, "attentions", None) else 1
                new = f"output_blocks.{level * per_level + per_level - 1}.{slot}.{'.'.join(parts[4:])}"
        if new is None:
            raise KeyError(f"no LDM name for {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    out = {}
    n_up = len(vae.decoder.up_blocks)
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        else:
            side, rest = parts[0], parts[1:]
            if rest[0] in ("down_blocks", "up_blocks"):
                level = int(rest[1]) if rest[0] == "down_blocks" else n_up - 1 - int(rest[1])
                word = "down" if rest[0] == "down_blocks" else "up"
                if rest[2] == "resnets":
                    new = f"{side}.{word}.{level}.block.{rest[3]}.{_rename('.'.join(rest[4:]), _VAE_RESNET)}"
                else:  # downsamplers / upsamplers .0.conv.*
                    new = f"{side}.{word}.{level}.{'downsample' if word == 'down' else 'upsample'}.{'.'.join(rest[4:])}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    new = f"{side}.mid.block_{int(rest[2]) + 1}.{_rename('.'.join(rest[3:]), _VAE_RESNET)}"
                else:
                    new = f"{side}.mid.attn_1.{_rename('.'.join(rest[3:]), _VAE_ATTN)}"
                    if value.ndim == 2:  # the original stores these projections as 1x1 convolutions
                        value = value[:, :, None, None]
            else:  # conv_in, conv_norm_out -> norm_out, conv_out
                new = f"{side}.{'.'.join(rest).replace('conv_norm_out', 'norm_out')}"
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """The original layout is HF CLIP under cond_stage_model.transformer.text_model. (transformers >= 5.6 dropped
    the text_model. level from CLIPTextModel's own names; put it back)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        out[f"cond_stage_model.transformer.{k}"] = v
    return out


def sd15_single_file_state(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_to_ldm(text_encoder)}
    return {k: v.contiguous().clone() for k, v in state.items()}


def controlnet_to_ldm(controlnet) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel in the original (lllyasviel) single-file layout, under `control_model.`: the
    UNet-encoder part named as unet_to_ldm names it, zero_convs.{i}.0 for the down residual convolutions,
    middle_block_out.0 for the mid one, and input_hint_block with the SiLU slots of the original Sequential
    (conv_in at 0, blocks.j at 2j+2, conv_out last)."""
    from types import SimpleNamespace

    sd = controlnet.state_dict()
    encoder_parts = ("time_embedding", "conv_in", "down_blocks", "mid_block")
    shared = {k: v for k, v in sd.items() if k.split(".")[0] in encoder_parts}
    encoder = SimpleNamespace(state_dict=lambda: shared, config=controlnet.config, up_blocks=[])
    out = {k[len("model.diffusion_model."):]: v for k, v in unet_to_ldm(encoder).items()}
    n_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for key, value in sd.items():
        if key in shared:
            continue
        parts = key.split(".")
        if parts[0] in ("add_embedding", "class_embedding"):
            new = f"label_emb.0.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] == "controlnet_down_blocks":
            new = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[0] == "controlnet_mid_block":
            new = f"middle_block_out.0.{parts[1]}"
        elif parts[0] == "controlnet_cond_embedding":
            slot = {"conv_in": 0, "conv_out": 2 * n_blocks + 2}.get(parts[1])
            if parts[1] == "blocks":
                slot = 2 * int(parts[2]) + 2
            new = f"input_hint_block.{slot}.{parts[-1]}"
        else:
            raise KeyError(f"no LDM name for {key}")
        out[new] = value
    return {f"control_model.{k}": v.contiguous().clone() for k, v in out.items()}
