"""The execution plan: constant work per forward in the number of edges and frames, no
canvas-wide score matrix, and a readable explain()."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from canvas_engineering import AttentionDispatcher, CanvasLayout, CanvasTopology, Connection, RegionSpec, TemporalFill
from canvas_engineering.ops.segments import RowSelection

LAYOUT_ONLY = {torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.contiguous.default}
ROW_SELECTION = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.slice_backward.default,
    torch.ops.aten.index_select.default,
    torch.ops.aten.index_add.default,
    torch.ops.aten.zeros.default,
}
FUSED_PAIRS = {torch.ops.aten.addmm.default}


class OperatorLog(TorchDispatchMode):
    """Counts operators: ``count`` all but views and layout copies (whether a reshape is a
    view or a copy depends on whether a batch dimension is 1, not on the work), and
    ``compute`` those that are not row selections either (a selection of rows that happen to
    be a range is a view; otherwise it is a gather, and a zero-fill plus scatter backward).
    ``addmm`` counts as the matrix product and the add it fuses, which a linear layer runs
    separately or fused depending on its input's layout. It also records the largest tensor
    any operator returns."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.compute = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in LAYOUT_ONLY:
            weight = 2 if func in FUSED_PAIRS else 1
            self.count += weight
            self.compute += weight * (func not in ROW_SELECTION)
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def run_logged(dispatcher: AttentionDispatcher, x: torch.Tensor) -> OperatorLog:
    """Forward and backward under the log, after one untimed call that fills the caches."""
    dispatcher(x).sum().backward()
    log = OperatorLog()
    with log:
        dispatcher(x.clone().requires_grad_(True)).sum().backward()
    return log


ROWS = 10


def row_layout(T: int = 2) -> CanvasLayout:
    """ROWS regions of the same shape: row i of a (ROWS, 4) grid, over all T frames."""
    return CanvasLayout(
        T=T, spatial_shape=(ROWS, 4), d_model=16, regions={f"r{i}": (0, T, i, i + 1, 0, 4) for i in range(ROWS)}
    )


def edges(n_edges: int, fns) -> CanvasTopology:
    pairs = [(s, d) for s in range(ROWS) for d in range(ROWS) if s != d]
    return CanvasTopology(
        [Connection(f"r{s}", f"r{d}", fn=fns[i % len(fns)]) for i, (s, d) in enumerate(pairs[:n_edges])]
    )


TYPE_PAIRS = [
    ("cross_attention", "linear_attention"),
    ("cosine_attention", "sigmoid_attention"),
    ("gated", "perceiver"),
    ("pooling", "copy"),
    ("mamba", "rwkv"),
    ("hyena", "none"),
    ("sparse_attention", "local_attention"),
    ("random_fixed", "mixture"),
    ("cogvideox", "self_attention"),
]


def row_selections(dispatcher: AttentionDispatcher) -> int:
    """How many row selections the plan holds, with what the ops and modules derived from
    its indexes (``SegmentIndex.derived``): each may be a view or a gather."""

    def count(obj) -> int:
        if isinstance(obj, RowSelection):
            return 1
        if isinstance(obj, dict):
            return sum(count(value) for value in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(count(item) for item in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return sum(count(getattr(obj, f.name)) for f in dataclasses.fields(obj))
        return 0

    return count(dispatcher.plan())


def assert_constant_work(dispatchers, make_input):
    """The same compute operators for every dispatcher; all operators together differ by no
    more than three per row selection of the largest plan (a gather forward, a zero-fill and
    a scatter backward), a bound set by the plan's structure, not by its edges or frames."""
    logs = [run_logged(d, make_input(d)) for d in dispatchers]
    assert len({log.compute for log in logs}) == 1, [log.compute for log in logs]
    spread = max(log.count for log in logs) - min(log.count for log in logs)
    assert spread <= 3 * max(row_selections(d) for d in dispatchers), [log.count for log in logs]


@pytest.mark.parametrize("fns", TYPE_PAIRS, ids=["+".join(p) for p in TYPE_PAIRS])
def test_operator_count_does_not_grow_with_edges(fns):
    torch.manual_seed(0)
    x = torch.randn(2, 2 * ROWS * 4, 16, requires_grad=True)
    dispatchers = [AttentionDispatcher(edges(n, fns), row_layout(), d_model=16, n_heads=2) for n in (2, 20, 40)]
    assert_constant_work(dispatchers, lambda d: x)


@pytest.mark.parametrize("fns", [("cross_attention", "rwkv", "mamba"), ("local_attention", "hyena", "perceiver")])
def test_operator_count_does_not_grow_with_frames(fns):
    dispatchers = []
    for T in (2, 8, 16):
        layout = CanvasLayout(
            T=T,
            spatial_shape=(3, 4),
            d_model=16,
            regions={
                name: RegionSpec((0, T, i, i + 1, 0, 4), default_attn=fn)
                for i, (name, fn) in enumerate(zip("abc", fns))
            },
        )
        topology = CanvasTopology.causal_temporal(["a", "b", "c"], temporal_fill=TemporalFill.HOLD)
        torch.manual_seed(0)
        dispatchers.append(AttentionDispatcher(topology, layout, d_model=16, n_heads=2))
    assert_constant_work(dispatchers, lambda d: torch.randn(2, d.layout.num_positions, 16, requires_grad=True))


def test_no_canvas_wide_matrix():
    """Every tensor a forward and backward make is far smaller than positions x positions."""
    layout = row_layout(T=16)
    positions = layout.num_positions
    topology = edges(
        40, ["cross_attention", "local_attention", "sparse_attention", "sigmoid_attention", "random_fixed"]
    )
    dispatcher = AttentionDispatcher(topology, layout, d_model=16, n_heads=2)
    log = run_logged(dispatcher, torch.randn(1, positions, 16, requires_grad=True))
    assert log.largest < positions * positions / 4, (log.largest, positions * positions)


def test_plan_is_compiled_once_per_device_and_active_set():
    dispatcher = AttentionDispatcher(edges(6, ["cross_attention", "rwkv"]), row_layout(), d_model=16, n_heads=2)
    x = torch.randn(1, row_layout().num_positions, 16)
    dispatcher(x)
    plan = dispatcher.plan()
    dispatcher(x)
    assert dispatcher.plan() is plan
    dispatcher(x, active_regions={"r0", "r1"})
    active_plan = dispatcher.plan(frozenset({"r0", "r1"}))
    dispatcher(x, active_regions=["r1", "r0"])
    assert dispatcher.plan(frozenset({"r0", "r1"})) is active_plan
    assert {g.fn for g in active_plan.groups} <= {"cross_attention", "rwkv"}
    assert all(s.src in {"r0", "r1"} for g in active_plan.groups for s in g.segments)


def test_segments_reading_the_same_rows_share_a_key_set():
    layout = CanvasLayout(
        T=4, spatial_shape=(2,), d_model=16, regions={"a": (0, 4, 0, 1), "slow": RegionSpec((0, 2, 1, 2), period=2)}
    )
    topology = CanvasTopology(
        [Connection("a", "slow", t_src=0, t_dst=0, fn="rwkv"), Connection("a", "slow", t_src=0, t_dst=-1, fn="rwkv")]
    )
    plan = AttentionDispatcher(topology, layout, d_model=16, n_heads=2).plan()
    (group,) = plan.groups
    assert len(group.segments) == 7
    assert len(group.index.keyset_sizes) == 2


def test_explain_lists_every_group():
    topology = edges(12, ["cross_attention", "mamba", "pooling"])
    dispatcher = AttentionDispatcher(topology, row_layout(), d_model=16, n_heads=2)
    table = dispatcher.explain()
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["fn", "segments", "key"]
    assert [line.split()[0] for line in lines[2:5]] == ["cross_attention", "mamba", "pooling"]
    assert [int(line.split()[1]) for line in lines[2:5]] == [4, 4, 4]
    for line, module in zip(lines[2:5], dispatcher.fn_modules.values()):
        assert f"  {type(module).complexity}  " in line
    assert lines[-1].startswith("3 groups")
