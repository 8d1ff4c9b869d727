"""HTTP routes of the pack (served by ComfyUI): the layer list the web layer picker shows.

    GET /diffusion_feature/layers?family=sdxl         -> {"family", "size", "layers": [{"id", "shape", "group"}]}
        (families that take reference images also list the first reference's ids, "reference": 0)
    GET /diffusion_feature/family?kind=checkpoints&name=x.safetensors   -> {"family": "sd15"}
        (kind: checkpoints, diffusers, or diffusion_models: a bare denoiser file of ComfyUI's Load Diffusion Model)
    GET /diffusion_feature/status                     -> loaded models and the hooks they carry (all 0 between runs):
                                                         DF_MODELs and the native MODELs our nodes tapped
"""
from __future__ import annotations

from dataclasses import replace

from ..layer_catalog import FAMILIES, format_id, get_family, load_catalog, parse_id
from ..layer_catalog.grammar import DIT_REF_SUFFIXES
from ..layer_catalog.errors import echo
from . import comfy_env


def group_of(layer_id: str) -> str:
    """The picker's group: unet, down-level1, mid, up-level2 ...; transformer blocks (PixArt, Flux) in groups of 4,
    a diffusion transformer's ends (dit-in, dit-embed, dit-out) as 'dit', Z-Image's refiners as 'vit-refiners'."""
    lid = parse_id(layer_id)
    if lid.part in ("unet", "dit"):
        return lid.part
    if lid.part == "refiner":
        return "vit-refiners"
    if lid.stage is None:
        first = lid.block // 4 * 4
        return f"vit-block{first}-{first + 3}"
    return "mid" if lid.stage == "mid" else f"{lid.stage}-level{lid.level}"


def layers_payload(family: str) -> dict:
    catalog = load_catalog(family)
    layers = [{"id": x["id"], "shape": x["shape"], "group": group_of(x["id"])} for x in catalog["layers"]]
    return {"family": family, "size": catalog["size"], "presets": catalog["presets"],
            "layers": layers + (reference_layers(layers) if get_family(family).reference_images else [])}


def reference_layers(layers: list[dict]) -> list[dict]:
    """The first reference image's ids (vit-block{B}-ref0-...), after the catalog's, so a Kontext / Qwen-Image-Edit
    / Flux.2 user can pick them: they are in no catalog (how many references a run has is the run's). Their shape
    is shown as the generated image's at the catalog's size; a run reads each on its reference's own grid."""
    refs = []
    for layer in layers:
        lid = parse_id(layer["id"])
        if lid.part == "block" and lid.stage is None and lid.suffix in DIT_REF_SUFFIXES:
            refs.append({"id": format_id(replace(lid, ref=0)), "shape": layer["shape"], "reference": 0,
                         "group": f"reference image 0: {layer['group']} (on its own grid)"})
    return refs


def family_payload(kind: str, name: str) -> dict:
    from ..engine.checkpoint_files import read_key_shapes
    from ..engine.loading import detect_family, detect_folder_family

    if kind not in ("checkpoints", "diffusers", "diffusion_models"):
        raise ValueError("kind must be checkpoints, diffusers or diffusion_models")
    path = comfy_env.model_path(kind, name)
    family = detect_folder_family(path) if kind == "diffusers" else detect_family(read_key_shapes(path))
    if family not in FAMILIES:
        raise ValueError(f"{echo(name)} looks like {family}")
    return {"family": family}


def status_payload() -> dict:
    from ..layer_catalog import residue
    from ..engine.loading import LIVE_DENOISERS

    from ..native.comfy_model import LIVE_NETWORKS

    models, networks = list(LIVE_DENOISERS), list(LIVE_NETWORKS)
    totals = {"forward_hooks": 0, "forward_pre_hooks": 0}
    for net in models + networks:  # every hook counts, ours or not: between runs, none is ours
        for k, v in residue(net).items():
            totals[k] += v
    return {"models": len(models), "native_models": len(networks), **totals}


def register() -> bool:
    from aiohttp import web

    def answer(build):
        async def handler(request):
            try:
                return web.json_response(build(request.rel_url.query))
            except ValueError as e:  # bad input: the message says what would be valid
                return web.json_response({"error": str(e)}, status=400)
            except Exception:  # a bug of ours: logged here, never a traceback or a path to the client
                comfy_env.log.exception("diffusion_feature: %s failed", request.rel_url.path)
                return web.json_response({"error": "internal error; see the server log"}, status=500)
        return handler

    return comfy_env.register_routes({
        "/diffusion_feature/layers": answer(lambda q: layers_payload(q.get("family", ""))),
        "/diffusion_feature/family": answer(lambda q: family_payload(q.get("kind", ""), q.get("name", ""))),
        "/diffusion_feature/status": answer(lambda q: status_payload()),
    })
