"""Adding a built-in attention type the way the README's "Adding an attention type" says:
in a copy of the package, a module file and one registration line, nothing else. Everything
derived from the registry then knows the type: ATTENTION_TYPES, create_attention and its
option checks, the dispatcher's fn_kwargs, explain(), and the README table's row."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import canvas_engineering

PACKAGE = Path(canvas_engineering.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
REGISTRATION = re.compile(r"^BUILTIN_ATTENTION\b[^\n]*= \{$", re.MULTILINE)
"""The line that opens the built-in registry (whatever its type annotation)."""

TOY_MODULE = '''"""A toy type: every query reads a scaled mean of its keys' values."""

from __future__ import annotations

import torch
import torch.nn as nn


class ToyMeanAttention(nn.Module):
    """``scale`` times the mean of the values, broadcast to every query."""

    complexity = "O(N+M)"
    description = "scale × mean of dst, broadcast"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, scale: float = 2.0):
        super().__init__()
        self.scale = scale

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, D)``, keys/values ``(B, M, D)`` -> ``(B, N, D)``."""
        return (self.scale * values.mean(dim=1, keepdim=True)).expand_as(queries)
'''

CHECKS = """
import sys
from pathlib import Path

import pytest
import torch

import canvas_engineering
from canvas_engineering import (
    ATTENTION_TYPES, AttentionDispatcher, CanvasLayout, CanvasTopology, Connection, create_attention,
)
from test_registry import registry_table

package = Path(canvas_engineering.__file__).resolve()
assert package.is_relative_to(Path(sys.argv[1]).resolve()), package
assert "scale × mean of dst, broadcast" in ATTENTION_TYPES["toy_mean"] and "O(N+M)" in ATTENTION_TYPES["toy_mean"]
from canvas_engineering.canvas import ATTENTION_TYPES as declared
assert declared is ATTENTION_TYPES
assert "| `toy_mean` | `ToyMeanAttention` | O(N+M) | `scale=2.0` | scale × mean of dst, broadcast |" in registry_table()
unknown_option = r"'toy_mean' \\(ToyMeanAttention\\) takes no option 'scal'; its options: scale=2.0 "
with pytest.raises(TypeError, match=unknown_option):
    create_attention("toy_mean", 4, scal=1.0)

layout = CanvasLayout(T=1, spatial_shape=(5,), d_model=4, regions={"a": (0, 1, 0, 2), "b": (0, 1, 2, 5)})
topology = CanvasTopology([Connection("a", "b", fn="toy_mean"), Connection("b", "b")])
dispatcher = AttentionDispatcher(topology, layout, d_model=4, n_heads=2, fn_kwargs={"toy_mean": {"scale": 3.0}})
x = torch.randn(2, 5, 4, dtype=torch.float64)
output = dispatcher.double()(x)
expected = x[:, 2:].sum(dim=1, keepdim=True)  # 3 times the mean of b's 3 rows
assert ((output[:, :2] - expected).abs() <= 1e-12 * expected.abs().max()).all()
(row,) = [line for line in dispatcher.explain().splitlines() if line.startswith("toy_mean ")]
assert "O(N+M) (runs segment by segment)" in row and row.rstrip().endswith("scale=3.0"), row
assert "fn_kwargs={'toy_mean': {'scale': 3.0}}" in repr(dispatcher)
print("ok")
"""


def changed_files(original: Path, copy: Path) -> set:
    """Paths (relative to ``copy``) of the files that are new or differ in ``copy``."""
    comparison = filecmp.dircmp(original, copy, ignore=["__pycache__"])
    changed = {name for name in comparison.right_only + comparison.diff_files}
    for name in comparison.subdirs:
        changed |= {f"{name}/{path}" for path in changed_files(original / name, copy / name)}
    return changed


def test_a_type_added_as_the_readme_says_is_known_everywhere(tmp_path):
    copy = tmp_path / "canvas_engineering"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    (tmp_path / "kernels").symlink_to(PACKAGE.parent / "kernels")
    (copy / "attention" / "toy.py").write_text(TOY_MODULE, encoding="utf-8")
    registration = copy / "attention" / "__init__.py"
    source = registration.read_text(encoding="utf-8")
    (opening,) = REGISTRATION.findall(source)
    registration.write_text(
        source.replace(
            opening,
            "from canvas_engineering.attention.toy import ToyMeanAttention\n\n"
            f'{opening}\n    "toy_mean": ToyMeanAttention,',
        ),
        encoding="utf-8",
    )
    assert changed_files(PACKAGE, copy) == {"attention/toy.py", "attention/__init__.py"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)]), "CANVAS_DISABLE_TRITON": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", CHECKS, str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-4000:]
