"""A real ComfyUI server for the integration tests: prepared by tests/comfyui/setup_comfyui.sh (cached), started on
127.0.0.1 with --cpu and this pack in custom_nodes, with tiny models written into its model folders.

Two ComfyUI versions are tested (VERSIONS); the browser test also runs v0.3.64 with the newest frontend of PyPI.
The `server` fixture (conftest.py) gives one of them per test, started once per session."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tests" / "comfyui" / "setup_comfyui.sh"
TEST_NODES = REPO / "tests" / "comfyui" / "df_test_nodes.py"


# test id -> (ComfyUI version for setup_comfyui.sh, frontend folder inside its home or None for its own frontend)
VERSIONS = {"comfy2024": ("2024-03", None), "comfy0364": ("0.3.64", None)}
FRONTENDS = {"comfy2024": ("2024-03", None), "comfy0364-fe1.27.10": ("0.3.64", None),
             "comfy0364-fe1.58.1": ("0.3.64", "frontends/1.58.1")}
TINY_CKPT, TINY_XL = "df-tiny-sd15.safetensors", "df-tiny-sdxl"
TINY_CN, TINY_LORA = "df-tiny-canny.safetensors", "df-tiny-lora.safetensors"
LINKED_XL = "df-linked/sdxl"  # the tiny sdxl again, in a folder outside models/ that models/diffusers links to


def _setup_env(version: str) -> dict:
    env = dict(os.environ)
    home = Path(env.get("DF_COMFY_HOME", REPO / ".comfyui-test")) / version
    if version == "0.3.64" and not (home / "ComfyUI" / "main.py").is_file():
        from prerequisites import COMFYUI_ENV, comfyui_source

        env[COMFYUI_ENV] = str(comfyui_source())
    return env


_background: list[subprocess.Popen] = []


def prepare_in_background(versions) -> None:
    """Start preparing these ComfyUI homes now (minutes on a fresh machine: a venv with torch each), so that it
    overlaps the tests that need no ComfyUI; prepare() then waits for it (the script takes a lock). A version whose
    source is missing is left to its tests, which skip or fail with the reason."""
    from prerequisites import Unavailable

    for version in versions:
        try:
            env = _setup_env(version)
        except Unavailable:
            continue
        log = Path(env.get("DF_COMFY_HOME", REPO / ".comfyui-test")) / f"setup-{version}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            _background.append(subprocess.Popen(["bash", str(SETUP), version], stdout=out, stderr=subprocess.STDOUT,
                                                env=env))


def stop_background(interrupted: bool) -> None:
    """End of the session. An interrupted session stops the preparations it started; otherwise one still running is
    left to finish (under pytest-xdist the worker that started it may end before the worker that needs it, which
    waits for the script's lock), and the next run of the script finds it done."""
    for proc in _background:
        if interrupted and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    _background.clear()


def prepare(version: str) -> Path:
    """The prepared ComfyUI home (venv + ComfyUI/); runs the setup script, which is quick once cached. v0.3.64's
    source comes from tests/prerequisites.py (the calling test is skipped where it cannot be found)."""
    env = _setup_env(version)
    out = subprocess.run(["bash", str(SETUP), version], capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"ComfyUI setup failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_models(comfy: Path) -> dict:
    """Tiny random models in the ComfyUI's model folders: an sd15 checkpoint (+ its config sidecar), an sdxl diffusers
    folder (and a linked copy), a ControlNet for the sd15 and a kohya LoRA. Returns the FeatureModels."""
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from conftest import save_sd15_folder, tiny_controlnet, tiny_feature_model
    from ldm_export import controlnet_to_ldm, sd15_single_file_state

    sd15 = tiny_feature_model("sd15")
    ckpt_dir = comfy / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file(sd15_single_file_state(sd15.denoiser, sd15.vae, sd15.text_encoders[0]), str(ckpt_dir / TINY_CKPT))
    save_sd15_folder(sd15, ckpt_dir / (Path(TINY_CKPT).stem + ".config"))  # its architecture: a config sidecar
    xl = tiny_feature_model("sdxl")
    pipe = StableDiffusionXLPipeline(vae=xl.vae, text_encoder=xl.text_encoders[0], text_encoder_2=xl.text_encoders[1],
                                     tokenizer=xl.tokenizers[0], tokenizer_2=xl.tokenizers[1], unet=xl.denoiser,
                                     scheduler=EulerDiscreteScheduler.from_config(xl.scheduler_config))
    folder = comfy / "models" / "diffusers" / TINY_XL
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder)
    # models kept on another drive: models/diffusers/df-linked is a link to a folder outside the model folders
    elsewhere, link = comfy / "df-models-elsewhere", comfy / "models" / "diffusers" / Path(LINKED_XL).parent
    shutil.rmtree(elsewhere, ignore_errors=True)
    shutil.copytree(folder, elsewhere / Path(LINKED_XL).name)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(elsewhere, target_is_directory=True)
    # a ControlNet for the tiny sd15 in the original single-file layout, its architecture in a config sidecar
    cn_dir = comfy / "models" / "controlnet"
    cn_dir.mkdir(parents=True, exist_ok=True)
    net = tiny_controlnet(sd15.denoiser)
    save_file(controlnet_to_ldm(net), str(cn_dir / TINY_CN))
    net.save_config(cn_dir / (Path(TINY_CN).stem + ".config"))
    lora_dir = comfy / "models" / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(sd15), str(lora_dir / TINY_LORA))
    install_test_nodes(comfy)
    return {"sd15": sd15, "sdxl": xl}


def install_test_nodes(comfy: Path) -> None:
    """The test-only nodes (tests/comfyui/df_test_nodes.py) in the ComfyUI's custom_nodes, before its server starts:
    the test home only, never the pack."""
    import shutil

    shutil.copyfile(TEST_NODES, comfy / "custom_nodes" / TEST_NODES.name)


def kohya_lora(model) -> dict:
    """A rank-2 kohya LoRA on every attention projection of the tiny sd15's UNet and on its text encoder's q_proj."""
    import torch

    g = torch.Generator().manual_seed(0)
    state = {}
    for component, prefix, module in (("unet", "lora_unet_", model.denoiser),
                                      ("te", "lora_te_text_model_", model.text_encoders[0])):
        for name, sub in module.named_modules():
            if not isinstance(sub, torch.nn.Linear) or not name.endswith(("to_q", "to_v", "q_proj")):
                continue
            key = prefix + name.replace(".", "_")
            state[key + ".lora_down.weight"] = torch.randn(2, sub.in_features, generator=g) * 0.5
            state[key + ".lora_up.weight"] = torch.randn(sub.out_features, 2, generator=g) * 0.5
            state[key + ".alpha"] = torch.tensor(2.0)
    return state


class ComfyServer:
    def __init__(self, home: Path, input_dir: Path, output_dir: Path, log: Path, name: str = "",
                 extra_args: tuple = ()):
        self.home, self.input_dir, self.output_dir, self.name = home, input_dir, output_dir, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [str(home / "venv" / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1", "--port",
             str(self.port), "--disable-auto-launch", "--input-directory", str(input_dir), "--output-directory",
             str(output_dir), *extra_args], cwd=home / "ComfyUI", stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {log}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in 300 s; see {log}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def get_with_status(self, path: str) -> tuple[int, dict]:
        """A GET that may be refused: (status, JSON body)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    @staticmethod
    def wait_for(condition, timeout: float = 60) -> bool:
        """Poll `condition()` until it holds (True) or `timeout` seconds pass (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            time.sleep(0.25)
        return False

    def get_text(self, path: str) -> tuple[int, str]:
        """A GET whose answer is not JSON (a static file): (status, text)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def log_text(self) -> str:
        """What the server printed so far."""
        self.log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")  # some routes (/free) answer with no body
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        """Queue a prompt and wait for its history entry (status and outputs)."""
        code, body = self.post("/prompt", {"prompt": graph, "client_id": "df-tests"})
        if code != 200:
            return {"rejected": body}
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def run_ok(server: ComfyServer, graph: dict) -> dict:
    """Run a prompt that must succeed: its history entry (a refusal or an execution error fails the test, named)."""
    entry = server.run(graph)
    assert "rejected" not in entry, entry
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    return entry


def saved_files(server: ComfyServer, entry: dict) -> list[Path]:
    """The feature files a prompt's save nodes wrote, in the order they report them."""
    return [server.output_dir / item["subfolder"] / item["filename"]
            for out in entry["outputs"].values() for item in out.get("features", [])]


def images_of(entry: dict) -> dict:
    """{node id: its reported images} of a prompt's image outputs."""
    return {nid: out["images"] for nid, out in entry["outputs"].items() if "images" in out}


def no_hooks(server: ComfyServer) -> dict:
    """The pack's status after runs: no hook and no map processor left on any model it knows. Returns the status."""
    status = server.get("/diffusion_feature/status")
    assert status["forward_hooks"] == 0 and status["forward_pre_hooks"] == 0
    return status


def assert_memory_flat(server: ComfyServer, graph: dict, seed_node: str, prompts: int = 20, warmup: int = 3,
                       limit_bytes: int = 64 * 2**20) -> None:
    """Run `graph` `warmup` times (models loaded, caches filled), then `prompts` times more, each with a new seed on
    node `seed_node` and each succeeding: the server's resident memory may grow by less than `limit_bytes` over
    the counted prompts."""
    for seed in range(warmup):
        graph[seed_node]["inputs"]["seed"] = seed
        run_ok(server, graph)
    before = server.rss_bytes()
    for seed in range(warmup, warmup + prompts):
        graph[seed_node]["inputs"]["seed"] = seed
        run_ok(server, graph)
    growth = server.rss_bytes() - before
    assert growth < limit_bytes, f"server memory grew by {growth / 2**20:.0f} MiB over {prompts} prompts"
