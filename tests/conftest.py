"""Tiny random models built in-process (no weights, no network) and small helpers shared by the tests."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess

import pytest
import torch

from comfyui_harness import FRONTENDS, VERSIONS
from native_comfy import VERSIONS as NATIVE_VERSIONS

pytest_plugins = ["prerequisites"]  # one summary line per missing prerequisite (ComfyUI's source, chromium)
torch.set_num_threads(1)  # two threads are slower than one for models this small on the CI machine
if os.environ.get("PYTEST_XDIST_WORKER"):
    # and one for what the tests start (ComfyUI servers, CLI runs): torch's default of a thread per core, beside the
    # other worker on the same cores, oversubscribes them; OpenMP's spinning threads then made the servers' prompts
    # 3-6x slower in CI (the native server tests: 443 s -> 297 s, half the CPU time, on 2 cores)
    os.environ["OMP_NUM_THREADS"] = "1"


def tiny_sd15_unet(seed: int = 0):
    """An SD1.5-shaped UNet: 4 levels (3 with attention), 2 resnets per down level, conv in/out projections."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 32, 32), norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
        layers_per_block=2, sample_size=8,
    ).eval()


def tiny_sdxl_unet(seed: int = 0):
    """An SDXL-shaped UNet: text_time added conditioning, linear projections, 2 transformer blocks at level 2,
    upcast attention (as SD2.1 has) so the map processor's upcast path runs too."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 32), norm_num_groups=4, cross_attention_dim=80, attention_head_dim=(2, 2, 4),
        layers_per_block=2, sample_size=8, transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8,
        use_linear_projection=True, upcast_attention=True,
    ).eval()


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_layers=3, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=12, sample_size=8, norm_type="ada_norm_single",
        activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6,
        num_embeds_ada_norm=1000, use_additional_conditions=False,
    ).eval()


@pytest.fixture(scope="module")
def sd15_unet():
    return tiny_sd15_unet()


@pytest.fixture(scope="module")
def sdxl_unet():
    return tiny_sdxl_unet()


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart()


def inputs_for(model, latent_hw=(8, 12), batch=2, tokens=7, seed=1):
    """Random forward kwargs on a latent grid of latent_hw (8x12 by default: non-square on purpose)."""
    from diffusion_feature.layer_catalog import dummy_inputs

    g = torch.Generator().manual_seed(seed)
    return dummy_inputs(model, latent_hw[0] * 8, latent_hw[1] * 8, batch=batch, text_tokens=tokens, generator=g)


class InputRecorder:
    """Records the positional/keyword inputs of chosen modules with plain PyTorch hooks of the test's own."""

    def __init__(self, model, paths):
        self.inputs = {}
        modules = dict(model.named_modules())
        self.handles = [modules[p].register_forward_pre_hook(self._hook(p), with_kwargs=True) for p in paths]

    def _hook(self, path):
        def hook(_m, args, kwargs):
            self.inputs[path] = (args, kwargs)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def hook_state(model):
    """Everything a run could leave behind: hook dicts of every module and every attention processor object."""
    state = []
    for name, m in model.named_modules():
        state.append((name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                      tuple(m._forward_hooks_with_kwargs), tuple(m._forward_pre_hooks_with_kwargs),
                      id(getattr(m, "processor", None))))
    return state


def tiny_vae(seed: int = 0):
    """A VAE with the real factor 8 (four levels), tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), norm_num_groups=4, latent_channels=4, sample_size=64,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1).eval()


def tiny_clip(hidden: int = 32, with_projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


SD_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


def tiny_feature_model(family: str = "sd15"):
    """A FeatureModel of tiny random components with the real CLIP tokenizers."""
    from diffusion_feature.engine.model import FeatureModel
    from diffusion_feature.engine.tokenizers import clip_tokenizer

    if family == "sd15":
        return FeatureModel("sd15", tiny_sd15_unet(), tiny_vae(), [tiny_clip(32)], [clip_tokenizer()],
                            dict(SD_SCHEDULER), source="tiny")
    if family == "sdxl":
        return FeatureModel("sdxl", tiny_sdxl_unet(), tiny_vae(), [tiny_clip(32), tiny_clip(48, True, seed=1)],
                            [clip_tokenizer(), clip_tokenizer("!")], dict(SD_SCHEDULER), source="tiny")
    raise ValueError(family)


def save_sd15_folder(m, folder) -> None:
    """Write a FeatureModel of the sd15 family as a diffusers folder."""
    import shutil

    from diffusers import PNDMScheduler, StableDiffusionPipeline

    shutil.rmtree(folder, ignore_errors=True)
    StableDiffusionPipeline(unet=m.denoiser, vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                            scheduler=PNDMScheduler.from_config(m.scheduler_config), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)


def _tiny_t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "photo", "of", "the", "red", "house"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_pixart_model():
    """A tiny pixart-sigma FeatureModel with a tiny T5 and a word-level stand-in for its tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from diffusion_feature.engine.model import FeatureModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=12, d_ff=16, d_kv=6, num_heads=2, num_layers=1)).eval()
    scheduler = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    return FeatureModel("pixart-sigma", tiny_pixart(), tiny_vae(), [t5], [_tiny_t5_tokenizer()], scheduler)


@pytest.fixture(scope="session")
def tiny_sd15():
    """A tiny sd15 FeatureModel shared by the tests that only read it."""
    return tiny_feature_model("sd15")


@pytest.fixture(scope="session")
def sd15(tiny_sd15):
    """The shared tiny sd15 under its short name (a test module may define its own, e.g. to modify it)."""
    return tiny_sd15


@pytest.fixture(scope="session")
def sdxl():
    """A tiny sdxl FeatureModel shared by the tests that only read it."""
    return tiny_feature_model("sdxl")


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory, tiny_sd15):
    """The tiny sd15 model written as a diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny-sd15")
    save_sd15_folder(tiny_sd15, folder)
    return folder


def tiny_controlnet(unet, seed: int = 0):
    """A ControlNet for a tiny UNet (its encoder copied, as training starts), with the zero convolutions
    re-initialised at random: a freshly made ControlNet adds exact zeros, which would prove nothing."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8)).eval()
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    return net


# ---- tiers: what a test needs beyond the package, as markers (the fast tier: -m "not integration and not browser
# and not distributed") -----------------------------------------------------------------------------------------------
_SERVERS = {"server", "frontend_server", "comfy_servers"}
_INTEGRATION = {"comfy", "comfy_new", *_SERVERS}  # a real ComfyUI


def pytest_itemcollected(item):
    """Mark each test by the fixtures it asks for, so a new test that needs a ComfyUI is in its tier unasked. Marked
    as each test is collected, before any pytest_collection_modifyitems: xdist's reads the xdist_group marks into
    the node ids there, and which of two such hooks runs first changed between pytest releases (9.0 / 9.2)."""
    needs = set(getattr(item, "fixturenames", ()))
    if needs & _INTEGRATION:
        item.add_marker(pytest.mark.integration)
    if "chromium" in needs:
        item.add_marker(pytest.mark.browser)
    group = _xdist_group(item, needs)
    if group:
        item.add_marker(pytest.mark.xdist_group(group))


def _xdist_group(item, needs: set) -> str | None:
    """Under pytest-xdist (-n 2 --dist loadgroup) the tests that share a costly session or module resource run in one
    worker: a ComfyUI version's server tests (its servers start once, and the tiny model files written into its
    folders are written by one process), and one test module's in-process tests of one ComfyUI version (its model
    code is imported once). The two versions' servers run in the two workers side by side."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if needs & (_SERVERS | {"chromium"}):
        name = params.get("server") or params.get("frontend_server")
        version = (VERSIONS.get(name) or FRONTENDS.get(name) or ("any",))[0]
        return f"comfyui-server-{version}"
    if needs & _INTEGRATION:
        return f"comfyui-{params.get('comfy') or params.get('comfy_new') or 'any'}-{item.module.__name__}"
    return None


def pytest_configure(config):
    """--dist loadgroup needs a pytest whose node ids xdist can rename (it names the group there): from pytest 9.2 the
    rename is ignored and nothing is grouped, so every worker would start every ComfyUI server."""
    from packaging.version import Version

    if getattr(config.option, "dist", None) == "loadgroup" and Version(pytest.__version__) >= Version("9.2"):
        raise pytest.UsageError(f"--dist loadgroup groups nothing under pytest {pytest.__version__}: install the "
                                "test extra's pytest (pip install -e \".[test]\", pytest<9.2)")


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    """The tests that need a ComfyUI run last. Reordered here, not after collection: an xdist worker reports its
    collection to the controller, which then names tests by their index in it, when collection finishes; a list
    reordered after that runs other tests than the ones sent (it scrambled the groups). Under --dist loadgroup the
    groups (the ComfyUI tests) still go out first, largest first."""
    integration = [i for i in items if i.get_closest_marker("integration")]
    if integration:
        items[:] = [i for i in items if not i.get_closest_marker("integration")] + integration


def pytest_collection_finish(session):
    """The ComfyUIs the selected tests need are prepared in the background meanwhile (on a fresh machine or CI that
    takes minutes, hidden behind other tests)."""
    if not session.config.option.collectonly and any(i.get_closest_marker("integration") for i in session.items):
        from comfyui_harness import prepare_in_background

        prepare_in_background(sorted({*NATIVE_VERSIONS, *(v for v, _ in VERSIONS.values())}))


def pytest_sessionfinish(session, exitstatus):
    from comfyui_harness import stop_background

    stop_background(exitstatus == pytest.ExitCode.INTERRUPTED)


# ---- ComfyUI's own model code in-process, for the native backend's tests (tests/native_comfy.py) -------------------
@pytest.fixture(scope="module", params=NATIVE_VERSIONS)
def comfy(request):
    """ComfyUI's model code of each supported version (ids 2024-03, 0.3.64), imported for one test module's tests
    and forgotten after them (only one `comfy` can be imported at a time)."""
    import native_comfy

    yield native_comfy.use_comfy(request.param)
    native_comfy.release()


# ---- a real ComfyUI server, for the integration tests (tests/comfyui_harness.py) -----------------------------------
class _ComfyServers:
    """ComfyUI servers started on first use and stopped at the end of the session; the tiny models are written into
    each ComfyUI's model folders once and built once (the same seeds: the same models for every server)."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory, self.servers, self.models, self.homes = tmp_path_factory, {}, None, {}

    def get(self, name: str, version: str, frontend: str | None):
        import numpy as np
        from PIL import Image

        from comfyui_harness import ComfyServer, prepare, write_tiny_models

        if name in self.servers:
            return self.servers[name]
        if version not in self.homes:
            home = prepare(version)
            models = write_tiny_models(home / "ComfyUI")
            self.models = self.models or models
            self.homes[version] = home
        home = self.homes[version]
        tmp = self.tmp_path_factory.mktemp(name)
        inputs, outputs = tmp / "input", tmp / "output"
        inputs.mkdir()
        rng = np.random.default_rng(0)
        for image in ("example.png", "example2.png"):
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(inputs / image)
        extra = ("--front-end-root", str(home / frontend)) if frontend else ()
        srv = ComfyServer(home, inputs, outputs, tmp / "server.log", name=name, extra_args=extra)
        srv.models = self.models
        self.servers[name] = srv
        return srv

    def stop(self, name: str) -> None:
        srv = self.servers.pop(name, None)
        if srv is not None:
            srv.stop()

    def stop_all(self) -> None:
        for name in list(self.servers):
            self.stop(name)


@pytest.fixture(scope="session")
def comfy_servers(tmp_path_factory):
    servers = _ComfyServers(tmp_path_factory)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session", params=list(VERSIONS))
def server(request, comfy_servers):
    """A real ComfyUI with this pack, one per tested version (ids comfy2024, comfy0364), started once per session:
    .get(path), .post(path, body) -> (code, body), .run(graph) -> history entry, .url, .input_dir, .output_dir,
    .home, .models (the tiny FeatureModels), .log_text()."""
    return comfy_servers.get(request.param, *VERSIONS[request.param])


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium and chromedriver for the browser tests, found before their server starts (ask for it
    before `frontend_server`): a test is skipped without them (one summary line), CI fails instead."""
    from prerequisites import chromium as find

    return find()


@pytest.fixture(scope="session", params=list(FRONTENDS))
def frontend_server(request, comfy_servers):
    """The server for the browser test, one per tested frontend: the 2024-03 ComfyUI's own, v0.3.64's pinned 1.27.10
    (the same servers as `server`) and PyPI's newest, 1.58.1, served by v0.3.64 with --front-end-root."""
    version, frontend = FRONTENDS[request.param]
    if frontend is None:  # the version's own frontend: the `server` of that version
        name = next(n for n, v in VERSIONS.items() if v[0] == version)
        return comfy_servers.get(name, *VERSIONS[name])
    return comfy_servers.get(request.param, version, frontend)


class VaeCalls:
    """Counts the VAE encoder's forwards with a hook of the test's own."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.vae.encoder.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture()
def tiny_random_weights(monkeypatch, request):
    """load_model("random:FAMILY") (the CLI's --model random:FAMILY, the demo's default) gives the family's shared
    tiny model (sd15, sdxl) instead of building the full-size architecture (gigabytes, tens of seconds); yields the
    families asked for, in order."""
    import dataclasses

    from diffusion_feature.engine import loading

    built = []

    def build_random(family, dtype="float32", device="cpu", seed=0):
        built.append(family)
        shared = request.getfixturevalue({"sd15": "tiny_sd15", "sdxl": "sdxl"}[family])
        return dataclasses.replace(shared, source=loading.RANDOM_SOURCE)

    monkeypatch.setattr(loading, "build_random", build_random)
    yield built


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python -m diffusion_feature ARGS` in this process (a new process re-imports torch and pays seconds a call;
    test_catalog keeps one real subprocess for the entry point): exit status, stdout and stderr as text."""
    from diffusion_feature.engine import cli

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's exit(2) and the commands' own exits
            code = e.code
    return subprocess.CompletedProcess(argv, code or 0, out.getvalue(), err.getvalue())
