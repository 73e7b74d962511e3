"""Boot profiles as data: merging runs, checking documents, seeding from traces, and the
order prefetch asks for them in (``planner.profile``)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtman.errors import ConfigError
from virtman.planner.profile import (
    BootProfile,
    ProfileEntry,
    plan_runs,
    profile_from_trace,
    run_from_reads,
)
from virtman.replay.trace import load_trace

CS = 4096


def test_a_run_keeps_each_chunks_first_read_in_order() -> None:
    run = run_from_reads([(0.5, 7), (0.1, 3), (0.6, 7), (0.2, 4), (0.3, 3)], CS)
    assert run.chunks == [3, 4, 7]
    assert [e.seconds for e in run.entries] == [0.1, 0.2, 0.5]


def test_runs_merge_as_a_union_at_the_earliest_first_read() -> None:
    a = run_from_reads([(0.0, 1), (1.0, 2), (2.0, 3)], CS)
    b = run_from_reads([(0.0, 1), (0.5, 3), (3.0, 9)], CS)
    merged = a.merge(b)
    assert merged.runs == 2
    assert merged.chunks == [1, 3, 2, 9]
    assert {e.chunk: e.runs_read for e in merged.entries} == {1: 2, 3: 2, 2: 1, 9: 1}
    with pytest.raises(ConfigError, match="chunks of 8192"):
        a.merge(run_from_reads([(0.0, 1)], 2 * CS))


def test_a_document_round_trips_and_is_checked_against_its_image() -> None:
    profile = run_from_reads([(0.0, 0), (0.25, 5)], CS).merge(run_from_reads([(0.1, 2)], CS))
    doc = json.loads(json.dumps(profile.to_doc()))
    assert BootProfile.from_doc(doc, chunk_size=CS, image_size=6 * CS) == profile
    cases = [
        ({**doc, "chunk_size": 512}, "chunks of 512 bytes"),
        ({**doc, "entries": [[6, 0.0]]}, "chunk 6 is not in 0..5"),
        ({**doc, "entries": [[1, -1.0]]}, "seconds -1.0"),
        ({**doc, "entries": [[1, float("nan")]]}, "seconds nan"),
        ({**doc, "entries": [[1, 0.0], [1, 0.5]]}, "chunk 1 twice"),
        ({**doc, "entries": [[1, 0.0, 3]]}, "runs 3 is not in 1..2"),
        ({**doc, "entries": [["1", 0.0]]}, "chunk '1'"),
        ({**doc, "entries": "all"}, "must be a list"),
        ({**doc, "runs": 0}, "runs 0"),
        ({**doc, "format": 9}, "format 9"),
        ({**doc, "entries": [[i, 0.0] for i in range(7)]}, "7 entries; the image has 6"),
        ([1, 2], "JSON object"),
    ]
    for bad, words in cases:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
            BootProfile.from_doc(bad, chunk_size=CS, image_size=6 * CS)


def test_a_trace_seeds_a_profile_of_its_reads() -> None:
    trace = load_trace()  # the bundled Debian 12 boot
    size = 4 << 30
    profile = profile_from_trace(
        ((r.t, r.op, r.offset, r.length) for r in trace.requests), 256 * 1024, size
    )
    assert len(profile.entries) * 256 * 1024 == trace.working_set(256 * 1024)
    first = trace.reads[0]
    assert profile.entries[0] == ProfileEntry(first.offset // (256 * 1024), 0.0)
    with pytest.raises(ConfigError, match="past the image"):
        profile_from_trace([(0.0, "read", size, 4096)], CS, size)
    writes_only = profile_from_trace([(0.0, "write", 0, 4096), (0.1, "flush", 0, 0)], CS, size)
    assert writes_only.entries == ()


def test_runs_join_neighbours_within_a_window_and_keep_the_boots_order() -> None:
    # A boot reads 10, 11, 3, 12, 4: within one window 10-12 and 3-4 are two requests,
    # and 10-12 goes first because its first chunk was read first.
    assert plan_runs([10, 11, 3, 12, 4], batch_chunks=8, window=8) == [(10, 3), (3, 2)]
    assert plan_runs([10, 11, 3, 12, 4], batch_chunks=2, window=8) == [(10, 2), (3, 2), (12, 1)]
    # Windows keep the end of a boot after its start even when it would join.
    assert plan_runs([5, 1, 6, 2], batch_chunks=8, window=2) == [(5, 1), (1, 1), (6, 1), (2, 1)]
    with pytest.raises(ConfigError):
        plan_runs([1], batch_chunks=0, window=1)


@given(
    chunks=st.lists(st.integers(0, 200), max_size=120),
    batch=st.integers(1, 16),
    window=st.integers(1, 64),
)
def test_a_plan_asks_for_every_profile_chunk_once_and_nothing_else(
    chunks: list[int], batch: int, window: int
) -> None:
    runs = plan_runs(chunks, batch, window)
    asked = [c for first, count in runs for c in range(first, first + count)]
    assert sorted(asked) == sorted(set(chunks))
    assert all(1 <= count <= batch for _, count in runs)
