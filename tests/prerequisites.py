"""What the integration tests need beyond the package (ComfyUI v0.3.64's source, a headless chromium) and what a
test does when it is missing.

On a newcomer's machine a missing prerequisite skips exactly the tests that need it. Each kind is skipped from one
line of this file, so pytest's summary (-ra) folds all of them into one line that says how to enable them. CI sets
DF_TEST_REQUIRE_ALL=1: there a missing prerequisite fails every test that needs it instead of hiding it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STRICT = os.environ.get("DF_TEST_REQUIRE_ALL") == "1"

COMFYUI_VERSION = "0.3.64"
COMFYUI_ENV = "DF_COMFYUI_0364"  # a folder holding ComfyUI v0.3.64's source, or its .tar.gz
COMFYUI_TARBALL = REPO.parent / "shared" / "comfyui" / "ComfyUI-0.3.64.tar.gz"  # this team's machines and CI
COMFYUI_GIT = "https://github.com/Comfy-Org/ComfyUI.git"
COMFYUI_COMMIT = "a125cd84"  # the v0.3.64 tag (2025-10); a clone at another commit is refused
COMFYUI_CACHE = REPO / ".comfyui-src"  # git-ignored: the source, unpacked or cloned once


class Unavailable(Exception):
    """A prerequisite that cannot be found here; its message says how to provide it."""


_MISSING = " is not available: "


def require(what: str, how: str) -> None:
    """Skip the calling test (fail it under DF_TEST_REQUIRE_ALL=1) because `what` is missing."""
    message = f"{what}{_MISSING}{how}"
    if STRICT:
        pytest.fail(f"{message} (DF_TEST_REQUIRE_ALL=1: every test must run)", pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Point every skip of require() at require() itself: pytest places a skip raised in a fixture at each test,
    and -ra would then print one line per test instead of one per missing prerequisite. (Loaded as a plugin by
    conftest.py.)"""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and _MISSING in report.longrepr[2]:
        report.longrepr = (__file__, require.__code__.co_firstlineno, report.longrepr[2])
    return report


_found: dict[str, Path | Unavailable] = {}


def comfyui_source() -> Path:
    """ComfyUI v0.3.64's source tree, found once per session (each test that needs it is skipped when it is not)."""
    if COMFYUI_VERSION not in _found:
        try:
            _found[COMFYUI_VERSION] = _find_comfyui_source()
        except Unavailable as missing:
            _found[COMFYUI_VERSION] = missing
    found = _found[COMFYUI_VERSION]
    if isinstance(found, Unavailable):
        require(f"ComfyUI v{COMFYUI_VERSION}'s source", str(found))
    return found


def _find_comfyui_source() -> Path:
    """In order: the folder or tarball named by DF_COMFYUI_0364, this team's tarball in ../shared, a source unpacked
    or cloned by an earlier run, and a shallow clone of the v0.3.64 tag where the network allows."""
    named = os.environ.get(COMFYUI_ENV)
    if named:  # asked for explicitly: a wrong value is an error, never a skip
        path = Path(named).expanduser()
        if path.is_dir():
            return _checked(path, f"{COMFYUI_ENV}={named}")
        if path.is_file():
            return _unpacked(path)
        raise FileNotFoundError(f"{COMFYUI_ENV}={named}: no such folder or tarball (give ComfyUI v0.3.64's source "
                                "folder or its .tar.gz)")
    if COMFYUI_TARBALL.is_file():
        return _unpacked(COMFYUI_TARBALL)
    tree = COMFYUI_CACHE / "ComfyUI"
    if (tree / "comfyui_version.py").is_file():
        return _checked(tree, str(tree))
    return _cloned(tree)


def _checked(tree: Path, origin: str) -> Path:
    version_file = tree / "comfyui_version.py"
    text = version_file.read_text() if version_file.is_file() else ""
    if f'"{COMFYUI_VERSION}"' not in text:
        raise ValueError(f"{origin} is not ComfyUI v{COMFYUI_VERSION}'s source (its comfyui_version.py says "
                         f"{text.strip().splitlines()[-1] if text.strip() else 'nothing'})")
    return tree


def _unpacked(tarball: Path) -> Path:
    """The tarball unpacked once into the cache. Both xdist workers ask at the same moment (when their collection
    finishes): one unpacks under a file lock while the other waits, so neither reads a half-written tree."""
    import fcntl

    tree = COMFYUI_CACHE / "ComfyUI"
    COMFYUI_CACHE.mkdir(exist_ok=True)
    with open(COMFYUI_CACHE / ".unpack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = COMFYUI_CACHE / ".unpacked"  # written last: an interrupted unpacking is redone
        if not done.is_file() or not tree.is_dir():
            shutil.rmtree(tree, ignore_errors=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(COMFYUI_CACHE, filter="data")
            done.write_text(str(tarball))
    return _checked(tree, str(tarball))


def _cloned(tree: Path) -> Path:
    how = (f"set {COMFYUI_ENV} to its source folder or .tar.gz, or allow `git clone` of {COMFYUI_GIT} "
           f"(tag v{COMFYUI_VERSION})")
    partial = COMFYUI_CACHE / "clone.partial"
    shutil.rmtree(partial, ignore_errors=True)
    COMFYUI_CACHE.mkdir(exist_ok=True)
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", f"v{COMFYUI_VERSION}", COMFYUI_GIT,
                        str(partial)], check=True, capture_output=True, timeout=600, env=env)
        head = subprocess.run(["git", "-C", str(partial), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as failed:
        shutil.rmtree(partial, ignore_errors=True)
        reason = getattr(failed, "stderr", b"") or b""
        reason = reason.decode(errors="replace").strip().splitlines()[-1:] if isinstance(reason, bytes) else []
        raise Unavailable(f"{how} (the clone failed: {reason[0] if reason else type(failed).__name__})") from None
    if not head.startswith(COMFYUI_COMMIT):
        shutil.rmtree(partial, ignore_errors=True)
        raise Unavailable(f"{how} (the clone's tag points at {head[:12]}, not {COMFYUI_COMMIT})")
    shutil.rmtree(partial / ".git")
    partial.rename(tree)
    return _checked(tree, COMFYUI_GIT)


def chromium() -> tuple[str, str]:
    """Debian's chromium and its chromedriver (the browser test drives them headless), or a skip."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        require("a headless chromium", "install Debian's `chromium` and `chromium-driver` (apt-get install chromium "
                                       "chromium-driver) to run the layer-picker browser test")
    return browser, driver
