"""CanvasLayout and RegionSpec: geometry queries against hand-computed positions, and errors."""

from __future__ import annotations

import pytest
import torch

from canvas_engineering import CanvasLayout, RegionSpec


def test_two_dimensional_layout_positions():
    layout = CanvasLayout(
        T=3, H=4, W=5, d_model=8, regions={"a": (1, 3, 1, 3, 2, 4), "b": RegionSpec((0, 1, 0, 1, 0, 5))}
    )
    assert layout.spatial_shape == (4, 5) and layout.num_positions == 60 and layout.spatial_volume == 20
    # frame 1: base 20; rows 1..2, cols 2..3 -> 20 + 5*r + c
    assert layout.region_indices("a") == [27, 28, 32, 33, 47, 48, 52, 53]
    assert layout.region_indices_at_t("a", 2) == [47, 48, 52, 53]
    assert layout.region_indices_at_t("a", 0) == []
    assert layout.region_indices("b") == [0, 1, 2, 3, 4]
    assert layout.region_size("a") == (2, 2, 2) and layout.region_numel("a") == 8
    assert layout.region_timesteps("a") == [1, 2]
    assert layout.flat_index(2, 3, 4) == 2 * 20 + 3 * 5 + 4
    assert layout.region_spec("a") == RegionSpec((1, 3, 1, 3, 2, 4))


def test_one_and_three_dimensional_layouts():
    line = CanvasLayout(T=2, spatial_shape=(6,), d_model=4, regions={"r": (0, 2, 4, 6)})
    assert line.region_indices("r") == [4, 5, 10, 11] and line.H == 6 and line.W is None
    cube = CanvasLayout(T=1, spatial_shape=(2, 3, 4), d_model=4, regions={"c": (0, 1, 1, 2, 0, 2, 3, 4)})
    assert cube.region_indices("c") == [12 + 0 * 4 + 3, 12 + 1 * 4 + 3]
    assert cube.flat_index(0, 1, 2, 3) == 12 + 8 + 3


def test_output_mask_loss_weights_and_frames():
    layout = CanvasLayout(
        T=3,
        spatial_shape=(2,),
        d_model=4,
        t_current=1,
        regions={
            "out": RegionSpec((0, 3, 0, 1), loss_weight=2.0, period=2),
            "both": RegionSpec((0, 1, 0, 2), loss_weight=0.5),
            "ctx": RegionSpec((0, 3, 1, 2), is_output=False),
        },
    )
    assert layout.output_mask() == [2, 3, 4, 5]
    assert torch.equal(layout.loss_weight_mask(), torch.tensor([2.5, 0.5, 2.0, 0.0, 2.0, 0.0]))
    assert layout.real_frame("out", 2) == 4
    assert layout.canvas_frame("out", 4) == 2
    assert layout.canvas_frame("out", 3) is None
    assert layout.canvas_frame("out", 6) is None


@pytest.mark.parametrize(
    "regions, message",
    [
        ({"r": (0, 1, 0, 2)}, "expects 6"),
        ({"r": (0, 1, 0, 2, 0, 2, 0, 1)}, "expects 6"),
        ({"r": (0, 0, 0, 2, 0, 2)}, "empty"),
        ({"r": (0, 1, 3, 3, 0, 2)}, "empty"),
        ({"r": (0, 2, 0, 2, 0, 2)}, "leave the canvas on T"),
        ({"r": (0, 1, 0, 5, 0, 2)}, "spatial axis 0"),
        ({"r": (0, 1, -1, 2, 0, 2)}, "negative"),
        ({"r": (0, 1, 0, 2, 0)}, r"2 \+ 2\*n_spatial_dims"),
        ({"r": "0123"}, "must be a tuple"),
        ({"r": (0, 1.5, 0, 2, 0, 2)}, "integers"),
        ({"": (0, 1, 0, 2, 0, 2)}, "non-empty strings"),
    ],
)
def test_bad_bounds_are_refused(regions, message):
    with pytest.raises(ValueError, match=message):
        CanvasLayout(T=1, H=4, W=4, d_model=8, regions=regions)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"T": 0, "H": 2, "W": 2, "d_model": 4}, "T must be a positive integer"),
        ({"T": 1, "H": 2, "W": 0, "d_model": 4}, "spatial_shape"),
        ({"T": 1, "d_model": 4}, "spatial_shape .or H and W. is required"),
        ({"T": 1, "spatial_shape": (2,), "H": 2, "d_model": 4}, "either spatial_shape or H/W"),
        ({"T": 1, "H": 2, "W": 2, "d_model": 0}, "d_model"),
    ],
)
def test_bad_geometry_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CanvasLayout(**kwargs)


@pytest.mark.parametrize("period", [0, -3, 1.5, True])
def test_non_positive_period_is_refused(period):
    with pytest.raises(ValueError, match="period must be a positive integer"):
        RegionSpec((0, 1, 0, 1), period=period)


def test_region_spec_bounds_checked_on_their_own():
    with pytest.raises(ValueError, match="empty"):
        RegionSpec((2, 2, 0, 1))
    with pytest.raises(ValueError, match="default_attn"):
        RegionSpec((0, 1, 0, 1), default_attn="")
    assert RegionSpec([0, 1, 0, 1]).bounds == (0, 1, 0, 1)
