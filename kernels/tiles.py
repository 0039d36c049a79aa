"""Register tiles the scan kernels share: a walk loads a tile of steps at once and takes its
steps from registers, one at a time."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_row(tile, rows, row):
    """Row ``row`` of ``tile (ROWS, columns)``, whose rows are numbered ``rows (ROWS,)``:
    ``(columns,)``, from registers."""
    return tl.sum(tl.where((rows == row)[:, None], tile, 0.0), axis=0)
