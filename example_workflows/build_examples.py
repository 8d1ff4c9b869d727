"""Writes the example workflows: each graph once, as an API-format JSON (for POST /prompt), its UI-format twin (for
the browser: drag it onto the canvas) and a .jpg thumbnail of the graph. Run from the repository root:

    python example_workflows/build_examples.py

The graphs are defined here once, so the two formats never drift apart.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "stable-diffusion-xl-base-1.0"


def _link(node: str, slot: int = 0) -> list:
    return [node, slot]


def _extract_graph(loader: dict, pca_layer: str, prefix: str, images: list[str], joint: bool) -> dict:
    g = {"1": loader,
         "2": {"class_type": "DFAttachHooks", "inputs": {"model": _link("1"), "layers": "", "preset": "practical"}},
         "3": {"class_type": "DFEncodePrompt", "inputs": {"model": _link("1"), "text": "a photo", "one_per_line": False}}}
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": images[0]}}
    image = _link("10")
    if len(images) > 1:
        g["11"] = {"class_type": "LoadImage", "inputs": {"image": images[1]}}
        g["12"] = {"class_type": "ImageBatch", "inputs": {"image1": _link("10"), "image2": _link("11")}}
        image = _link("12")
    g["4"] = _extract(_link("2"), image, _link("3"))
    g["5"] = _pca(_link("4"), pca_layer, joint=joint)
    g["6"] = _preview(_link("5"))
    g["7"] = _save(_link("4"), prefix)
    return g


def _loader_ckpt(name: str) -> dict:
    return {"class_type": "DFLoadCheckpoint", "inputs": {"ckpt_name": name, "family": "auto", "dtype": "auto",
                                                         "device": "auto"}}


def _loader_diffusers(name: str) -> dict:
    return {"class_type": "DFLoadDiffusers", "inputs": {"model_path": name, "family": "auto", "dtype": "auto",
                                                        "device": "auto"}}


def _attention_graph() -> dict:
    g = _extract_graph(_loader_ckpt(SD15), "", "diffusion_feature/attention", ["example.png"], True)
    g["2"]["inputs"].update(preset="none", layers="up-level2-repeat1-vit-block0-cross-map\n"
                                                  "up-level3-repeat0-vit-block0-self-map")
    del g["5"], g["6"]
    g["5"] = {"class_type": "DFAttentionMap", "inputs": {"features": _link("4"), "layer":
                                                          "up-level2-repeat1-vit-block0-cross-map", "token_index": 2,
                                                          "query_x": 0.5, "query_y": 0.5, "image": _link("10")}}
    g["6"] = {"class_type": "PreviewImage", "inputs": {"images": _link("5")}}
    g["8"] = {"class_type": "DFAttentionMap", "inputs": {"features": _link("4"), "layer":
                                                          "up-level3-repeat0-vit-block0-self-map", "token_index": 0,
                                                          "query_x": 0.3, "query_y": 0.6, "image": _link("10")}}
    g["9"] = {"class_type": "PreviewImage", "inputs": {"images": _link("8")}}
    return g


CANNY_CONTROLNET = "control_v11p_sd15_canny.pth"
LORA = "example_lora.safetensors"
TIMELINE_LAYER = "up-level1-repeat1-res-out"


def _hooks(model: list, layers: str = "", preset: str = "practical") -> dict:
    return {"class_type": "DFAttachHooks", "inputs": {"model": model, "layers": layers, "preset": preset}}


def _prompt(model: list, text: str) -> dict:
    return {"class_type": "DFEncodePrompt", "inputs": {"model": model, "text": text, "one_per_line": False}}


def _extract(model: list, image: list, cond: list, denoise_from: int = 0) -> dict:
    return {"class_type": "DFExtractFeatures", "inputs": {
        "model": model, "image": image, "conditioning": cond, "t": 50, "seed": 0, "resize": "keep-aspect",
        "ensemble": 1, "feature_resize": 1, "offload": True, "batch_size": 4, "denoise_from": denoise_from,
        "denoise_steps": 1}}


def _pca(features: list, layer: str = "", **more) -> dict:
    return {"class_type": "DFFeaturePCA", "inputs": {"features": features, "layer": layer, "joint": True,
                                                      "foreground_threshold": 0.0, "size": "image", **more}}


def _save(features: list, prefix: str) -> dict:
    return {"class_type": "DFSaveFeatures", "inputs": {"features": features, "filename_prefix": prefix,
                                                        "format": "safetensors", "layout": "per-sample"}}


def _preview(images: list) -> dict:
    return {"class_type": "PreviewImage", "inputs": {"images": images}}


def _canny_control(g: dict, cond: list, image: list) -> list:
    """Canny edges of the image -> a ControlNet hint attached to `cond` (nodes 11-14). Returns the conditioning."""
    g["11"] = {"class_type": "Canny", "inputs": {"image": image, "low_threshold": 0.4, "high_threshold": 0.8}}
    g["12"] = {"class_type": "DFLoadControlNet", "inputs": {"control_net_name": CANNY_CONTROLNET, "dtype": "auto",
                                                             "family": "auto"}}
    g["13"] = {"class_type": "DFApplyControlNet", "inputs": {"conditioning": cond, "controlnet": _link("12"),
                                                              "image": _link("11"), "strength": 1.0, "start": 0.0,
                                                              "end": 1.0}}
    g["14"] = _preview(_link("11"))
    return _link("13")


def _lora(model: list) -> dict:
    return {"class_type": "DFLoadLoRA", "inputs": {"model": model, "lora_name": LORA, "strength_model": 1.0,
                                                    "strength_clip": 1.0}}


def _generate_graph() -> dict:
    g = {"1": _loader_ckpt(SD15), "2": _hooks(_link("1"), TIMELINE_LAYER, "none"),
         "3": _prompt(_link("1"), "a photo of a red house by a lake"), "4": _prompt(_link("1"), "blurry, low quality")}
    g["5"] = {"class_type": "DFGenerate", "inputs": {
        "model": _link("2"), "positive": _link("3"), "negative": _link("4"), "seed": 0, "steps": 20, "cfg": 7.0,
        "scheduler": "euler", "width": 0, "height": 0, "batch_size": 1, "capture_steps": "every 4",
        "capture_branch": "cond", "denoise": 1.0, "offload": True}}
    g["6"] = _preview(_link("5"))
    g["7"] = _pca(_link("5", 1))
    g["8"] = _preview(_link("7"))
    g["9"] = _save(_link("5", 1), "diffusion_feature/timeline")
    return g


def _controlnet_graph() -> dict:
    g = {"1": _loader_ckpt(SD15), "2": _hooks(_link("1")), "3": _prompt(_link("1"), "a photo"),
         "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
    cond = _canny_control(g, _link("3"), _link("10"))
    g["4"] = _extract(_link("2"), _link("10"), cond, denoise_from=60)
    g["5"] = _pca(_link("4"), "up-level1-repeat2-res-out")
    g["6"] = _preview(_link("5"))
    g["7"] = _save(_link("4"), "diffusion_feature/controlnet")
    return g


def _lora_graph() -> dict:
    g = {"1": _loader_ckpt(SD15), "15": _lora(_link("1")), "10": {"class_type": "LoadImage",
                                                                    "inputs": {"image": "example.png"}}}
    g["2"] = _hooks(_link("15"))
    g["3"] = _prompt(_link("15"), "a photo")
    g["4"] = _extract(_link("2"), _link("10"), _link("3"))
    g["5"] = _pca(_link("4"), "up-level1-repeat2-res-out")
    g["6"] = _preview(_link("5"))
    g["7"] = _save(_link("4"), "diffusion_feature/lora")
    return g


def _content_shift_graph() -> dict:
    """One image, four ways of suppressing content shift, one joint PCA: plain prompt | fine-grained prompt |
    ControlNet canny from t=60 | LoRA."""
    g = {"1": _loader_ckpt(SD15), "2": _hooks(_link("1"), TIMELINE_LAYER, "none"),
         "3": _prompt(_link("1"), "a photo"),
         "20": _prompt(_link("1"), "a photo of a small red-brick house with a white door and two windows, a green "
                                   "lawn in front, under a clear blue sky"),
         "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
    g["4"] = _extract(_link("2"), _link("10"), _link("3"))
    g["21"] = _extract(_link("2"), _link("10"), _link("20"))
    g["22"] = _extract(_link("2"), _link("10"), _canny_control(g, _link("3"), _link("10")), denoise_from=60)
    g["15"] = _lora(_link("1"))
    g["16"] = _hooks(_link("15"), TIMELINE_LAYER, "none")
    g["17"] = _prompt(_link("15"), "a photo")
    g["23"] = _extract(_link("16"), _link("10"), _link("17"))
    g["5"] = _pca(_link("4"), TIMELINE_LAYER, features_2=_link("21"), features_3=_link("22"),
                  features_4=_link("23"))
    g["6"] = _preview(_link("5"))
    return g


def _invert(model: list, image: list, check: bool, capture: str) -> dict:
    return {"class_type": "DFInvert", "inputs": {"model": model, "image": image, "prompt": "", "steps": 50,
                                                  "resize": "keep-aspect", "check_reconstruction": check,
                                                  "capture_steps": capture}}


def _pnp_graph() -> dict:
    g = {"1": _loader_ckpt(SD15), "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
         "30": _invert(_link("1"), _link("10"), True, "")}
    g["31"] = {"class_type": "DFPnPTranslate", "inputs": {
        "model": _link("1"), "inversion": _link("30"), "prompts": "a watercolor painting\na photo in deep winter",
        "cfg": 7.5, "feature_threshold": 0.8, "attention_threshold": 0.5, "seed": 0, "eta": 0.0, "feature_layers": "",
        "attention_layers": "", "negative_prompt": "", "negative_alpha": 1.0, "negative_schedule": "linear",
        "capture_steps": "", "capture_branch": "cond"}}
    g["32"] = _preview(_link("31"))
    g["33"] = _preview(_link("30", 1))
    return g


def _inversion_timeline_graph() -> dict:
    self_map = "up-level2-repeat1-vit-block0-self-map"
    g = {"1": _loader_ckpt(SD15), "2": _hooks(_link("1"), f"up-level1-repeat1-res-increment\n{self_map}", "none"),
         "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
         "30": _invert(_link("2"), _link("10"), False, "every 10")}
    g["5"] = _pca(_link("30", 2), "up-level1-repeat1-res-increment")
    g["6"] = _preview(_link("5"))
    g["8"] = {"class_type": "DFSelfAttentionPCA", "inputs": {"features": _link("30", 2), "layer": self_map,
                                                              "joint": True, "size": "image"}}
    g["9"] = _preview(_link("8"))
    g["7"] = _save(_link("30", 2), "diffusion_feature/inversion")
    return g


# ---- the native path: ComfyUI's own Load Checkpoint, samplers, ControlNet and LoRA nodes + ours ----------------
NATIVE_LAYERS = "up-level1-repeat1-res-out\nup-level2-repeat1-vit-block0-cross-q"


def _checkpoint(name: str = SD15) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def _clip_text(clip: list, text: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": clip}}


def _extract_native(model: list, vae: list, positive: list, image: list, layers: str = "", denoise_from: int = 0
                    ) -> dict:
    return {"class_type": "DFExtractNative", "inputs": {
        "model": model, "vae": vae, "positive": positive, "image": image, "t": 50, "seed": 0, "layers": layers,
        "preset": "none" if layers else "practical", "resize": "keep-aspect", "ensemble": 1, "feature_resize": 1,
        "offload": True, "batch_size": 4, "denoise_from": denoise_from, "denoise_steps": 1, "guidance": 3.5,
        "shift": False}}


def _capture_timeline(g: dict, first: int, model: list, positive: list, negative: list, latent: list, layer: str,
                      cfg: float, scheduler: str, prefix: str) -> dict:
    """Adds DFCaptureLayers (node `first`) -> KSampler -> DFCollectFeatures -> joint PCA -> preview, and the save
    (nodes first+1 .. first+5) to `g`: the capture-timeline tail both native timeline examples share."""
    capture, sampler, collect, pca, preview, save = (str(first + i) for i in range(6))
    g[capture] = {"class_type": "DFCaptureLayers", "inputs": {"model": model, "layers": layer, "preset": "none",
                                                              "capture_steps": "every 4", "branch": "cond"}}
    g[sampler] = {"class_type": "KSampler", "inputs": {
        "model": _link(capture), "seed": 0, "steps": 20, "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler,
        "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}}
    g[collect] = {"class_type": "DFCollectFeatures", "inputs": {"capture": _link(capture, 1), "latent": _link(sampler)}}
    g[pca] = _pca(_link(collect), layer)
    g[preview] = _preview(_link(pca))
    g[save] = _save(_link(collect), prefix)
    return g


def _native_timeline_graph() -> dict:
    """Load Checkpoint -> DFCaptureLayers -> KSampler -> DFCollectFeatures -> one joint PCA over the timeline."""
    g = {"1": _checkpoint(), "2": _clip_text(_link("1", 1), "a photo of a red house by a lake"),
         "3": _clip_text(_link("1", 1), "blurry, low quality"),
         "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}}}
    _capture_timeline(g, 5, _link("1"), _link("2"), _link("3"), _link("4"), TIMELINE_LAYER, 7.0, "normal",
                      "diffusion_feature/native_timeline")
    g["11"] = {"class_type": "VAEDecode", "inputs": {"samples": _link("6"), "vae": _link("1", 2)}}
    g["12"] = _preview(_link("11"))
    return g


FLUX_DEV = "flux1-dev.safetensors"
FLUX_TIMELINE_LAYER = "vit-block28-in"  # DiTF's layer: the tenth single-stream block's input


def _native_flux_timeline_graph() -> dict:
    """Load Diffusion Model (Flux dev) -> DFCaptureLayers -> KSampler at cfg 1 (Flux dev's guidance comes from
    FluxGuidance, its negative prompt is never called) -> DFCollectFeatures -> one joint PCA over the timeline."""
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_DEV, "weight_dtype": "default"}},
         "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                          "device": "default"}},
         "3": _clip_text(_link("2"), "a photo of a red house by a lake"),
         "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": _link("3"), "guidance": 3.5}},
         "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}}}
    return _capture_timeline(g, 6, _link("1"), _link("4"), _link("4"), _link("5"), FLUX_TIMELINE_LAYER, 1.0,
                             "simple", "diffusion_feature/flux_timeline")


Z_IMAGE_TURBO = "z_image_turbo_bf16.safetensors"
Z_IMAGE_TIMELINE_LAYER = "vit-block14-out"  # the middle of Z-Image's 30 joint layers


def _native_z_image_timeline_graph() -> dict:
    """Z-Image Turbo's usual recipe (ComfyUI's template: Load Diffusion Model, CLIPLoader qwen_3_4b of type lumina2,
    Load VAE ae, ModelSamplingAuraFlow shift 3, KSampler 8 steps at cfg 1, so the negative prompt is never called)
    with DFCaptureLayers -> DFCollectFeatures -> one joint PCA over the timeline, and the decoded image."""
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": Z_IMAGE_TURBO, "weight_dtype": "default"}},
         "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2",
                                                      "device": "default"}},
         "3": _clip_text(_link("2"), "a photo of a red house by a lake"),
         "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": _link("1"), "shift": 3.0}},
         "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}}
    _capture_timeline(g, 6, _link("4"), _link("3"), _link("3"), _link("5"), Z_IMAGE_TIMELINE_LAYER, 1.0,
                      "simple", "diffusion_feature/z_image_timeline")
    g["7"]["inputs"].update(steps=8, sampler_name="res_multistep")
    g["12"] = {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}
    g["13"] = {"class_type": "VAEDecode", "inputs": {"samples": _link("7"), "vae": _link("12")}}
    g["14"] = _preview(_link("13"))
    return g


SD35_MEDIUM = "sd3.5_medium.safetensors"
SD35_CROSS_LAYER = "vit-block12-cross-map"  # mid-depth of SD3.5 medium's 24 joint blocks
SD35_TOKEN = 6  # "house": CLIP's start token is 0, "a photo of a red house" follows from 1


def _cross_map_graph(unet: str, text_encoder: dict, vae: str, layer: str, token: int) -> dict:
    """Load Diffusion Model + a text-encoder loader + VAELoader -> DFExtractNative (t = 500: sigma 0.5) ->
    DFAttentionMap: where the image attends to one prompt token, over the image."""
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
         "2": text_encoder, "3": _clip_text(_link("2"), "a photo of a red house by a lake"),
         "4": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
         "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
    g["5"] = _extract_native(_link("1"), _link("4"), _link("3"), _link("10"), layer)
    g["5"]["inputs"]["t"] = 500
    g["6"] = {"class_type": "DFAttentionMap", "inputs": {"features": _link("5"), "layer": layer,
                                                          "token_index": token, "query_x": 0.5, "query_y": 0.5,
                                                          "image": _link("10")}}
    g["7"] = _preview(_link("6"))
    return g


def _native_sd35_cross_map_graph() -> dict:
    """SD3.5 medium with TripleCLIPLoader (SD3 has no guidance input)."""
    clips = {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "clip_g.safetensors",
                                                          "clip_name3": "t5xxl_fp16.safetensors"}}
    return _cross_map_graph(SD35_MEDIUM, clips, "sd3.5_vae.safetensors", SD35_CROSS_LAYER, SD35_TOKEN)


QWEN_IMAGE = "qwen_image_fp8_e4m3fn.safetensors"
QWEN_CROSS_LAYER = "vit-block29-cross-map"  # the middle of Qwen-Image's 60 blocks
QWEN_TOKEN = 5  # " house": ComfyUI's Qwen-Image encoder drops its template's prefix, "a photo of a red" are 0-4


def _native_qwen_image_cross_map_graph() -> dict:
    """Qwen-Image with CLIPLoader (Qwen2.5-VL 7B, type qwen_image) and its VAE (no guidance input)."""
    clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                   "type": "qwen_image", "device": "default"}}
    return _cross_map_graph(QWEN_IMAGE, clip, "qwen_image_vae.safetensors", QWEN_CROSS_LAYER, QWEN_TOKEN)


def _native_controlnet_graph() -> dict:
    """The content-shift recipe natively: Canny -> Apply ControlNet (Advanced) -> DFExtractNative 60 -> 50."""
    g = {"1": _checkpoint(), "2": _clip_text(_link("1", 1), "a photo"), "3": _clip_text(_link("1", 1), ""),
         "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
         "11": {"class_type": "Canny", "inputs": {"image": _link("10"), "low_threshold": 0.4,
                                                  "high_threshold": 0.8}},
         "12": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CANNY_CONTROLNET}}}
    g["13"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": _link("2"), "negative": _link("3"), "control_net": _link("12"), "image": _link("11"),
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    g["4"] = _extract_native(_link("1"), _link("1", 2), _link("13"), _link("10"), NATIVE_LAYERS, denoise_from=60)
    g["5"] = _pca(_link("4"), "up-level1-repeat1-res-out")
    g["6"] = _preview(_link("5"))
    g["7"] = _save(_link("4"), "diffusion_feature/native_controlnet")
    g["14"] = _preview(_link("11"))
    return g


def _native_lora_graph() -> dict:
    """LoraLoader on ComfyUI's own MODEL and CLIP -> DFExtractNative."""
    g = {"1": _checkpoint(), "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
         "15": {"class_type": "LoraLoader", "inputs": {"model": _link("1"), "clip": _link("1", 1), "lora_name": LORA,
                                                       "strength_model": 1.0, "strength_clip": 1.0}}}
    g["2"] = _clip_text(_link("15", 1), "a photo")
    g["4"] = _extract_native(_link("15"), _link("1", 2), _link("2"), _link("10"), NATIVE_LAYERS)
    g["5"] = _pca(_link("4"), "up-level1-repeat1-res-out")
    g["6"] = _preview(_link("5"))
    g["7"] = _save(_link("4"), "diffusion_feature/native_lora")
    return g


def _match_tail(g: dict, model: list, vae: list, positive: list) -> dict:
    """Adds the two images, DFExtractNative on each (nodes 4, 5), DFMatchPoints and DFSimilarityMap with their
    previews (6 to 9) to `g`: the correspondence tail the native match examples share."""
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    g["11"] = {"class_type": "LoadImage", "inputs": {"image": "example2.png"}}
    g["4"] = _extract_native(model, vae, positive, _link("10"))
    g["5"] = _extract_native(model, vae, positive, _link("11"))
    g["6"] = {"class_type": "DFMatchPoints", "inputs": {
        "features_a": _link("4"), "features_b": _link("5"), "image_a": _link("10"), "image_b": _link("11"),
        "points": "128,160; 256,256; 384,200", "layers": "", "window": 0}}
    g["7"] = _preview(_link("6"))
    g["8"] = {"class_type": "DFSimilarityMap", "inputs": {
        "features_a": _link("4"), "features_b": _link("5"), "x": 256.0, "y": 256.0, "layers": "",
        "image_b": _link("11")}}
    g["9"] = _preview(_link("8"))
    return g


def _native_match_graph() -> dict:
    """Load Checkpoint -> DFExtractNative on two images -> DFMatchPoints (lines between the matches) and
    DFSimilarityMap (where B resembles one point of A)."""
    g = {"1": _checkpoint(), "2": _clip_text(_link("1", 1), "a photo")}
    return _match_tail(g, _link("1"), _link("1", 2), _link("2"))


def _native_flux_match_graph() -> dict:
    """The same correspondence on Flux dev from Load Diffusion Model, with DiTF's feature (the ditf preset: the
    tenth single block's input, massive-activation channels suppressed, the block's own modulation)."""
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_DEV, "weight_dtype": "default"}},
         "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                          "device": "default"}},
         "3": _clip_text(_link("2"), "a photo"),
         "12": {"class_type": "FluxGuidance", "inputs": {"conditioning": _link("3"), "guidance": 3.5}},
         "13": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}}
    g = _match_tail(g, _link("1"), _link("13"), _link("12"))
    for node in ("4", "5"):
        g[node]["inputs"]["preset"] = "ditf"
    return g


EXAMPLES = {
    "sd15_extract_pca_save": ("SD1.5: practical preset -> PCA -> save",
                              _extract_graph(_loader_ckpt(SD15), "up-level1-repeat2-res-out",
                                             "diffusion_feature/sd15", ["example.png"], True)),
    "sdxl_extract_pca_save": ("SDXL: practical preset -> PCA -> save",
                              _extract_graph(_loader_diffusers(SDXL), "up-level1-repeat0-vit-block0-out",
                                             "diffusion_feature/sdxl", ["example.png"], True)),
    "attention_maps": ("SD1.5: a cross-attention and a self-attention map", _attention_graph()),
    "batch_joint_pca": ("SD1.5: two images, one joint PCA (comparable colours)",
                        _extract_graph(_loader_ckpt(SD15), "up-level1-repeat2-res-out", "diffusion_feature/batch",
                                       ["example.png", "example2.png"], True)),
    "generate_capture_timeline": ("SD1.5: generate, capture every 4th step, timeline PCA", _generate_graph()),
    "controlnet_canny_denoise_from": ("SD1.5: ControlNet canny, denoise from t=60 to 50, extract",
                                      _controlnet_graph()),
    "extract_with_lora": ("SD1.5: a LoRA on the model and its text encoder, then extract", _lora_graph()),
    "content_shift_comparison": ("Content shift: plain | fine-grained prompt | ControlNet | LoRA, one joint PCA",
                                 _content_shift_graph()),
    "pnp_translate": ("Plug-and-Play: real image -> DDIM inversion -> two target prompts", _pnp_graph()),
    "inversion_timeline_pca": ("An inversion's timeline: residual-feature PCA and self-attention PCA per step",
                               _inversion_timeline_graph()),
    "native_ksampler_capture_timeline": ("Native: Load Checkpoint -> capture during KSampler -> timeline PCA + save",
                                         _native_timeline_graph()),
    "native_content_shift_controlnet": ("Native: Canny + Apply ControlNet -> extract, denoise from t=60 to 50",
                                        _native_controlnet_graph()),
    "native_lora_extract": ("Native: LoraLoader -> extract", _native_lora_graph()),
    "native_match_points": ("Native: two images -> DFMatchPoints and DFSimilarityMap (correspondence)",
                            _native_match_graph()),
    "native_flux_capture_timeline": ("Native Flux: capture during KSampler -> joint PCA timeline",
                                     _native_flux_timeline_graph()),
    "native_z_image_capture_timeline": ("Native Z-Image Turbo: 8-step cfg-1 KSampler capture -> joint PCA timeline",
                                        _native_z_image_timeline_graph()),
    "native_qwen_image_cross_map": ("Native Qwen-Image: DFExtractNative -> cross-map over the image for one token",
                                    _native_qwen_image_cross_map_graph()),
    "native_sd35_cross_map": ("Native SD3.5: DFExtractNative -> cross-map over the image for one token",
                              _native_sd35_cross_map_graph()),
    "native_flux_match_points": ("Native Flux: DiTF features of two images -> DFMatchPoints and DFSimilarityMap",
                                 _native_flux_match_graph()),
}

# ---- UI format ------------------------------------------------------------------------------------------------
CORE = {  # ComfyUI core nodes used here: (widget inputs in order, outputs, linked inputs in order with types)
    "LoadImage": (["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")], []),
    "ImageBatch": ([], [("IMAGE", "IMAGE")], [("image1", "IMAGE"), ("image2", "IMAGE")]),
    "Canny": (["low_threshold", "high_threshold"], [("IMAGE", "IMAGE")], [("image", "IMAGE")]),
    "PreviewImage": ([], [], [("images", "IMAGE")]),
    "CheckpointLoaderSimple": (["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], []),
    "CLIPTextEncode": (["text"], [("CONDITIONING", "CONDITIONING")], [("clip", "CLIP")]),
    "EmptyLatentImage": (["width", "height", "batch_size"], [("LATENT", "LATENT")], []),
    "KSampler": (["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")],
                 [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")]),
    "VAEDecode": ([], [("IMAGE", "IMAGE")], [("samples", "LATENT"), ("vae", "VAE")]),
    "ControlNetLoader": (["control_net_name"], [("CONTROL_NET", "CONTROL_NET")], []),
    "ControlNetApplyAdvanced": (["strength", "start_percent", "end_percent"],
                                [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                                [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("control_net", "CONTROL_NET"), ("image", "IMAGE")]),
    "LoraLoader": (["lora_name", "strength_model", "strength_clip"], [("MODEL", "MODEL"), ("CLIP", "CLIP")],
                   [("model", "MODEL"), ("clip", "CLIP")]),
    "UNETLoader": (["unet_name", "weight_dtype"], [("MODEL", "MODEL")], []),
    "DualCLIPLoader": (["clip_name1", "clip_name2", "type", "device"], [("CLIP", "CLIP")], []),
    "FluxGuidance": (["guidance"], [("CONDITIONING", "CONDITIONING")], [("conditioning", "CONDITIONING")]),
    "EmptySD3LatentImage": (["width", "height", "batch_size"], [("LATENT", "LATENT")], []),
    "TripleCLIPLoader": (["clip_name1", "clip_name2", "clip_name3"], [("CLIP", "CLIP")], []),
    "VAELoader": (["vae_name"], [("VAE", "VAE")], []),
    "CLIPLoader": (["clip_name", "type", "device"], [("CLIP", "CLIP")], []),
    "ModelSamplingAuraFlow": (["shift"], [("MODEL", "MODEL")], [("model", "MODEL")]),
}


def _node_spec(class_type: str):
    """(ordered input (name, type) pairs, outputs) of a node class."""
    if class_type in CORE:
        return None, CORE[class_type][1]
    from diffusion_feature import NODE_CLASS_MAPPINGS

    cls = NODE_CLASS_MAPPINGS[class_type]
    spec = cls.INPUT_TYPES()
    inputs = [(n, t[0] if isinstance(t[0], str) else "COMBO")
              for group in ("required", "optional") for n, t in spec.get(group, {}).items()]
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    return inputs, list(zip(names, cls.RETURN_TYPES))


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _layout(graph: dict) -> dict[str, tuple[int, int]]:
    """Columns by depth in the graph, rows in order."""
    depth: dict[str, int] = {}

    def d(nid):
        if nid not in depth:
            links = [v[0] for v in graph[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(x) for x in links), default=-1)
        return depth[nid]

    rows: dict[int, int] = {}
    pos = {}
    for nid in sorted(graph, key=int):
        col = d(nid)
        pos[nid] = (40 + col * 340, 40 + rows.get(col, 0) * 260)
        rows[col] = rows.get(col, 0) + 1
    return pos


def to_ui(graph: dict) -> dict:
    pos = _layout(graph)
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in sorted(graph, key=int):
        for name, value in graph[nid]["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), name, None])
                out_links.setdefault((value[0], value[1]), []).append(len(links))
    for nid in sorted(graph, key=int):
        node = graph[nid]
        ordered, outputs = _node_spec(node["class_type"])
        inputs, widgets = [], []
        if ordered is None:  # a core node
            widget_names, _, ordered = CORE[node["class_type"]]
            for n in widget_names:
                widgets.append(node["inputs"].get(n, "image"))
                if n == "seed":
                    widgets.append("fixed")  # the frontend's control_after_generate widget
        for name, typ in ordered:
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link = next(lk for lk in links if lk[3] == int(nid) and lk[4] == name)
                inputs.append({"name": name, "type": typ, "link": link[0]})
            elif typ in WIDGET_TYPES and node["class_type"] not in CORE:
                widgets.append(value)
                if name == "seed":
                    widgets.append("fixed")  # the frontend's control_after_generate widget
        for lk in links:
            if lk[3] == int(nid):
                lk[4] = next(i for i, x in enumerate(inputs) if x["link"] == lk[0])
                lk[5] = inputs[lk[4]]["type"]
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": list(pos[nid]), "size": [300, 200], "flags": {},
            "order": int(nid), "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    return {"last_node_id": max(int(n) for n in graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def thumbnail(graph: dict, title: str, path: Path) -> None:
    pos = _layout(graph)
    width = max(x for x, _ in pos.values()) + 340
    height = max(y for _, y in pos.values()) + 200
    scale = 640 / width
    im = Image.new("RGB", (640, max(200, int(height * scale) + 30)), (32, 34, 38))
    draw = ImageDraw.Draw(im)
    draw.text((10, 6), title, fill=(230, 230, 230))
    box = lambda nid: [c * scale for c in (pos[nid][0], pos[nid][1] + 30, pos[nid][0] + 280, pos[nid][1] + 170)]  # noqa
    for nid, node in graph.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                a, b = box(value[0]), box(nid)
                draw.line([(a[2], (a[1] + a[3]) / 2 + 15 * scale), (b[0], (b[1] + b[3]) / 2 + 15 * scale)],
                          fill=(120, 160, 220), width=2)
    for nid, node in graph.items():
        x0, y0, x1, y1 = box(nid)
        ours = node["class_type"].startswith("DF")
        draw.rounded_rectangle([x0, y0 + 15 * scale, x1, y1 + 15 * scale], radius=4,
                               fill=(58, 74, 96) if ours else (70, 70, 70), outline=(150, 150, 150))
        draw.text((x0 + 4, y0 + 15 * scale + 4), node["class_type"], fill=(240, 240, 240))
    im.save(path, quality=85)


def main() -> None:
    for name, (title, graph) in EXAMPLES.items():
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(graph), indent=1) + "\n")
        (HERE / f"{name}.api.json").write_text(json.dumps(graph, indent=1) + "\n")
        thumbnail(graph, title, HERE / f"{name}.jpg")
        print(f"wrote {name}.json, {name}.api.json, {name}.jpg")


if __name__ == "__main__":
    main()
