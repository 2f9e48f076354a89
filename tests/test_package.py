"""``dir(pae)`` lists only subpackages that exist, found on disk (issue 11, item 9)."""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

import pytest

import pae

PAE_DIR = pathlib.Path(pae.__file__).parent


def _packages_on_disk(folder: pathlib.Path) -> set[str]:
    return {d.name for d in folder.iterdir()
            if d.is_dir() and (d / "__init__.py").is_file() and not d.name.startswith("_")}


def test_dir_lists_exactly_the_subpackages_that_exist_and_each_imports():
    listed = set(dir(pae))
    on_disk = _packages_on_disk(PAE_DIR)
    assert {"core", "data", "models", "optim", "train"} <= on_disk
    assert on_disk <= listed
    for name in ("quant", "sharing", "growth"):
        assert (name in listed) == (name in on_disk)
    for name in on_disk:
        assert getattr(pae, name) is importlib.import_module(f"pae.{name}")
    for name in ("Context", "Transform", "chain", "identity", "select", "__version__"):
        assert name in listed
    assert not any(n.startswith("_") and not n.startswith("__") for n in listed)  # no helpers


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'$"):
        pae.nonsense


def test_a_new_subpackage_appears_without_editing_the_list(tmp_path):
    """Load pae's __init__ over a folder with a new package: it is listed and importable."""
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "__init__.py").write_text("VALUE = 42\n")
    (tmp_path / "notes").mkdir()                       # a folder without __init__.py: not listed
    (tmp_path / "_private").mkdir()
    (tmp_path / "_private" / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(
        "pae_probe", PAE_DIR / "__init__.py", submodule_search_locations=[str(tmp_path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pae_probe"] = module
    try:
        spec.loader.exec_module(module)
        assert module._SUBPACKAGES == ("quant",)
        assert "quant" in dir(module) and "notes" not in dir(module) and "_private" not in dir(module)
        assert module.quant.VALUE == 42
    finally:
        for key in [k for k in sys.modules if k == "pae_probe" or k.startswith("pae_probe.")]:
            del sys.modules[key]
