import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmoe.moe import compute_capacity, expert_choice_route, route

GATES = torch.tensor([[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]])


def kept_pairs(r):
    out = []
    for s in range(r.expert_index.shape[0]):
        out.append([(int(e), round(float(w), 4)) for e, w, sl in zip(r.expert_index[s], r.combine_weight[s], r.slot[s]) if sl >= 0])
    return out


def test_hand_checked_vanilla():
    r = route(GATES, top_k=2, capacity=2, batch_priority=False)
    assert kept_pairs(r) == [[(0, 0.4), (2, 0.2)], [(0, 0.5)], [(2, 0.6)]]
    assert r.combine_weight[1, 1] == 0 and r.slot[1, 1] == -1


def test_hand_checked_bpr():
    r = route(GATES, top_k=2, capacity=2, batch_priority=True)
    assert kept_pairs(r) == [[(0, 0.4)], [(0, 0.5), (2, 0.4)], [(2, 0.6)]]


@pytest.mark.parametrize(
    "args,expected",
    [((64, 8, 1, 1.0), 8), ((10, 3, 1, 1.0), 4), ((10, 3, 2, 1.0), 8), ((100, 8, 2, 1.25), 32), ((5, 8, 1, 0.1), 4)],
)
def test_compute_capacity(args, expected):
    assert compute_capacity(*args) == expected


def test_compute_capacity_no_rounding_and_errors():
    assert compute_capacity(10, 3, 1, 1.0, multiple_of=None) == 4
    assert compute_capacity(9, 3, 1, 1.0, multiple_of=1) == 3
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity_factor"):
            compute_capacity(16, 4, 1, bad)
    with pytest.raises(ValueError, match="group_size"):
        compute_capacity(0, 4)


def reference_route(gates, K, C, bpr, mask=None, keep=None):
    """Sequential transcription of vmoe's Top-Experts-Per-Item routing."""
    S, E = gates.shape
    choices = [sorted(range(E), key=lambda e: (-float(gates[s, e]), e))[:K] for s in range(S)]
    order = sorted(range(S), key=lambda s: (-float(gates[s, choices[s][0]]), s)) if bpr else list(range(S))
    count = [0] * E
    slot = [[-1] * K for _ in range(S)]
    for k in range(K):
        for s in order:
            if mask is not None and not mask[s]:
                continue
            if keep is not None and not keep[s][k]:
                continue
            e = choices[s][k]
            if C is None or count[e] < C:
                slot[s][k] = count[e]
            count[e] += 1  # overflowed choices still count
    return choices, slot


@settings(max_examples=60, deadline=None)
@given(
    S=st.integers(1, 24), E=st.integers(1, 6), K=st.integers(1, 3), C=st.one_of(st.none(), st.integers(1, 6)),
    bpr=st.booleans(), seed=st.integers(0, 10_000), quantize=st.booleans(), use_mask=st.booleans(),
)
def test_route_matches_sequential_reference(S, E, K, C, bpr, seed, quantize, use_mask):
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    gates = torch.rand(S, E, generator=g)
    if quantize:  # many ties, to pin the tie-breaking rules
        gates = (gates * 3).round() / 3
    gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-6)
    mask = torch.rand(S, generator=g) > 0.3 if use_mask else None
    keep = torch.rand(S, K, generator=g) > 0.2
    r = route(gates, K, C, batch_priority=bpr, mask=mask, keep=keep)
    choices, slot = reference_route(gates, K, C, bpr, None if mask is None else mask.tolist(), keep.tolist())
    assert r.expert_index.tolist() == choices
    assert r.slot.tolist() == slot
    expected_w = torch.where(r.slot >= 0, gates.gather(1, r.expert_index), 0.0)
    torch.testing.assert_close(r.combine_weight, expected_w)
    if C is not None:  # no expert over capacity
        counts = torch.bincount(r.expert_index[r.slot >= 0], minlength=E)
        assert int(counts.max()) <= C


def test_bpr_keeps_the_highest_priority_tokens_of_an_overloaded_expert():
    torch.manual_seed(0)
    S, E, C = 64, 4, 5
    logits = torch.randn(S, E)
    logits[:, 0] += 3.0  # expert 0 is heavily overloaded
    gates = logits.softmax(-1)
    r = route(gates, 1, C, batch_priority=True)
    chose0 = (r.expert_index[:, 0] == 0).nonzero().squeeze(1)
    kept0 = chose0[r.slot[chose0, 0] >= 0]
    top = chose0[gates[chose0, 0].argsort(descending=True)[:C]]
    assert len(chose0) > C and sorted(kept0.tolist()) == sorted(top.tolist())
    vanilla = route(gates, 1, C, batch_priority=False)
    kept_v = chose0[vanilla.slot[chose0, 0] >= 0]
    assert kept_v.tolist() == chose0[:C].tolist()  # vanilla: first by position


def test_groups_route_independently():
    torch.manual_seed(1)
    gates = torch.randn(3, 10, 4).softmax(-1)
    r = route(gates, 2, 3)
    for gi in range(3):
        rg = route(gates[gi], 2, 3)
        assert torch.equal(r.slot[gi], rg.slot) and torch.equal(r.expert_index[gi], rg.expert_index)


def test_renormalize_and_masked_tokens():
    gates = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    r = route(gates, 2, None, renormalize=True)
    torch.testing.assert_close(r.combine_weight.sum(-1), torch.ones(2))
    r = route(gates, 2, None, mask=torch.tensor([True, False]))
    assert (r.slot[1] == -1).all() and (r.combine_weight[1] == 0).all()


def test_route_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        route(GATES, 4, 2)
    with pytest.raises(ValueError, match="capacity"):
        route(GATES, 1, 0)
    with pytest.raises(ValueError, match="shape"):
        route(torch.rand(3), 1, 2)
    with pytest.raises(ValueError, match="non-finite"):
        route(torch.tensor([[float("nan"), 1.0]]), 1, 2)
    with pytest.raises(ValueError, match="mask"):
        route(GATES, 1, 2, mask=torch.ones(4, dtype=torch.bool))


def test_expert_choice_route():
    gates = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    token, weight = expert_choice_route(gates, 2)
    assert token.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(weight, torch.tensor([[0.7, 0.6], [0.9, 0.5]]))
    token, weight = expert_choice_route(gates, 2, mask=torch.tensor([False, True, True, True]))
    assert token.tolist() == [[1, 3], [2, 3]]
    token, _ = expert_choice_route(gates, 8)  # capacity above S is clipped to S
    assert token.shape == (2, 4)
    assert math.isclose(float(weight.sum()), 0.6 + 0.5 + 0.9 + 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("E,K", [(8, 1), (32, 1), (32, 2), (32, 4), (64, 8)])
def test_top_k_gates_is_the_stable_descending_sort(E, K):
    """argmax (top-1) and topk with tied rows redone must give exactly the stable sort's
    first K: ties between chosen experts and at the K-th place go to the lower index."""
    from vlmoe.moe import top_k_gates

    g = torch.Generator().manual_seed(E * 10 + K)
    rand = torch.rand(3, 200, E, generator=g)
    tied = (rand * 4).round() / 4  # many ties, some at the K-th place
    equal = torch.full((2, 5, E), 1.0 / E)  # a zero-initialised router: every expert ties
    for gates in (rand, tied, equal, rand - 0.5):  # negative values: gates plus a selection bias
        gates = gates.clone().requires_grad_()
        values, index = top_k_gates(gates, K)
        ref = torch.sort(gates.detach(), dim=-1, descending=True, stable=True)
        assert torch.equal(index, ref.indices[..., :K])
        assert torch.equal(values.detach(), ref.values[..., :K])
        values.sum().backward()  # the values stay differentiable, at the chosen experts only
        assert torch.equal(gates.grad, torch.zeros_like(gates).scatter_(-1, index, 1.0))


def test_route_matches_the_reference_with_many_experts_and_ties():
    # the sort-based running count at sizes the property test does not reach (E=32, K=4)
    g = torch.Generator().manual_seed(3)
    gates = (torch.rand(300, 32, generator=g) * 6).round() / 6
    gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-6)
    mask = torch.rand(300, generator=g) > 0.1
    for C, bpr in ((None, True), (30, True), (30, False), (7, True)):
        r = route(gates, 4, C, batch_priority=bpr, mask=mask)
        choices, slot = reference_route(gates, 4, C, bpr, mask.tolist())
        assert r.expert_index.tolist() == choices and r.slot.tolist() == slot


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_route_refuses_any_non_finite_gate(bad):
    gates = torch.rand(40, 8)
    gates[17, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        route(gates, 2, 8)
