"""The relay-tree planner, exhaustively: random joins, leaves and failures."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtman.errors import ConfigError, PlannerError
from virtman.planner.tree import (
    ORIGIN,
    RelayTree,
    TreeSettings,
    level_of,
    min_depth,
)


def test_binary_tree_with_two_parents_by_hand() -> None:
    tree = RelayTree(TreeSettings(fanout=2, parents_per_node=2))
    for h in "abcdefg":
        tree.join(h)
    # a b | c d e f | g
    assert tree.parents("a") == [] and tree.parents("b") == []
    assert tree.tree_parent("a") == ORIGIN
    assert tree.parents("c") == ["a", "b"] and tree.parents("d") == ["a", "b"]
    assert tree.parents("e") == ["b", "a"] and tree.parents("f") == ["b", "a"]
    assert tree.parents("g") == ["c", "d"]
    assert tree.depth == 3
    assert sorted(tree.children("a")) == ["c", "d", "e", "f"]


def test_leave_moves_the_last_host_into_the_hole() -> None:
    tree = RelayTree(TreeSettings(2, 2))
    for h in "abcdefg":
        tree.join(h)
    change = tree.leave("b")
    assert change.moved == [("g", 6, 1)]
    assert tree.parents("e") == ["g", "a"] and tree.parents("c") == ["a", "g"]
    assert change.affected == {"c", "d", "e", "f", "g"}
    assert tree.depth == 2
    tree.check()


def test_leaving_the_last_host_moves_nobody() -> None:
    tree = RelayTree()
    for h in "abc":
        tree.join(h)
    change = tree.leave("c")
    assert change.moved == [] and change.affected == set()


def test_depth_is_the_minimum() -> None:
    for d in (1, 2, 3, 4):
        for n in range(1, 200):
            expected = 0
            total = 0
            while total < n:
                expected += 1
                total += d**expected
            assert min_depth(n, d) == expected
    assert level_of(0, 2) == 1 and level_of(2, 2) == 2 and level_of(6, 2) == 3


def test_errors_name_the_host() -> None:
    tree = RelayTree()
    tree.join("a")
    with pytest.raises(PlannerError, match="'a' is already"):
        tree.join("a")
    with pytest.raises(PlannerError, match="'zz' is not in the tree"):
        tree.leave("zz")
    with pytest.raises(PlannerError):
        tree.join(ORIGIN)
    with pytest.raises(PlannerError):
        TreeSettings(fanout=0)
    # Under the one root, as a settings error: the CLI exits 2, the HTTP API answers 422.
    with pytest.raises(ConfigError, match="fan-out must be at least 1"):
        TreeSettings(fanout=0)


def test_restore_from_positions() -> None:
    tree = RelayTree()
    for h in "abcde":
        tree.join(h)
    again = RelayTree(tree.settings, tree.positions())
    assert again.parent_map() == tree.parent_map()
    with pytest.raises(PlannerError):
        RelayTree(positions={"a": 0, "b": 2})


ops = st.lists(st.tuples(st.sampled_from(["join", "leave"]), st.integers(0, 60)), max_size=120)


@settings(max_examples=400, deadline=None)
@given(d=st.integers(1, 4), k=st.integers(1, 4), sequence=ops)
def test_random_sequences_keep_every_invariant(
    d: int, k: int, sequence: list[tuple[str, int]]
) -> None:
    tree = RelayTree(TreeSettings(d, k))
    present: set[str] = set()
    for op, n in sequence:
        host = f"h{n}"
        if op == "join" and host not in present:
            change = tree.join(host)
            assert change.moved == []  # a join never moves anyone
            present.add(host)
        elif op == "leave" and host in present:
            before = tree.parent_map()
            change = tree.leave(host)
            present.discard(host)
            assert len(change.moved) <= 1
            after = tree.parent_map()
            assert change.affected == {h for h in after if before[h] != after[h]}
            # Only the hole's neighbourhood changes: at most the moved host plus the
            # hosts that used the hole's position as a parent.
            assert len(change.affected) <= 1 + k * d + d
        tree.check()
        assert set(tree.hosts) == present
        if present:
            assert (
                tree.depth <= math.ceil(math.log(len(present) * (d - 1) + 1, d))
                if d > 1
                else tree.depth == len(present)
            )
            # No host carries more than k*d children's parent links.
            load: dict[str, int] = {}
            for parents in tree.parent_map().values():
                for p in parents:
                    load[p] = load.get(p, 0) + 1
            assert all(v <= k * d for v in load.values())
