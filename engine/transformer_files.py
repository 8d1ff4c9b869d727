"""Single files holding a diffusion transformer in its original layout (Black Forest Labs' Flux, Stability AI's SD3,
as they and ComfyUI ship them; other parts a file may hold are not read) -> the diffusers model's state dict.

Flux: diffusers' own single-file converter assumes the full-size widths (3072 wide, MLP ratio 4), so a checkpoint of
any other size (distilled, pruned, or the tests' tiny ones) would not load; this conversion takes every width from
the diffusers config the model is built with. SD3: diffusers' converter reads the sizes from the weights, and so does
the config (sd3_config), so SD3 medium, SD3.5 medium and large all load. The state dict is loaded strictly, so a
file that does not fit says so.
"""
from __future__ import annotations

import torch

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's saved checkpoints carry one of these

_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
_DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mod.lin": "norm1.linear",
           "txt_mod.lin": "norm1_context.linear", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def _strip(state: dict) -> dict:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """The final modulation's (shift, scale) in the original, (scale, shift) in diffusers."""
    first, second = x.chunk(2, dim=0)
    return torch.cat([second, first])


def flux_state_dict(state: dict, config) -> dict:
    """A Flux transformer's original-layout weights as FluxTransformer2DModel's state dict for `config`: fused
    qkv (and single blocks' qkv + MLP input) split at the config's width; names without a place are left out, so
    the strict load that follows names them."""
    state = _strip(state)
    width = config.num_attention_heads * config.attention_head_dim
    out: dict = {}

    def linear(src: str, dst: str, convert=lambda x: x) -> None:
        for end in ("weight", "bias"):
            if f"{src}.{end}" in state:
                out[f"{dst}.{end}"] = convert(state[f"{src}.{end}"])

    def split(src: str, dsts, sizes) -> None:
        for end in ("weight", "bias"):
            if f"{src}.{end}" in state:
                for dst, part in zip(dsts, torch.split(state[f"{src}.{end}"], sizes)):
                    out[f"{dst}.{end}"] = part

    def block(a: str, b: str, linears: dict, norms: dict) -> None:
        for src, dst in linears.items():
            linear(f"{a}.{src}", f"{b}.{dst}")
        for src, dst in norms.items():  # RMSNorm scales: `scale` in the original, `weight` in diffusers
            if f"{a}.{src}.scale" in state:
                out[f"{b}.{dst}.weight"] = state[f"{a}.{src}.scale"]

    for src, dst in _TOP.items():
        linear(src, dst)
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", _swap_halves)
    for i in range(config.num_layers):
        a, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        block(a, b, _DOUBLE, _DOUBLE_NORMS)
        for src, dsts in _DOUBLE_QKV.items():
            split(f"{a}.{src}", [f"{b}.{d}" for d in dsts], [width] * 3)
    for i in range(config.num_single_layers):
        a, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        block(a, b, _SINGLE, _SINGLE_NORMS)
        if f"{a}.linear1.weight" in state:
            mlp = state[f"{a}.linear1.weight"].shape[0] - 3 * width
            split(f"{a}.linear1", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"],
                  [width] * 3 + [mlp])
    return out


def sd3_state_dict(state: dict, config) -> dict:
    """SD3 / SD3.5's original layout (Stability AI's and ComfyUI's MMDiT) by diffusers' own converter, which reads
    the depth and widths from the weights themselves (SD3.5 medium's second attention and QK-norm included)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(_strip(state))


def sd3_config(state: dict, config: dict) -> dict:
    """`config` with what SD3 weights say of themselves: depth, widths, patch, position-embedding size, QK-norm and
    SD3.5 medium's second attentions (SD3 medium, SD3.5 medium and large differ in all of them; one shipped config
    cannot serve the three)."""
    state = _strip(state)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("joint_blocks.")}
    patch = state.get("x_embedder.proj.weight")
    if not blocks or patch is None:
        return config  # not SD3 weights: the strict load names what is missing
    hidden = patch.shape[0]
    read = dict(num_layers=max(blocks) + 1, num_attention_heads=hidden // config["attention_head_dim"],
                caption_projection_dim=hidden, in_channels=patch.shape[1], patch_size=patch.shape[-1],
                qk_norm="rms_norm" if any(k.endswith(".attn.ln_q.weight") for k in state) else None,
                dual_attention_layers=sorted({int(k.split(".")[1]) for k in state if ".x_block.attn2." in k}))
    for name, key, axis in (("joint_attention_dim", "context_embedder.weight", 1),
                            ("pooled_projection_dim", "y_embedder.mlp.0.weight", 1)):
        if key in state:
            read[name] = state[key].shape[axis]
    if "final_layer.linear.weight" in state:
        read["out_channels"] = state["final_layer.linear.weight"].shape[0] // patch.shape[-1] ** 2
    if "pos_embed" in state:
        read["pos_embed_max_size"] = round(state["pos_embed"].shape[1] ** 0.5)
    return dict(config, **read)


def same_names(state: dict, config) -> dict:
    """Qwen-Image's single files (ComfyUI's qwen_image_*.safetensors) keep diffusers' own names: only ComfyUI's
    prefix goes."""
    return _strip(state)


# diffusers class -> its original layout's conversion, and what the weights say of the config (default: nothing)
CONVERTERS = {"FluxTransformer2DModel": flux_state_dict, "SD3Transformer2DModel": sd3_state_dict,
              "QwenImageTransformer2DModel": same_names}
CONFIGS = {"SD3Transformer2DModel": sd3_config}


def load_transformer(path, config: dict) -> torch.nn.Module:
    """The diffusers transformer of `config` (a diffusers config with its _class_name) holding the weights of the
    single file at `path` (safetensors, or a pickle read with weights_only=True); built on the meta device and
    given the file's tensors, so no random initialisation runs and the weights are held once."""
    from safetensors.torch import load_file

    from ..layer_catalog.errors import echo
    from ..layer_catalog.families import denoiser_from_config
    from .checkpoint_files import CheckpointError, load_pickle_state_dict

    state = load_file(str(path)) if str(path).endswith(".safetensors") else load_pickle_state_dict(path)
    config = CONFIGS.get(config["_class_name"], lambda _, c: c)(state, config)
    model = denoiser_from_config(config, "meta")
    converted = CONVERTERS[config["_class_name"]](state, model.config)
    missing = sorted(set(model.state_dict()) - set(converted))
    unused = sorted(set(converted) - set(model.state_dict()))
    if missing or unused:
        raise CheckpointError(f"{echo(str(path))} does not fit the {config['_class_name']} of this config: "
                              + "; ".join(f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                                          for what, names in (("missing", missing), ("not expected", unused)) if names))
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()[:300]
        raise CheckpointError(f"{echo(str(path))} does not fit the {config['_class_name']} of this config "
                              f"({first})") from None
    _rebuild_meta_tables(model)
    return model.eval()


def _rebuild_meta_tables(model: torch.nn.Module) -> None:
    """Modules that keep tensors outside the state dict (Qwen-Image's rotary tables: complex, so not buffers) are
    left on the meta device by the meta build: each is built again on the CPU from its own attributes named as its
    constructor's arguments (it holds no weights)."""
    import inspect

    for name, module in list(model.named_modules()):
        if not any(torch.is_tensor(v) and v.is_meta for v in vars(module).values()):
            continue
        params = [p for p in inspect.signature(type(module).__init__).parameters.values() if p.name != "self"]
        args = {p.name: getattr(module, p.name) for p in params if hasattr(module, p.name)}
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, type(module)(**args))
