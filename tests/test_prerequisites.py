"""Where ComfyUI v0.3.64's source comes from (an environment variable, the team's tarball, a clone of its tag), and
that tests needing a missing prerequisite are skipped with one summary line on a newcomer's machine but fail on CI."""
from __future__ import annotations

import subprocess
import tarfile
import textwrap

import pytest

import prerequisites

pytest_plugins = ["pytester"]
VERSION_FILE = '__version__ = "0.3.64"\n'


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No variable, no tarball, no cached tree, a clone source that does not exist, nothing remembered."""
    monkeypatch.delenv(prerequisites.COMFYUI_ENV, raising=False)
    monkeypatch.delenv("DF_TEST_REQUIRE_ALL", raising=False)
    monkeypatch.setattr(prerequisites, "STRICT", False)  # CI sets DF_TEST_REQUIRE_ALL=1 for the real suite
    monkeypatch.setattr(prerequisites, "COMFYUI_TARBALL", tmp_path / "shared" / "absent.tar.gz")
    monkeypatch.setattr(prerequisites, "COMFYUI_CACHE", tmp_path / "cache")
    monkeypatch.setattr(prerequisites, "COMFYUI_GIT", str(tmp_path / "no-such-repository"))
    monkeypatch.setattr(prerequisites, "_found", {})
    return tmp_path


def _source_tree(folder, version_file=VERSION_FILE):
    (folder / "comfy").mkdir(parents=True)
    (folder / "comfy" / "model_base.py").write_text("# stand-in\n")
    (folder / "comfyui_version.py").write_text(version_file)
    return folder


def test_the_variable_names_a_source_folder_or_a_tarball(nowhere, monkeypatch):
    tree = _source_tree(nowhere / "src" / "ComfyUI")
    monkeypatch.setenv(prerequisites.COMFYUI_ENV, str(tree))
    assert prerequisites.comfyui_source() == tree

    tarball = nowhere / "comfy.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname="ComfyUI")
    monkeypatch.setattr(prerequisites, "_found", {})
    monkeypatch.setenv(prerequisites.COMFYUI_ENV, str(tarball))
    unpacked = prerequisites.comfyui_source()
    assert unpacked == nowhere / "cache" / "ComfyUI"
    assert (unpacked / "comfyui_version.py").read_text() == VERSION_FILE


def test_a_wrong_variable_is_an_error_not_a_skip(nowhere, monkeypatch):
    monkeypatch.setenv(prerequisites.COMFYUI_ENV, str(nowhere / "missing"))
    with pytest.raises(FileNotFoundError, match="DF_COMFYUI_0364=.*missing: no such folder or tarball"):
        prerequisites.comfyui_source()
    other = _source_tree(nowhere / "old" / "ComfyUI", '__version__ = "0.3.40"\n')
    monkeypatch.setenv(prerequisites.COMFYUI_ENV, str(other))
    with pytest.raises(ValueError, match=r"not ComfyUI v0\.3\.64's source .*0\.3\.40"):
        prerequisites.comfyui_source()


def test_the_tag_is_cloned_where_nothing_else_is_there(nowhere, monkeypatch):
    upstream = _source_tree(nowhere / "upstream")
    git = ["git", "-C", str(upstream), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(upstream)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "v0.3.64"], check=True)
    subprocess.run([*git, "tag", "v0.3.64"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(prerequisites, "COMFYUI_GIT", str(upstream))

    monkeypatch.setattr(prerequisites, "COMFYUI_COMMIT", "0" * 8)  # a tag moved elsewhere is refused
    with pytest.raises(pytest.skip.Exception, match=f"points at {head[:12]}, not 00000000"):
        prerequisites.comfyui_source()
    assert not (nowhere / "cache" / "ComfyUI").exists()

    monkeypatch.setattr(prerequisites, "_found", {})
    monkeypatch.setattr(prerequisites, "COMFYUI_COMMIT", head[:8])
    tree = prerequisites.comfyui_source()
    assert tree == nowhere / "cache" / "ComfyUI"
    assert (tree / "comfyui_version.py").read_text() == VERSION_FILE and not (tree / ".git").exists()


_THREE_TESTS = textwrap.dedent("""
    import pytest
    import prerequisites

    @pytest.fixture(scope="module", params=["a", "b"])
    def comfy(request):  # as conftest's fixtures ask for it
        return prerequisites.comfyui_source()

    def test_one(comfy):
        pass

    def test_two():
        prerequisites.comfyui_source()
""")


def test_missing_source_skips_its_tests_with_one_summary_line(nowhere, pytester):
    pytester.makepyfile(test_needs_comfy=_THREE_TESTS)
    result = pytester.runpytest_inprocess("-ra", "-p", "prerequisites", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=3)
    lines = [line for line in result.outlines if line.startswith("SKIPPED")]
    assert len(lines) == 1 and lines[0].startswith("SKIPPED [3]"), lines
    assert "ComfyUI v0.3.64's source is not available: set DF_COMFYUI_0364" in lines[0]


def test_ci_fails_instead_of_skipping(nowhere, pytester, monkeypatch):
    monkeypatch.setenv("DF_TEST_REQUIRE_ALL", "1")
    monkeypatch.setattr(prerequisites, "STRICT", True)
    pytester.makepyfile(test_needs_comfy=_THREE_TESTS)
    result = pytester.runpytest_inprocess("-p", "prerequisites", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, errors=2)  # the fixture's two params error in setup, the direct call fails
    assert "DF_TEST_REQUIRE_ALL=1: every test must run" in result.stdout.str()
