"""AttentionDispatcher: run each connection of a topology with its own attention type."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from canvas_engineering.attention import (
    ATTENTION_REGISTRY,
    check_options,
    create_attention,
    format_options,
    type_options,
    unknown_attention_message,
)
from canvas_engineering.attention.base import SegmentAttention
from canvas_engineering.attention.validation import check_dropout, check_heads
from canvas_engineering.canvas import CanvasLayout
from canvas_engineering.connectivity import CanvasTopology
from canvas_engineering.ops.segments import SegmentIndex
from canvas_engineering.plan import ExecutionPlan, Segment, compile_segments, resolve_connections

CPU = torch.device("cpu")


def run_segment_by_segment(
    module: nn.Module, query_rows: torch.Tensor, key_rows: torch.Tensor, index: SegmentIndex
) -> torch.Tensor:
    """The grouped call for a type without ``forward_segments`` (a custom registered one):
    its ``forward(queries, keys, values)`` once per segment, outputs packed ``(B, Tq, D)``."""
    outputs = []
    query_starts, key_starts = index.query_offsets, index.keyset_offsets
    for (n, m), query_start, keyset in zip(index.shapes, query_starts, index.keyset_of):
        queries = query_rows[:, index.query_source.index[query_start : query_start + n]]
        keys = key_rows[:, index.key_source.index[key_starts[keyset] : key_starts[keyset] + m]]
        outputs.append(module(queries, keys, keys))
    return torch.cat(outputs, dim=1) if outputs else query_rows[:, :0]


def check_fn_kwargs(fn_kwargs: Mapping | None, used: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``fn_kwargs`` (attention type name -> constructor options) as a copy of plain dicts,
    checked against the registry and against ``used``, the types the connections run.

    Raises:
        TypeError: when ``fn_kwargs`` or an entry is not a mapping, a key is not a string,
            or an option is one the type does not take (the message lists those it takes).
        ValueError: for a name that is not registered (listing the registered ones) or a
            type that no connection runs (listing those that run).
    """
    if fn_kwargs is None:
        return {}
    if not isinstance(fn_kwargs, Mapping):
        raise TypeError(
            f"AttentionDispatcher: fn_kwargs must be a dict of attention type name -> dict of options, "
            f"got {type(fn_kwargs).__name__}"
        )
    checked: dict[str, dict[str, Any]] = {}
    for fn, options in fn_kwargs.items():
        if not isinstance(fn, str):
            raise TypeError(f"AttentionDispatcher: fn_kwargs keys must be attention type names (strings), got {fn!r}")
        if fn not in ATTENTION_REGISTRY:
            raise ValueError(f"AttentionDispatcher: fn_kwargs: {unknown_attention_message(fn)}")
        if fn not in used:
            raise ValueError(
                f"AttentionDispatcher: fn_kwargs sets options for {fn!r}, which no connection runs; "
                f"the connections run {sorted(used)}"
            )
        if not isinstance(options, Mapping) or not all(isinstance(name, str) for name in options):
            raise TypeError(
                f"AttentionDispatcher: fn_kwargs[{fn!r}] must be a dict of option name (string) -> value, "
                f"got {options!r}"
            )
        check_options("AttentionDispatcher: fn_kwargs", fn, options)
        checked[fn] = dict(options)
    return checked


class AttentionDispatcher(nn.Module):
    """One attention layer over a canvas, with a per-connection attention type.

    Every connection's src positions (queries) read its dst positions (keys and values)
    through the connection's resolved type (``connection.fn``, else the src region's
    ``default_attn``, else ``"cross_attention"``). All connections of one type share one
    module. Each position's result is the weighted average of the outputs of the
    connections into it (weights from the connections, or from the temporal fill);
    positions that no active connection writes pass through unchanged.

    The topology is compiled once into an :class:`ExecutionPlan`: a forward runs each
    attention type once, over all of its edges, frames and fill anchors together
    (``explain()`` shows the plan, and lists the connections that run nothing: every
    frame dropped, an offset outside the canvas, a region skipped with ``strict=False``).

    Args:
        topology: the connections.
        layout: the canvas geometry; its regions must include every region a connection names.
        d_model: width of the hidden states; must be divisible by ``n_heads``.
        n_heads: heads of the multi-head types.
        dropout: dropout on attention weights.
        skip_temporal: ignore ``t_src``/``t_dst`` and run every connection dense in time.
        strict: raise for a connection naming a region the layout lacks; with False such
            edges are skipped with a warning.
        fn_kwargs: constructor options per attention type, e.g. ``{"hyena": {"max_len":
            16384}, "local_attention": {"window_size": 16}}``; each named type must be one
            that a connection runs. Types not named are built with their defaults.

    Attributes:
        segments: the compiled segments, in declaration order.
        idle_connections: ``(index, reason)`` of every declared connection that runs nothing.
        fn_kwargs: the options given per type (a copy of the argument; ``explain()`` shows
            every type's options with the defaults).

    Raises:
        ValueError: at construction, for bad geometry, a missing region (strict), an unknown
            attention type (the message lists the registered ones), bad sizes, a dropout
            outside [0, 1], or ``fn_kwargs`` naming a type that no connection runs or giving
            a bad option value.
        TypeError: for a topology, layout or connection of the wrong class, or ``fn_kwargs``
            with an option its type does not take (the message lists those it takes).
    """

    def __init__(
        self,
        topology: CanvasTopology,
        layout: CanvasLayout,
        d_model: int,
        n_heads: int = 4,
        dropout: float = 0.0,
        skip_temporal: bool = False,
        *,
        strict: bool = True,
        fn_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        super().__init__()
        check_heads("AttentionDispatcher", d_model, n_heads)
        d_model, n_heads = operator.index(d_model), operator.index(n_heads)
        dropout = check_dropout("AttentionDispatcher", dropout)
        if not isinstance(topology, CanvasTopology):
            raise TypeError(f"AttentionDispatcher: topology must be a CanvasTopology, got {type(topology).__name__}")
        if not isinstance(layout, CanvasLayout):
            raise TypeError(f"AttentionDispatcher: layout must be a CanvasLayout, got {type(layout).__name__}")
        layout.validate()
        self.topology = topology
        self.layout = layout
        self.d_model = d_model
        self.n_heads = n_heads
        self.skip_temporal = skip_temporal
        connections, skipped = resolve_connections(topology, layout, strict)
        segments, idle = compile_segments(connections, layout, skip_temporal)
        self.segments: list[Segment] = segments
        self.idle_connections: list[tuple[int, str]] = sorted(skipped + idle)
        used = list(dict.fromkeys(fn for _, _, fn in connections))
        self.fn_kwargs = check_fn_kwargs(fn_kwargs, used)
        self.fn_modules = nn.ModuleDict(
            {fn: create_attention(fn, d_model, n_heads, dropout, **self.fn_kwargs.get(fn, {})) for fn in used}
        )
        self._plans: dict[tuple[frozenset[str] | None, torch.device], ExecutionPlan] = {}
        self.plan()

    def plan(self, active_regions: frozenset[str] | None = None, device: torch.device = CPU) -> ExecutionPlan:
        """The execution plan for an active-region set on a device (compiled once, cached).

        A new plan is prepared at once: each module builds what it derives from its group's
        index, so a forward only looks things up.
        """
        key = (active_regions, torch.device(device))
        if key not in self._plans:
            cpu_key = (active_regions, torch.device("cpu"))
            if cpu_key not in self._plans:
                self._plans[cpu_key] = self._prepared(
                    ExecutionPlan.build(self.segments, self.layout.num_positions, active_regions)
                )
            if key != cpu_key:
                self._plans[key] = self._prepared(self._plans[cpu_key].to(device))
        return self._plans[key]

    def _prepared(self, plan: ExecutionPlan) -> ExecutionPlan:
        for group in plan.groups:
            module = self.fn_modules[group.fn]
            if isinstance(module, SegmentAttention):
                module.prepare(group.index)
        return plan

    def _apply(self, fn, recurse=True):
        """After ``.to()``/``.cuda()``, compile the default plan for the new device at once
        (not for the meta device, whose tensors hold no index data)."""
        result = super()._apply(fn, recurse)
        parameter = next(self.parameters(), None)
        if parameter is not None and parameter.device.type != "meta":
            self.plan(None, parameter.device)
        return result

    def explain(self, active_regions: Iterable[str] | None = None) -> str:
        """A readable table of what a forward runs: per attention type its segments, key
        sets, packed rows, padded batches, query-key pairs, complexity (the class's
        ``complexity``) and options (defaults included); then every declared connection
        that runs nothing, with the reason."""
        active = self.check_active_regions(active_regions)
        idle = dict(self.idle_connections)
        if active is not None:
            for segment in self.segments:
                if segment.src not in active:
                    idle.setdefault(segment.connection_index, f"src {segment.src!r} is not in active_regions")
        connections = self.topology.connections
        lines = [
            f"connection {i} ({connections[i].src!r} -> {connections[i].dst!r}): {reason}"
            for i, reason in sorted(idle.items())
        ]
        complexity, options = {}, {}
        for fn, module in self.fn_modules.items():
            declared = getattr(type(module), "complexity", "not declared")
            complexity[fn] = (
                declared if isinstance(module, SegmentAttention) else f"{declared} (runs segment by segment)"
            )
            options[fn] = format_options({**type_options(type(module)), **self.fn_kwargs.get(fn, {})}) or "-"
        return self.plan(None if active is None else frozenset(active)).explain(complexity, options, lines)

    def check_active_regions(self, active_regions: Iterable[str] | None) -> set[str] | None:
        """``active_regions`` as a set of layout region names (None stays None).

        Raises:
            TypeError: for a single string (pass ``{name}``) or an entry that is not a string.
            ValueError: for a name the layout lacks.
        """
        if active_regions is None:
            return None
        if isinstance(active_regions, (str, bytes)):
            raise TypeError(
                f"AttentionDispatcher: active_regions must be a collection of region names, got the "
                f"string {active_regions!r}; pass {{{active_regions!r}}} for one region"
            )
        active = list(active_regions)
        wrong = [name for name in active if not isinstance(name, str)]
        if wrong:
            raise TypeError(f"AttentionDispatcher: active_regions must hold region names (strings), got {wrong!r}")
        unknown = sorted(set(active) - set(self.layout.regions))
        if unknown:
            raise ValueError(
                f"AttentionDispatcher: active_regions names unknown region(s) {unknown}; "
                f"layout regions: {sorted(self.layout.regions)}"
            )
        return set(active)

    def check_input(self, x: torch.Tensor, active_regions: Iterable[str] | None) -> set[str] | None:
        """Validate a forward's arguments; returns ``active_regions`` as a set.

        Raises:
            TypeError: when x is not a floating-point tensor, or for ``active_regions``
                that is a string or holds a non-string.
            ValueError: for a shape other than ``(B, num_positions, d_model)``, a device or
                dtype other than the parameters', a tensor on the meta device, or an
                unknown region in ``active_regions``.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"AttentionDispatcher: x must be a floating-point tensor of shape (B, "
                f"{self.layout.num_positions}, {self.d_model}), got "
                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        expected = ("B", self.layout.num_positions, self.d_model)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected[1:]:
            raise ValueError(f"AttentionDispatcher: expected x of shape {expected}, got {tuple(x.shape)}")
        parameter = next(self.parameters(), None)
        if parameter is not None and (x.device != parameter.device or x.dtype != parameter.dtype):
            raise ValueError(
                f"AttentionDispatcher: x is {x.dtype} on {x.device} but the parameters are "
                f"{parameter.dtype} on {parameter.device}; move one to match (e.g. "
                f"dispatcher.to(x.device, x.dtype))"
            )
        if x.device.type == "meta":
            raise ValueError(
                "AttentionDispatcher: x is on the meta device, which holds no data, and the plan's "
                "index tensors need data; materialise the dispatcher first (dispatcher.to_empty(device=...) "
                "and load a state_dict) and pass x on that device"
            )
        return self.check_active_regions(active_regions)

    def forward(self, x: torch.Tensor, active_regions: Iterable[str] | None = None) -> torch.Tensor:
        """Run every active connection and combine.

        Args:
            x: ``(B, num_positions, d_model)`` hidden states over the canvas.
            active_regions: if given, only connections whose src is in it run; the other
                positions pass through.

        Returns:
            ``(B, num_positions, d_model)``: per position, the weighted average of the
            outputs written to it, or ``x`` where nothing was written. A zero-size batch
            (B = 0) runs too: an empty output, and zero gradients for the parameters.
        """
        active = self.check_input(x, active_regions)
        plan = self.plan(None if active is None else frozenset(active), x.device)
        accumulator_dtype = torch.promote_types(x.dtype, torch.float32)
        output = None
        for group in plan.groups:
            module = self.fn_modules[group.fn]
            query_rows, key_rows = group.query_positions.take(x), group.key_positions.take(x)
            if isinstance(module, SegmentAttention):
                attended = module.forward_segments(query_rows, key_rows, key_rows, group.index)
            else:
                attended = run_segment_by_segment(module, query_rows, key_rows, group.index)
            weighted = attended.to(accumulator_dtype) * group.row_shares.to(accumulator_dtype).view(1, -1, 1)
            if output is None and group.covers_canvas:
                output = weighted
            else:
                output = output if output is not None else x.new_zeros(x.shape, dtype=accumulator_dtype)
                output = output.index_add(1, group.row_positions, weighted)
        if output is None:
            return x
        output = output.to(x.dtype)
        return output if plan.all_written else torch.where(plan.written.view(1, -1, 1), output, x)

    def extra_repr(self) -> str:
        counts: dict[str, int] = {}
        for segment in self.segments:
            counts[segment.fn] = counts.get(segment.fn, 0) + 1
        summary = ", ".join(f"{fn}={n}" for fn, n in sorted(counts.items()))
        options = f", fn_kwargs={self.fn_kwargs}" if self.fn_kwargs else ""
        return f"{len(self.segments)} segments, {len(self.fn_modules)} fn types: {summary}{options}"
