"""dd_jax.optional: one line naming the package and its pin; the pins are pyproject.toml's, as are the carry list's."""

from __future__ import annotations

import os
import re
import sys
import tomllib

import pytest

from dd_jax import optional, psd_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(lines) -> dict[str, str]:
    """{normalized name: version} of the `name==version` lines (markers and comments dropped)."""
    out = {}
    for line in lines:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^;#\s]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def pyproject_pins() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return _pins(tomllib.load(f)["project"]["dependencies"])


def test_pins_are_pyprojects():
    assert _pins(optional.PINS.values()).items() <= pyproject_pins().items()


def test_carry_list_pins_pyprojects_versions():
    with open(os.path.join(ROOT, "requirements-gpu-host.txt")) as f:
        carry = _pins(f)
    assert "grain" in carry and "ml-collections" in carry
    shared = {k: v for k, v in carry.items() if k in pyproject_pins()}
    assert shared == {k: pyproject_pins()[k] for k in shared}


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "psd_tools", None)  # import psd_tools -> ModuleNotFoundError
    with pytest.raises(ValueError) as e:
        psd_layers.check_available()
    assert isinstance(e.value, ImportError)
    assert str(e.value) == "decompose --format psd needs psd-tools: pip install psd-tools==1.10.4"


def test_a_missing_dependency_of_the_package_is_named(monkeypatch):
    def fake(name):
        raise ModuleNotFoundError("No module named 'aggdraw'", name="aggdraw")
    monkeypatch.setattr(optional.importlib, "import_module", fake)
    with pytest.raises(optional.MissingPackage, match=r"^decompose --format psd needs psd-tools \(No module named "
                                                      r"'aggdraw'\): pip install psd-tools==1\.10\.4$"):
        optional.require("psd_tools", "decompose --format psd")


def test_inference_fit_names_grain_when_it_is_missing(monkeypatch, capsys, tmp_path):
    from dd_jax import inference

    monkeypatch.setitem(sys.modules, "grain", None)
    assert inference._fit_main(["--data", str(tmp_path), "--checkpoint", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: python -m dd_jax.inference --data needs grain: "
                                       "pip install grain==0.2.18\n")


def test_a_folder_of_the_name_is_not_the_package(tmp_path, monkeypatch):
    (tmp_path / "dd_jax_stray").mkdir()  # e.g. /tmp/gradio (gradio_client's downloads) with /tmp the working folder
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(optional.MissingPackage, match=r"^a feature needs dd_jax_stray: pip install dd_jax_stray$"):
        optional.require("dd_jax_stray", "a feature")
    monkeypatch.delitem(sys.modules, "dd_jax_stray", raising=False)


def test_a_package_of_an_extra_names_the_extra():
    assert optional.message("gradio", "python -m dd_jax.app") == ('python -m dd_jax.app needs gradio: pip install -e '
                                                                 '".[app]"')
