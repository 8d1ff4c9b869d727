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
    g["4"] = {"class_type": "DFExtractFeatures", "inputs": {
        "model": _link("2"), "image": image, "conditioning": _link("3"), "t": 50, "seed": 0, "resize": "keep-aspect",
        "ensemble": 1, "feature_resize": 1, "offload": True, "batch_size": 4}}
    g["5"] = {"class_type": "DFFeaturePCA", "inputs": {"features": _link("4"), "layer": pca_layer, "joint": joint,
                                                        "foreground_threshold": 0.0, "size": "image"}}
    g["6"] = {"class_type": "PreviewImage", "inputs": {"images": _link("5")}}
    g["7"] = {"class_type": "DFSaveFeatures", "inputs": {"features": _link("4"), "filename_prefix": prefix,
                                                          "format": "safetensors", "layout": "per-sample"}}
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
}

# ---- UI format ------------------------------------------------------------------------------------------------
CORE = {  # ComfyUI core nodes used here: (widget inputs in order, outputs)
    "LoadImage": (["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "ImageBatch": ([], [("IMAGE", "IMAGE")]),
    "PreviewImage": ([], []),
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
            widget_names = CORE[node["class_type"]][0]
            widgets = [node["inputs"].get(n, "image") for n in widget_names]
            ordered = [(n, "IMAGE") for n, v in node["inputs"].items() if isinstance(v, list)]
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
