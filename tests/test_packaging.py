"""The distribution ships every package of the source tree, and names the versions it cannot run with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library from Python 3.11")
def test_every_package_is_listed():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "canvas_engineering").rglob("__init__.py")}
    found.add("canvas_engineering.kernels")
    assert found == listed
    assert config["package-dir"]["canvas_engineering.kernels"] == "kernels"


@pytest.mark.parametrize(
    "triton_version, numpy_version, refused",
    [
        ("3.6.0", "2.4.6", True),
        ("3.8.1", "2.4.0rc1", True),
        ("3.6.0", "2.3.5", False),
        ("3.9.0", "2.4.6", False),
        ("3.10.0", "3.0.0", False),
    ],
)
def test_interpreter_versions_that_cannot_work_together_are_named(triton_version, numpy_version, refused):
    """Triton's interpreter before 3.9 fails inside every kernel under numpy >= 2.4; the
    interpreter context says so up front, with both versions and the way out."""
    from canvas_engineering.ops.backend import check_interpreter_versions

    if refused:
        with pytest.raises(
            RuntimeError, match=rf"Triton {triton_version}'s interpreter needs numpy < 2.4, found numpy {numpy_version}"
        ):
            check_interpreter_versions(triton_version, numpy_version)
    else:
        check_interpreter_versions(triton_version, numpy_version)
