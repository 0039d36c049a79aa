"""random_fixed: a seeded pattern stored in the state_dict, O(N*K), stable across shapes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from conftest import relative_error

from canvas_engineering import RandomFixedAttention


def dense_oracle(module, queries, keys, values):
    """Softmax over a dense N x M mask built from the module's pattern (test-only)."""
    n, m, h = queries.shape[1], keys.shape[1], module.n_heads
    split = lambda t: t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)
    q, k, v = split(module.q_proj(queries)), split(module.k_proj(keys)), split(module.v_proj(values))
    mask = torch.full((n, m), float("-inf"), dtype=queries.dtype)
    for row, keys_of_row in enumerate(module.pattern(n, m, queries.device).tolist()):
        mask[row, keys_of_row] = 0.0
    weights = F.softmax(q @ k.transpose(-2, -1) * module.scale + mask, dim=-1)
    return module.out_proj((weights @ v).transpose(1, 2).reshape(queries.shape[0], n, -1))


def test_output_matches_dense_masked_softmax():
    torch.manual_seed(0)
    module = RandomFixedAttention(16, 4, n_random=3, seed=11)
    for n, m in [(5, 9), (9, 5), (4, 2)]:
        queries, keys, values = torch.randn(2, n, 16), torch.randn(2, m, 16), torch.randn(2, m, 16)
        assert relative_error(module(queries, keys, values), dense_oracle(module, queries, keys, values)) < 1e-6


def test_pattern_rows_hold_distinct_keys():
    module = RandomFixedAttention(8, 2, n_random=4, seed=3)
    pattern = module.pattern(50, 7, torch.device("cpu"))
    assert pattern.shape == (50, 4)
    assert all(len(set(row)) == 4 and all(0 <= key < 7 for key in row) for row in pattern.tolist())
    assert module.pattern(6, 2, torch.device("cpu")).shape == (6, 2)


def test_pattern_is_stable_across_shapes_and_seeded():
    module = RandomFixedAttention(8, 2, seed=5)
    first = module.pattern(10, 20, torch.device("cpu")).clone()
    module.pattern(7, 3, torch.device("cpu"))
    assert torch.equal(module.pattern(10, 20, torch.device("cpu")), first)
    assert torch.equal(RandomFixedAttention(8, 2, seed=5).pattern(10, 20, torch.device("cpu")), first)
    assert not torch.equal(RandomFixedAttention(8, 2, seed=6).pattern(10, 20, torch.device("cpu")), first)


def test_pattern_is_uniform():
    rows, keys, chosen = 20000, 10, 3
    pattern = RandomFixedAttention(8, 2, n_random=chosen, seed=1).pattern(rows, keys, torch.device("cpu"))
    counts = torch.bincount(pattern.flatten(), minlength=keys).double()
    expected = rows * chosen / keys
    sigma = math.sqrt(rows * (chosen / keys) * (1 - chosen / keys))
    assert ((counts - expected).abs() < 5 * sigma).all(), counts


def test_pattern_memory_is_n_times_k():
    """An N x M mask at N = M = 200000 would need 40 GB; the pattern is an (N, K) table."""
    pattern = RandomFixedAttention(8, 2, n_random=8, seed=2).pattern(200_000, 200_000, torch.device("cpu"))
    assert pattern.shape == (200_000, 8)


def test_seed_lives_in_the_state_dict():
    torch.manual_seed(0)
    saved = RandomFixedAttention(8, 2, seed=123)
    restored = RandomFixedAttention(8, 2, seed=999)
    assert restored.pattern(6, 9, torch.device("cpu")) is not None
    restored.load_state_dict(saved.state_dict())
    assert int(restored.pattern_seed) == 123
    queries, keys = torch.randn(1, 6, 8), torch.randn(1, 9, 8)
    assert torch.equal(restored(queries, keys, keys), saved(queries, keys, keys))


def test_state_dict_without_seed_loads_strictly_and_keeps_the_seed():
    module = RandomFixedAttention(8, 2, seed=77)
    peer_style = {k: v for k, v in RandomFixedAttention(8, 2).state_dict().items() if k != "pattern_seed"}
    module.load_state_dict(peer_style, strict=True)
    assert int(module.pattern_seed) == 77
    assert torch.equal(module.q_proj.weight, peer_style["q_proj.weight"])


def test_drawing_a_seed_leaves_the_global_generator_alone():
    torch.manual_seed(4)
    RandomFixedAttention(8, 2)
    after_module = torch.randn(3)
    torch.manual_seed(4)
    for _ in range(4):
        torch.nn.Linear(8, 8)
    assert torch.equal(torch.randn(3), after_module)
    torch.manual_seed(4)
    first = int(RandomFixedAttention(8, 2).pattern_seed)
    torch.manual_seed(4)
    assert int(RandomFixedAttention(8, 2).pattern_seed) == first
