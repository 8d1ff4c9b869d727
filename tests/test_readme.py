"""The README works as written: its Python blocks run, in order, as one session; every command of the CLI in its
shell blocks parses against the real parser (each flag exists, each listed choice is valid); the numbers it states
are counted from the code."""
from __future__ import annotations

import gc
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
           "twenty-one", "twenty-two", "twenty-three", "twenty-four", "twenty-five"]


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block of `language`."""
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.M | re.S):
        if m.group(1) == language:
            found.append((README.count("\n", 0, m.start()) + 1, m.group(2)))
    return found


# ---- the Python blocks -----------------------------------------------------------------------------------------
def _user_files(folder: Path, model) -> None:
    """What the blocks read from the repository root (the bundled samples) and what a user brings: a ControlNet
    (tiny, with its config beside it) and a LoRA."""
    from safetensors.torch import save_file

    from conftest import tiny_controlnet

    shutil.copytree(ROOT / "engine" / "data" / "samples", folder / "engine" / "data" / "samples")
    net = tiny_controlnet(model.denoiser)
    torch.save(net.state_dict(), folder / "control_v11p_sd15_canny.pth")
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    (folder / "control_v11p_sd15_canny.json").write_text(json.dumps(config))
    q = model.denoiser.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.ones(1, q.in_features),
               f"{key}.lora_up.weight": torch.ones(q.out_features, 1)}, str(folder / "style.safetensors"))


def test_the_python_blocks_run_in_order_as_one_session(tmp_path, monkeypatch, tiny_random_weights, tiny_sd15):
    """As a reader would paste them from the repository root, load_model("random:sd15") giving the tiny model."""
    from diffusion_feature.engine.loading import RandomWeightsWarning
    from diffusion_feature.engine.model import FeatureModel

    _user_files(tmp_path, tiny_sd15)
    monkeypatch.chdir(tmp_path)
    # the tiny model at a tiny native area too: images and generations at 128^2 instead of 512^2 (the Plug-and-Play
    # block's 100 steps alone took two minutes at 512 on a CPU)
    monkeypatch.setattr(FeatureModel, "native_size", property(lambda self: 128))
    session: dict = {"__name__": "readme"}
    blocks = code_blocks("python")
    assert len(blocks) >= 6
    try:
        with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS of the real sd15 architecture"):
            for line, code in blocks:
                exec(compile(code, f"README.md, the python block at line {line}", "exec"), session)  # noqa: S102
        assert tiny_random_weights == ["sd15"]  # one model for the session, loaded by the library example
        assert (tmp_path / "out" / "cat.safetensors").is_file()
        assert session["result"].status == 0
    finally:
        # The blocks' LoRA clone shares the session's tiny sd15 modules, which carry its adapter while it lives; the
        # session dict (its functions refer back to it) is a cycle, so only a collection ends it. Left alive, the
        # adapter's weights showed in the shared model's state dict for the tests after this one in the worker.
        session.clear()
        gc.collect()
    assert not [k for k in tiny_sd15.denoiser.state_dict() if ".lora_" in k or ".base_layer." in k]


# ---- the shell blocks ------------------------------------------------------------------------------------------
def _commands(block: str) -> list[list[str]]:
    """Each command of a shell block as tokens: continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append(tokens[:cut])
            tokens = tokens[cut + 1:]
    return [c for c in commands if c]


def _options(sub) -> dict:
    return {opt: action for action in sub._actions for opt in action.option_strings}


def _check_cli(args: list[str], where: str) -> None:
    """`python -m diffusion_feature ARGS`: the subcommand exists, every flag (optional ones in [...] too) is one of
    its flags, every value listed for a flag with choices (a|b) is a choice, and without the [...] parts and with
    placeholders the command parses."""
    from diffusion_feature.engine.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    assert args and args[0] in subparsers, f"{where}: no subcommand {args[:1]} (valid: {', '.join(subparsers)})"
    options = _options(subparsers[args[0]])
    depth, concrete, previous = 0, [args[0]], None
    for raw in args[1:]:
        token = raw.lstrip("[")
        opening = len(raw) - len(token)
        depth += opening
        token = token.rstrip("]")
        closing = len(raw.lstrip("[")) - len(token)
        if token.startswith("--"):
            assert token in options, f"{where}: {args[0]} has no flag {token}"
            previous = options[token]
        elif token not in ("|", "...") and previous is not None and previous.choices is not None:
            for choice in token.split("|"):
                assert choice in previous.choices, f"{where}: {choice!r} is not a choice of {previous.option_strings}"
        if depth == 0 and token != "...":
            concrete.append(token)
        depth -= closing
    if "..." not in args:  # an elided command (`extract ...`) cannot parse as a whole
        try:
            parser.parse_args(concrete)
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(concrete)}` does not parse")


def test_every_cli_command_in_the_shell_blocks_parses():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    checked = 0
    for line, block in code_blocks("bash"):
        for tokens in _commands(block):
            where = f"README line {line}: {' '.join(tokens)[:60]}"
            program = tokens[0]
            if "diffusion_feature" in tokens and tokens[tokens.index("diffusion_feature") - 1] == "-m":
                assert program in ("python", "torchrun", "accelerate"), where
                _check_cli(tokens[tokens.index("diffusion_feature") + 1:], where)
                checked += 1
            elif program == "pip":
                for extra in re.findall(r"\.\[(\w+)\]", " ".join(tokens)):
                    assert extra in pyproject["project"]["optional-dependencies"], where
                for listed in [t for i, t in enumerate(tokens) if tokens[i - 1] == "-r"]:
                    assert (ROOT / Path(listed).name).is_file(), where
            elif program == "curl":
                for path in re.findall(r"example_workflows/[\w.-]+", " ".join(tokens)):
                    assert (ROOT / path).is_file(), where
            else:  # setup steps of the reader's own: running the tests, cloning, changing folder
                assert tokens[:3] == ["python", "-m", "pytest"] or program in ("cd", "git"), where
    assert checked >= 8


# ---- the numbers the README states -----------------------------------------------------------------------------
def test_the_node_and_workflow_counts_are_the_real_ones():
    from diffusion_feature import NODE_CLASS_MAPPINGS

    nodes = re.search(r"\(([\w-]+) nodes, a layer picker", README).group(1)
    assert NUMBERS.index(nodes) == len(NODE_CLASS_MAPPINGS)
    missing = [name for name in NODE_CLASS_MAPPINGS if f"`{name}`" not in README]
    assert not missing, f"nodes the README does not describe: {missing}"
    graphs = re.search(r"`example_workflows/` holds ([\w-]+) graphs", README).group(1)
    assert NUMBERS.index(graphs) == len(list((ROOT / "example_workflows").glob("*.api.json")))
