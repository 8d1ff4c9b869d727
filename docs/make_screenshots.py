"""Regenerates docs/images/*.png for the README: a real ComfyUI (prepared by tests/comfyui/setup_comfyui.sh) runs the
sd15 example workflow on the tiny test model and headless chromium photographs the graph, the PCA preview and the
layer picker. Run from the repository root: python docs/make_screenshots.py"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from comfyui_harness import ComfyServer, prepare, write_tiny_models  # noqa: E402
from test_comfyui_server import _browser, _wait, tiny_ui_workflow  # noqa: E402


def main() -> None:
    from PIL import Image

    home = prepare("2024-03")
    write_tiny_models(home / "ComfyUI")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "in").mkdir()
    Image.open(ROOT / "nodes" / "data" / "samples" / "house.jpg").save(tmp / "in" / "example.png")
    server = ComfyServer(home, tmp / "in", tmp / "out", tmp / "server.log")
    workflow = tiny_ui_workflow(show_layers=False)
    driver = _browser()
    try:
        driver.get(server.url)
        _wait(driver, "return window.app && app.extensions.some(e => e.name === 'diffusion_feature.layer_picker')")
        driver.execute_script("return Promise.resolve(app.loadGraphData(arguments[0])).then(() => true)", workflow)
        driver.execute_script("app.queuePrompt(0, 1)")
        _wait(driver, "return app.graph._nodes.some(n => n.type === 'PreviewImage' && n.imgs && n.imgs.length)", 300)
        time.sleep(1)
        driver.execute_script("app.canvas.ds.scale = 0.68; app.canvas.ds.offset = [10, 10]; document.querySelector('.comfy-menu').style.display = 'none'; app.graph.setDirtyCanvas(true, true)")
        time.sleep(0.5)
        driver.save_screenshot(str(ROOT / "docs" / "images" / "graph.png"))
        node_id = driver.execute_script("return app.graph._nodes.find(n => n.type === 'DFAttachHooks').id")
        driver.execute_script("diffusionFeaturePicker.open(app.graph.getNodeById(arguments[0]))", node_id)
        _wait(driver, "return document.querySelectorAll('.df-picker-item').length")
        driver.find_element("css selector", ".df-picker-search").send_keys("up-level1")
        time.sleep(0.5)
        driver.save_screenshot(str(ROOT / "docs" / "images" / "layer_picker.png"))
    finally:
        driver.quit()
        server.stop()
    print("wrote docs/images/graph.png and docs/images/layer_picker.png")


if __name__ == "__main__":
    main()
