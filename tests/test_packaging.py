"""Packaging: the declared floors are the tested ones, and missing extras say what to install."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import inference_safeguard
from inference_safeguard.extras import MissingExtraError, import_extra

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
USER_EXTRAS = ("langchain", "llamaindex", "eval", "gguf", "serve")


def _floors() -> dict[str, str]:
    """Each runtime dependency's lower bound, by distribution name."""
    project = PYPROJECT["project"]
    declared = list(project["dependencies"])
    for extra in USER_EXTRAS:
        declared += project["optional-dependencies"][extra]
    floors = {}
    for line in declared:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{line!r} needs exactly one lower bound (>=)"
        floors[requirement.name.lower()] = lower[0]
    return floors


def _lowest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_declared_floor_is_pinned_by_the_lowest_versions_run():
    floors, pins = _floors(), _lowest_pins()
    mismatched = {
        name: (floor, pins.get(name))
        for name, floor in floors.items()
        if name not in pins or Version(pins[name]) != Version(floor)
    }
    assert not mismatched, f"floor in pyproject.toml vs pin in constraints-lowest.txt: {mismatched}"


def test_the_python_floor_is_the_interpreter_floor_of_the_tests():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def test_version_comes_from_the_installed_metadata():
    assert inference_safeguard.__version__ == importlib.metadata.version("inference-safeguard")


def test_a_missing_optional_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)  # `import rich` now fails as if absent
    with pytest.raises(MissingExtraError, match=r"inference-safeguard\[eval\]"):
        import_extra("rich", extra="eval", needed_by="the evaluation table")


def test_an_error_inside_an_installed_optional_dependency_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "broken_extra.py").write_text("import module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as error:
        import_extra("broken_extra", extra="eval", needed_by="a test")
    assert not isinstance(error.value, MissingExtraError)


@pytest.mark.parametrize(
    ("package", "dependency", "extra"),
    [
        ("langchain_safeguard", "langchain_core", "langchain"),
        ("llamaindex_safeguard", "llama_index", "llamaindex"),
    ],
)
def test_importing_an_integration_without_its_extra_says_which_extra(package, dependency, extra):
    code = f"import sys\nsys.modules[{dependency!r}] = None\nimport {package}\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert f'pip install "inference-safeguard[{extra}]"' in run.stderr
    assert "MissingExtraError" in run.stderr


def test_the_eval_command_without_its_extra_fails_before_loading_anything():
    code = (
        "import sys\n"
        "sys.modules['rich'] = None\n"
        "from inference_safeguard.cli import main\n"
        "sys.exit(main(['eval', '--limit', '1']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert 'pip install "inference-safeguard[eval]"' in run.stderr
    assert "Traceback" not in run.stderr
