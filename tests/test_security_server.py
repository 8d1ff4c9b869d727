"""Issue 17 over HTTP on a real ComfyUI: files anyone can upload (POST /upload/image with type=output or input) and
widget values never make the pack read or write outside ComfyUI's folders, leak a file's content, or take the
server down: each case is a one-sentence node error, and the next prompt succeeds."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import torch
from safetensors.torch import save

from comfyui_harness import TINY_CKPT, TINY_XL, execution_error

LAYER = "up-level1-repeat1-res-out"


def upload(srv, name: str, data: bytes, kind: str, subfolder: str = "") -> dict:
    """ComfyUI's own upload route, as any client can call it."""
    boundary = uuid.uuid4().hex
    parts = []
    for field, value in (("type", kind), ("subfolder", subfolder), ("overwrite", "true")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(srv.url + "/upload/image", data=b"".join(parts),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def features_file(tensors: dict, meta: dict | None = None) -> bytes:
    return save(tensors, {k: json.dumps(v) for k, v in (meta or {}).items()})


def load_and_save(path: str, fmt: str = "npy", layout: str = "per-layer", prefix: str = "sec/x") -> dict:
    return {"1": {"class_type": "DFLoadFeatures", "inputs": {"path": path}},
            "2": {"class_type": "DFSaveFeatures", "inputs": {"features": ["1", 0], "filename_prefix": prefix,
                                                             "format": fmt, "layout": layout}}}


def one_sentence_error(entry: dict, node_type: str) -> str:
    err = execution_error(entry)
    assert err and err["node_type"] == node_type, entry.get("status")
    message = err["exception_message"].strip()
    assert "\n" not in message and "Traceback" not in message
    return message


def still_serving(srv) -> None:
    feats = features_file({LAYER: torch.ones(2, 2, 2)}, {"layers": [LAYER], "size": [16, 16]})
    name = upload(srv, f"ok-{uuid.uuid4().hex[:8]}.safetensors", feats, "output")["name"]
    entry = srv.run(load_and_save(name, "safetensors", "per-sample", "sec/ok"))
    assert entry["status"]["status_str"] == "success"


def test_uploaded_features_whose_keys_are_paths_write_nothing_outside(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = f"df-escape-{uuid.uuid4().hex[:8]}"
    escaped = (server.output_dir / "sec" / ".." / ".." / ".." / marker).resolve()
    for key in (f"../../../{marker}", str(outside / "evil")):
        name = upload(server, f"{uuid.uuid4().hex[:8]}.safetensors", features_file({key: torch.ones(2, 2, 2)}),
                      "output")["name"]
        for layout in ("per-layer", "per-sample"):
            message = one_sentence_error(server.run(load_and_save(name, layout=layout)), "DFLoadFeatures")
            assert "not a layer id" in message
    assert not escaped.exists() and list(outside.iterdir()) == []
    still_serving(server)


def test_uploaded_metadata_cannot_read_files_outside(server, tmp_path):
    import numpy as np

    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    np.save(secret_dir / "stolen.npy", np.full((3, 2, 2), 42.0, np.float32))
    sub = f"u{uuid.uuid4().hex[:8]}"
    for meta in ({"name": "s", "layers": [str(secret_dir / "stolen")]},
                 {"name": "s", "layers": ["../" * 12 + str(secret_dir / "stolen").lstrip("/")]},
                 {"name": str(secret_dir / "stolen"), "layers": [LAYER], "aggregate_slices": {}}):
        upload(server, "meta.json", json.dumps(meta).encode(), "output", sub)
        message = one_sentence_error(server.run(load_and_save(f"{sub}/meta.json", "safetensors", "per-sample")),
                                     "DFLoadFeatures")
        assert "stolen" not in message and str(secret_dir) not in message
    assert not list(server.output_dir.rglob("*stolen*"))
    still_serving(server)


def test_layer_files_come_only_from_the_input_folder_and_their_content_is_never_echoed(server, tmp_path):
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"PRIVATE_TOKEN_1234": True}))

    def attach(layers: str) -> dict:
        return {"1": {"class_type": "DFLoadCheckpoint", "inputs": {"ckpt_name": TINY_CKPT, "family": "auto",
                                                                  "dtype": "auto", "device": "auto"}},
                "2": {"class_type": "DFAttachHooks", "inputs": {"model": ["1", 0], "layers": layers,
                                                                "preset": "none"}},
                "3": {"class_type": "DFShowLayers", "inputs": {"model": ["2", 0], "width": 64, "height": 64}}}

    answers = []
    for layers in (str(private), str(tmp_path / "absent.json")):
        message = one_sentence_error(server.run(attach(layers)), "DFAttachHooks")
        assert "PRIVATE_TOKEN" not in message and "absolute path" in message
        answers.append(message.replace("private", "X").replace("absent", "X"))
    assert answers[0] == answers[1]  # an existing and an absent file get the same answer
    upload(server, "foreign.json", json.dumps(["mid-repeat0-res-out", "PRIVATE_TOKEN_5678"]).encode(), "input")
    message = one_sentence_error(server.run(attach("foreign.json")), "DFAttachHooks")
    assert "entry 2 of layer file 'foreign.json'" in message and "PRIVATE_TOKEN" not in message
    upload(server, "mine.json", json.dumps({LAYER: True, "mid-repeat0-res-out": True}).encode(), "input")
    assert server.run(attach("mine.json"))["status"]["status_str"] == "success"


def test_sizes_from_uploaded_metadata_are_refused_before_allocation(server):
    feats = features_file({LAYER: torch.ones(4, 2, 2)}, {"layers": [LAYER], "input_size": [40000, 40000]})
    name = upload(server, f"big-{uuid.uuid4().hex[:8]}.safetensors", feats, "output")["name"]
    graph = {"1": {"class_type": "DFLoadFeatures", "inputs": {"path": name}},
             "2": {"class_type": "DFFeaturePCA", "inputs": {"features": ["1", 0], "layer": "", "joint": True}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    assert "two integers in 1..16384" in one_sentence_error(server.run(graph), "DFLoadFeatures")
    still_serving(server)


def test_family_route_answers_a_file_inside_a_model_folder_with_400(server):
    url = f"{server.url}/diffusion_feature/family?kind=diffusers&name={TINY_XL}/model_index.json"
    try:
        urllib.request.urlopen(url, timeout=60)
        raise AssertionError("the route accepted a file as a diffusers folder")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "is not a diffusers model folder" in json.loads(e.read())["error"]
    assert server.get(f"/diffusion_feature/family?kind=diffusers&name={TINY_XL}") == {"family": "sdxl"}
