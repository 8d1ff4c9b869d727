"""DFSaveFeatures (into ComfyUI's output folder) and DFLoadFeatures."""
from __future__ import annotations

import itertools

from . import comfy_env
from ..engine.features_io import FORMATS, LAYOUTS, load_features, row_label, save_features
from ..engine.output_paths import sample_names
from ..engine.safe_paths import UnsafePathError, inside
from ..layer_catalog.errors import echo


class DFSaveFeatures:
    DESCRIPTION = ("Save features in ComfyUI's output folder: one .safetensors per image by default (every layer + "
                   "metadata), or .npy in the reference project's layouts. Files are never overwritten.")
    CATEGORY = "diffusion_feature/io"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "features": ("DF_FEATURES", {"tooltip": "The features to save."}),
            "filename_prefix": ("STRING", {"default": "diffusion_feature/features",
                                           "tooltip": "Inside the output folder; 'a/b/name' makes subfolders. "
                                                      "A counter is appended: name_00001_.safetensors."}),
            "format": (list(FORMATS), {"default": "safetensors", "tooltip": "safetensors keeps dtype and metadata."}),
            "layout": (list(LAYOUTS), {"default": "per-sample",
                                       "tooltip": "per-sample: a file (or folder) per image; per-layer: a folder "
                                                  "per layer; aggregate: spatial layers resized and concatenated."}),
        }}

    def save(self, features, filename_prefix, format="safetensors", layout="per-sample"):
        root = comfy_env.output_dir()
        if not features.tensors:
            raise ValueError("these features are empty: nothing was captured (attach layers with DFAttachHooks; "
                             "for DFGenerate also set capture_steps)")
        folder, names, subfolder = sample_names(filename_prefix, root, features.batch)
        names = [name + row_label(features, i) for i, name in enumerate(names)]
        written = save_features(features, folder, names, fmt=format, layout=layout)
        entries = [{"filename": str(p.relative_to(folder)), "subfolder": subfolder, "type": "output"}
                   for p in written]
        return {"ui": {"features": entries}}


class DFLoadFeatures:
    DESCRIPTION = "Load features saved by DFSaveFeatures (a .safetensors file in the output folder)."
    CATEGORY = "diffusion_feature/io"
    RETURN_TYPES = ("DF_FEATURES",)
    RETURN_NAMES = ("features",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        root = comfy_env.output_dir()
        # the tooltip lists a few saved files; a bounded walk keeps object_info fast in a huge output folder
        found = itertools.islice(root.rglob("*.safetensors"), 1000) if root.is_dir() else ()
        files = sorted(str(p.relative_to(root)) for p in found)
        return {"required": {"path": ("STRING", {"default": files[0] if files else "",
                                                 "tooltip": "A .safetensors file (or the .json of npy features), "
                                                            "relative to the output folder. Existing files: "
                                                            + (", ".join(files[:20]) or "none yet")})}}

    def load(self, path):
        root = comfy_env.output_dir().resolve()
        full = inside(root, path.strip(), f"path {echo(path.strip())}", "the output folder")
        return (load_features(full, root=root),)

    @classmethod
    def IS_CHANGED(cls, path):
        try:
            full = inside(comfy_env.output_dir(), path.strip(), "path")
        except UnsafePathError:
            return ""  # load() gives the error
        return full.stat().st_mtime if full.is_file() else ""
