"""DFAttachHooks (choose the taps) and DFShowLayers (list every id of a model with its shape)."""
from __future__ import annotations

from ..layer_catalog import PRESET_NAMES, LayerIdError, resolve_taps
from ..layer_catalog.catalog import parse_size, reference_ids_note
from ..engine.dit_transforms import DITF, kept_request
from ..layer_catalog.families import family_names, spoken
from ..layer_catalog.resolver import names_preset
from .comfy_env import AnyOfTypes


PRESET_TIP = ("Add a preset: practical (the paper's choice), legacy (block outputs), full (every id: large); "
              f"ditf ({spoken(family_names(lambda f: DITF in f.presets))} only): DiTF's feature, the block input with "
              "its massive-activation channels zeroed, then the block's AdaLN modulation (also applied to any other "
              "vit-block{B}-in listed).")
# The presets' widget: every family's, plus the family-own ditf (other families refuse it by name).
PRESET_CHOICES = ["none", *PRESET_NAMES, DITF]


def parse_layer_text(layers: str, preset: str, required: bool = True) -> list[str]:
    """The widget text (ids separated by commas or new lines) plus an optional preset, as one spec. JSON pasted
    into the field is refused by name: split at commas it would only give ids that do not exist. required: an
    empty choice is an error (DFExtractNative may take its layers from DFCaptureLayers instead)."""
    opening = layers.lstrip()[:1]
    if opening in ("{", "["):
        what = 'a JSON object ({"id": true, ...})' if opening == "{" else "a JSON list"
        raise LayerIdError(f"the layers field does not accept {what}: type the ids one per line or comma "
                           "separated, or save the JSON as a .json file in ComfyUI's input folder and type its name")
    items = [preset] if preset and preset != "none" else []
    items += [s for s in layers.replace(",", "\n").splitlines() if s.strip()]
    if required and not items:
        raise ValueError("no layers chosen: type layer ids or pick a preset")
    return [s.strip() for s in items]


class DFAttachHooks:
    DESCRIPTION = ("Choose the layers to capture. Returns a cheap clone of the model carrying the choice; the input "
                   "model is not changed. Unknown ids are an error naming the nearest valid ids.")
    CATEGORY = "diffusion_feature/extract"
    RETURN_TYPES = ("DF_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "attach"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DF_MODEL", {"tooltip": "The model to capture from."}),
            "layers": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "Layer ids, one per line or comma separated, e.g. "
                                             "up-level1-repeat1-vit-block0-cross-q. The layer picker fills this."}),
            "preset": (PRESET_CHOICES, {"default": "practical", "tooltip": PRESET_TIP}),
        }}

    def attach(self, model, layers, preset="none"):
        spec = parse_layer_text(layers, preset)
        taps = resolve_taps(spec, model.denoiser, model.family)
        return (model.clone(layers=kept_request([t.id for t in taps], names_preset(spec, DITF))),)


class DFShowLayers:
    DESCRIPTION = ("List every layer id of the model with its per-sample shape at the given size (no weights used). "
                   "Takes a DF_MODEL or ComfyUI's own MODEL (from Load Checkpoint, DFCaptureLayers, LoraLoader...): "
                   "a native MODEL is described from its own module tree, so a checkpoint of another depth shows "
                   "its own ids.")
    CATEGORY = "diffusion_feature/extract"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (AnyOfTypes("DF_MODEL", "MODEL"), {"tooltip": "The model to describe: a DF_MODEL or ComfyUI's "
                                                                   "MODEL."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 64, "tooltip": "Image width."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 64, "tooltip": "Image height."}),
        }}

    def show(self, model, width=512, height=512):
        if hasattr(model, "show_layers"):  # a DF_MODEL
            family = model.family
            shapes = model.show_layers(parse_size((height, width)))
        else:  # ComfyUI's MODEL: unsupported architectures get the native backend's one-sentence error
            from ..native.comfy_model import model_layer_shapes, native_family

            height, width = parse_size((height, width))
            family = native_family(model) or "UNet without a catalog of ours"
            shapes = model_layer_shapes(model, height, width)
        lines = [f"# {family}: {len(shapes)} layer ids at {width}x{height}"]
        lines += [f"{k}  {' x '.join(map(str, v))}" for k, v in shapes.items()]
        note = reference_ids_note(family)
        lines += [note] if note else []
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (text,)}
