"""The discrete-event simulator: hand-computed timelines, conservation, scaling, the CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from virtman.errors import ConfigError
from virtman.replay.trace import load_trace, parse_trace
from virtman.sizes import parse_link_rate
from virtman_bench import calibrate
from virtman_bench.results import RUN_KEYS, percentile
from virtman_bench.sim import cli
from virtman_bench.sim.model import (
    NETWORKS,
    PREFETCH_FROM,
    RELAYS,
    BootPattern,
    SimConfig,
    pattern_from_trace,
    profile_of,
    simulate,
    synthetic_pattern,
    uvm_budget,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
C = 256 * KiB
#: C/B = 1 s: hand timelines count in whole chunk transfers.
SLOW = float(C)


def hand_config(**kw: object) -> SimConfig:
    base = SimConfig(
        mode="virtman", hosts=3, vms_per_host=1, image_size=4 * C, working_set=2 * C,
        chunk_size=C, link_rate=SLOW, rtt=0.5, boot_seconds=3.25, attach_delay=0.0,
        fanout=2, parents=1,
        pattern=BootPattern(((1.0, (0,)), (2.0, (1,)), (0.25, ())), "hand"),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_three_hosts_by_hand() -> None:
    """d = 2, k = 1, C/B = 1 s, rtt = 0.5 s, one VM per host.

    Pattern: think 1 s, read chunk 0; think 2 s, read chunk 1; think 0.25 s, done
    (T = 3.25 s). Tree: host0 and host1 on level 1 (origin), host2 under host0.
    Events at one instant run batches first, in host order.

    t=1    host0 asks the origin for chunk 0: origin.up [1, 2], host0 holds it at 2.5.
           host1 asks for chunk 0: origin.up busy until 2: [2, 3], holds it at 3.5.
           host2 asks host0, which will hold chunk 0 at 2.5: host2 waits.
    t=2.5  host0 -> host2 chunk 0: [2.5, 3.5], host2 holds it at 4.0.
           Next batches: host0 at 2.5+2 = 4.5, host1 at 3.5+2 = 5.5, host2 at 4+2 = 6.
    t=4.5  host0: origin -> host0 chunk 1 [4.5, 5.5], holds at 6.0; done at 6.25.
    t=5.5  host1: origin -> host1 chunk 1 [5.5, 6.5], holds at 7.0; done at 7.25.
    t=6    host2: host0 holds chunk 1 since 6.0: [6, 7], holds at 7.5; done at 7.75.

    Origin sent 4 chunks, host0 2, the others none.
    """
    for network in ("coupled", "switch"):
        r = simulate(hand_config(network=network))
        assert r.finish == pytest.approx([6.25, 7.25, 7.75], abs=1e-9)
        assert r.origin_bytes_sent == 4 * C
        assert r.host_bytes_sent == [2 * C, 0, 0]
        assert r.depth == 2 and r.levels == [1, 1, 2]
        run = r.to_run()
        assert run.all_booted_seconds == pytest.approx(7.75, abs=1e-9)
        assert run.mean_boot_seconds == pytest.approx((6.25 + 7.25 + 7.75) / 3, abs=1e-9)
        assert run.p99_boot_seconds == pytest.approx(7.75, abs=1e-9)
        assert run.single_vm_seconds == pytest.approx(3.25, abs=1e-9)
        # floor = max(T, W/B) + depth * (C/B + rtt) = max(3.25, 2) + 2 * 1.5
        assert run.extra["floor_seconds"] == pytest.approx(6.25, abs=1e-9)
    # The paper's protocol with D = 0 is the same tree with one parent.
    assert simulate(hand_config(mode="paper", parents=2)).finish == pytest.approx(
        [6.25, 7.25, 7.75], abs=1e-9
    )


def test_paper_attach_delay_by_hand() -> None:
    """As above with D = 10: level-1 hosts start at 10, host2 (level 2) at 20.

    host0: [11, 12] -> 12.5; next at 14.5: [14.5, 15.5] -> 16; done 16.25.
    host1: [12, 13] -> 13.5; next at 15.5: [15.5, 16.5] -> 17; done 17.25.
    host2 (t=21): host0 holds chunk 0: [21, 22] -> 22.5; next at 24.5, host0 holds
    chunk 1: [24.5, 25.5] -> 26; done 26.25.
    """
    r = simulate(hand_config(mode="paper", attach_delay=10.0))
    assert r.finish == pytest.approx([16.25, 17.25, 26.25], abs=1e-9)
    assert r.to_run().extra["attach_seconds"] == 20.0


def test_chain_relays_chunk_by_chunk_by_hand() -> None:
    """d = 1: a chain of 3 hosts, one chunk read after 1 s (T = 1), C/B = 1, rtt = 0.5.

    t=1    host0 asks the origin: [1, 2], holds at 2.5. host1 asks host0 (due at 2.5)
           and waits; host2 asks host1, which is itself still waiting, and waits.
    t=2.5  host0 -> host1 [2.5, 3.5], host1 holds at 4.0.
    t=4    host1 -> host2 [4, 5], host2 holds at 5.5.

    Each level costs one chunk transfer and one round trip; the deepest host meets the
    floor max(T, W/B) + depth * (C/B + rtt) = 1 + 3 * 1.5 exactly.
    """
    cfg = hand_config(
        fanout=1, working_set=C, boot_seconds=1.0, pattern=BootPattern(((1.0, (0,)),))
    )
    r = simulate(cfg)
    assert r.finish == pytest.approx([2.5, 4.0, 5.5], abs=1e-9)
    assert r.host_bytes_sent == [C, C, 0] and r.origin_bytes_sent == C
    assert r.floor_seconds == pytest.approx(5.5, abs=1e-9)


def test_copy_by_hand() -> None:
    """Image of 2.5 chunks, 2 hosts: the origin sends chunk 0 to host0 then host1,
    chunk 1 likewise, then host0's half chunk (done at 4.5 s) and host1's (5 s); plus
    rtt 0.5 and T 3.25."""
    r = simulate(hand_config(mode="copy", hosts=2, image_size=5 * C // 2))
    assert r.finish == pytest.approx([4.5 + 0.5 + 3.25, 5.0 + 0.5 + 3.25], abs=1e-9)
    assert r.origin_bytes_sent == 2 * (5 * C // 2)


def small(mode: str, hosts: int, **kw: object) -> SimConfig:
    base = SimConfig(
        mode=mode, hosts=hosts, vms_per_host=4, image_size=64 * MiB, working_set=8 * MiB,
        chunk_size=C, link_rate=125e6, rtt=0.0004, boot_seconds=10.0, attach_delay=10.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_origin_bytes_per_mode() -> None:
    n, m, w, d = 9, 4, 8 * MiB, 2
    assert simulate(small("star", n)).origin_bytes_sent == n * m * w
    virtman = simulate(small("virtman", n))
    assert virtman.origin_bytes_sent == d * w
    # Every host received each chunk exactly once, from the origin or a parent.
    assert virtman.origin_bytes_sent + sum(virtman.host_bytes_sent) == n * w
    assert simulate(small("paper", n)).origin_bytes_sent == d * w
    assert simulate(small("copy", n)).origin_bytes_sent == n * 64 * MiB
    assert simulate(small("virtman", 1)).origin_bytes_sent == w


def test_star_is_origin_bound() -> None:
    r = simulate(small("star", 20, link_rate=12.5e6))  # 100 Mbit/s
    # The origin must send 20 * 4 * 8 MiB = 640 MiB at 12.5 MB/s: about 54 s.
    assert r.all_booted_seconds >= 20 * 4 * 8 * MiB / 12.5e6
    assert r.all_booted_seconds == pytest.approx(r.floor_seconds, rel=0.02)


def test_paper_grows_by_the_attach_delay_per_level() -> None:
    fast = {"link_rate": 1.25e9, "working_set": 4 * MiB}
    times = []
    for hosts, depth in ((2, 1), (6, 2), (14, 3), (30, 4)):
        r = simulate(small("paper", hosts, **fast))
        assert r.depth == depth
        times.append(r.all_booted_seconds)
    steps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(step - 10.0) < 0.5 for step in steps), steps
    without = simulate(small("paper", 30, attach_delay=0.0, **fast)).all_booted_seconds
    assert times[-1] - without == pytest.approx(40.0, abs=0.5)


def test_virtman_is_flat_in_the_host_count_on_a_fast_link() -> None:
    fast = {"link_rate": 1.25e9, "working_set": 16 * MiB, "pattern": None}
    times = [simulate(small("virtman", n, **fast)).all_booted_seconds for n in (10, 100, 1000)]
    assert max(times) - min(times) < 0.5, times
    assert min(times) >= 10.0


def test_two_parents_with_a_trace_pattern() -> None:
    pattern = pattern_from_trace(load_trace(None), C, 64 * MiB, 8 * MiB, 10.0)
    cfg = small("virtman", 30, pattern=pattern)
    coupled, switch = simulate(cfg), simulate(replace(cfg, network="switch"))
    for r in (coupled, switch):
        assert r.origin_bytes_sent == 2 * 8 * MiB
        assert r.origin_bytes_sent + sum(r.host_bytes_sent) == 30 * 8 * MiB
        assert r.all_booted_seconds >= r.floor_seconds - C / cfg.link_rate
    # Children that outrun a parent make it fetch on their behalf.
    assert coupled.parent_misses > 0
    # With one parent per host both link models agree exactly.
    one = replace(cfg, parents=1)
    assert simulate(one).finish == simulate(replace(one, network="switch")).finish
    # The switch model does not make a second parent cost more than a few percent.
    single = simulate(replace(one, network="switch")).all_booted_seconds
    assert switch.all_booted_seconds <= single * 1.05


def test_a_lone_host_meets_the_demand_floor() -> None:
    pattern = pattern_from_trace(load_trace(None), C, 64 * MiB, 8 * MiB, 10.0)
    for mode in ("virtman", "paper"):
        r = simulate(small(mode, 1, pattern=pattern, attach_delay=0.0))
        assert r.all_booted_seconds == pytest.approx(r.demand_floor_seconds, abs=1e-9)
    r = simulate(small("virtman", 30, pattern=pattern))
    assert r.all_booted_seconds > r.demand_floor_seconds > r.floor_seconds


def test_deterministic() -> None:
    pattern = pattern_from_trace(load_trace(None), C, 64 * MiB, 8 * MiB, 10.0)
    for mode in ("paper", "virtman", "star", "copy"):
        cfg = small(mode, 25, pattern=pattern)
        a, b = simulate(cfg).to_run().to_dict(), simulate(cfg).to_run().to_dict()
        a.pop("sim_wall_seconds")
        b.pop("sim_wall_seconds")
        assert a == b


def test_vm_percentiles_weigh_each_host_m_times() -> None:
    r = simulate(small("virtman", 37, vms_per_host=3))
    per_vm = [t for t in r.finish for _ in range(3)]
    for q in (1, 50, 90, 99, 100):
        assert r.percentile(q) == percentile(per_vm, q)
    assert r.mean_boot_seconds == pytest.approx(sum(per_vm) / len(per_vm))


def test_pattern_from_the_bundled_trace_keeps_t_and_w() -> None:
    trace = load_trace(None)
    for ws, t in ((300 * MiB, 10.0), (8 * MiB, 45.0), (C, 1.0)):
        p = pattern_from_trace(trace, C, 15 * GiB, ws, t)
        assert p.think_seconds == pytest.approx(t, rel=1e-12)
        assert p.distinct_chunks == ws // C
        assert all(0 <= c < 15 * GiB // C for _, cs in p.batches for c in cs)
        assert all(g >= 0 for g, _ in p.batches)


def test_pattern_from_a_small_trace_by_hand() -> None:
    """Reads [0, 4K) at 0 s and [8K, 12K) at 1 s, a write at 3 s; W = 4 chunks, T = 6.

    The union is 8 KiB of ranks; 4 chunks of 2 KiB of rank each: the first read covers
    chunks 0-1, the second 2-3. Placed in a 16-chunk image by the offset of each chunk's
    first byte (0, 2K, 8K, 10K of a 12 KiB extent): chunks 0, 2, 10, 13. Gaps 0, 1 and
    the write's 2 s (carried to the end) scale by 6/3.
    """
    trace = parse_trace("t,op,offset,length\n0,read,0,4096\n1,read,8192,4096\n"
                        "3,write,0,4096\n")
    p = pattern_from_trace(trace, C, 16 * C, 4 * C, 6.0)
    assert p.batches == ((0.0, (0, 2)), (2.0, (10, 13)), (4.0, ()))


def test_synthetic_pattern() -> None:
    p = synthetic_pattern(C, 300 * MiB, 10.0)
    assert len(p.batches) == 1200 and p.distinct_chunks == 1200
    assert p.think_seconds == pytest.approx(10.0)
    r = simulate(small("virtman", 1, working_set=C, link_rate=1e15, rtt=0.0, pattern=None))
    assert r.all_booted_seconds == pytest.approx(10.0)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        small("mesh", 3)
    with pytest.raises(ConfigError):
        small("virtman", 0)
    with pytest.raises(ConfigError):
        small("virtman", 3, working_set=128 * MiB)
    with pytest.raises(ConfigError):
        small("virtman", 3, network="tcp")
    with pytest.raises(ConfigError):
        BootPattern(())


def test_link_rates() -> None:
    assert parse_link_rate("1gbit") == 125e6
    assert parse_link_rate("100mbit") == 12.5e6
    assert parse_link_rate("10Gbit/s") == 1.25e9
    assert parse_link_rate("2.5gbps") == 312.5e6
    assert parse_link_rate("8000") == 1000.0
    for bad in ("fast", "1gb/s", "0gbit", "-1gbit"):
        with pytest.raises(ConfigError):
            parse_link_rate(bad)


def test_cli_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    out = tmp_path / "sim.json"
    args = p.parse_args([
        "--modes", "paper,virtman,star,copy", "--hosts", "3,7", "--vms-per-host", "2",
        "--image-size", "64M", "--working-set", "4M", "--link", "1gbit",
        "--boot-seconds", "5", "--json", str(out),
    ])
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    assert "all booted" in text and "debian12-boot.csv" in text
    doc = json.loads(out.read_text())
    assert doc["kind"] == "simulation"
    assert doc["command"].startswith("virtman bench simulate --modes paper,virtman,star,copy")
    assert [(r["mode"], r["hosts"]) for r in doc["runs"]] == [
        (m, n) for m in ("paper", "virtman", "star", "copy") for n in (3, 7)
    ]
    for r in doc["runs"]:
        assert all(key in r for key in RUN_KEYS)
        assert r["floor_seconds"] > 0 and r["depth"] >= 1 and "events" in r
        assert math.isclose(r["single_vm_seconds"], 5.0)
    args = p.parse_args(["--modes", "virtman", "--hosts", "2", "--trace", "none",
                         "--working-set", "1M", "--image-size", "2M"])
    assert cli.run(args) == 0
    assert "synthetic" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        cli.run(p.parse_args(["--modes", "ring"]))
    with pytest.raises(ConfigError):
        cli.run(p.parse_args(["--hosts", "ten"]))


# --- boot profiles and prefetch ----------------------------------------------------------


def test_profile_is_the_union_in_order_of_first_read() -> None:
    a = BootPattern(((1.0, (5, 3)), (1.0, (5, 7)), (1.0, ())))
    b = BootPattern(((0.5, (9,)), (2.0, (3, 1))))
    assert profile_of(a) == (5, 3, 7)
    # 9 first read at 0.5, 5 and 3 at 1, 7 at 2, 1 at 2.5 (3 again at 2.5: kept at 1).
    assert profile_of(a, b) == (9, 5, 3, 7, 1)
    assert SimConfig(mode="virtman", hosts=1, pattern=a).boot_profile() == (5, 3, 7)


def prefetch_by_hand(**kw: object) -> SimConfig:
    """One host (a root), C/B = 1 s, rtt 0.5 s; the profile is chunks 0..9 in one
    request; the boot thinks 2.5 s, then reads chunk 9 (the profile's last)."""
    settings: dict[str, object] = {
        "hosts": 1, "image_size": 16 * C, "working_set": C, "prefetch": True,
        "profile": tuple(range(10)), "prefetch_batch_bytes": 10 * C,
        "prefetch_inflight_bytes": 10 * C, "pattern": BootPattern(((2.5, (9,)),)),
    }
    return hand_config(**(settings | kw))


def test_a_demand_read_goes_ahead_of_queued_prefetch_by_hand() -> None:
    """t=0: the host asks the origin for chunks 0..9 (prefetch); the origin's uplink
    sends 0 [0, 1], 1 [1, 2], 2 [2, 3]. t=2.5: the VM reads chunk 9, still queued
    behind 3..8: it goes as demand, after the chunk on the wire: [3, 4], held at 4.5,
    and the boot is done then. FIFO behind the queue it would come at [9, 10] -> 10.5.
    Prefetch then sends 3..8 ([4, 10]); the host holds the profile at 10.5."""
    for network in NETWORKS:
        r = simulate(prefetch_by_hand(network=network))
        assert r.finish == pytest.approx([4.5], abs=1e-9)
        assert r.extra["prefetch_promoted"] == 1
        assert r.prefetched_chunks == frozenset(range(9))  # 9 went as demand
        assert r.extra["prefetch_bytes"] == 9 * C
        assert r.origin_bytes_sent == 10 * C
        assert r.extra["prefetch_done_seconds"] == pytest.approx(10.5, abs=1e-9)
    # Joining the prefetch request instead, the read waits for chunk 9's turn in the
    # queue: [9, 10] -> 10.5, with all ten chunks prefetched.
    joined = simulate(prefetch_by_hand(prefetch_demand="join"))
    assert joined.finish == pytest.approx([10.5], abs=1e-9)
    assert joined.prefetched_chunks == frozenset(range(10))
    assert joined.extra["prefetch_promoted"] == 0
    # Without prefetch the read finds the link idle: [2.5, 3.5] -> 4.0. Prefetch costs
    # this demand read at most the one chunk on the wire.
    off = simulate(prefetch_by_hand(prefetch=False))
    assert off.finish == pytest.approx([4.0], abs=1e-9)


def test_a_rate_cap_spaces_prefetch_requests_by_hand() -> None:
    """As above with requests of 2 chunks and a cap of 1 chunk/s: requests at 0 (0, 1),
    2 (2, 3), 4, 6 and 8 s. Chunk 0 [0, 1], 1 [1, 2], 2 [2, 3]. At 2.5 the VM reads
    chunk 9, not asked for yet: a demand read, after the chunk on the wire, [3, 4] ->
    4.5, the boot's end. Chunk 3 [4, 5]; 4, 5 [5, 7]; 6, 7 [7, 9]; at 8 s only 8 is
    left to ask for (9 is held): [9, 10] -> 10.5."""
    r = simulate(prefetch_by_hand(prefetch_batch_bytes=2 * C, prefetch_rate=float(C)))
    assert r.finish == pytest.approx([4.5], abs=1e-9)
    assert r.prefetched_chunks == frozenset(range(9))
    assert r.extra["prefetch_promoted"] == 0
    assert r.extra["prefetch_done_seconds"] == pytest.approx(10.5, abs=1e-9)
    # Uncapped, the same requests queue at the origin: 0..8 back to back but for the
    # demand read's [3, 4], so the profile is held at 10.5 too, the boot at 4.5.
    fast = simulate(prefetch_by_hand(prefetch_batch_bytes=2 * C))
    assert fast.finish == pytest.approx([4.5], abs=1e-9)


def test_prefetch_reads_nothing_outside_the_profile() -> None:
    pattern = pattern_from_trace(load_trace(None), C, 64 * MiB, 8 * MiB, 10.0)
    read = profile_of(pattern)
    unread = 255  # a chunk no boot reads (the image has 256)
    assert unread not in read
    profile = (*read[::2], unread)
    hosts = 14
    for parents, source in itertools.product((1, 2), PREFETCH_FROM):
        cfg = small("virtman", hosts, pattern=pattern, prefetch=True, profile=profile,
                    parents=parents, prefetch_from=source)
        r = simulate(cfg)
        assert r.prefetched_chunks <= set(profile)
        assert unread in r.prefetched_chunks  # the profile is followed, read or not
        # Every host received each chunk of the boot and of the profile once: the
        # boot's odd chunks on demand only.
        union = len(set(read) | set(profile)) * C
        assert r.origin_bytes_sent + sum(r.host_bytes_sent) == hosts * union
        assert r.origin_bytes_sent == 2 * union


def test_prefetch_keeps_origin_egress_at_one_working_set_per_root() -> None:
    pattern = pattern_from_trace(load_trace(None), C, 64 * MiB, 8 * MiB, 10.0)
    for hosts, parents, source in itertools.product((1, 2, 14, 100), (1, 2), PREFETCH_FROM):
        r = simulate(small("virtman", hosts, pattern=pattern, prefetch=True,
                           parents=parents, prefetch_from=source))
        roots = min(hosts, 2)
        assert r.origin_bytes_sent == roots * 8 * MiB, (hosts, parents, source)
        assert r.origin_bytes_sent + sum(r.host_bytes_sent) == hosts * 8 * MiB
        assert 0 < r.extra["prefetch_bytes"] <= hosts * 8 * MiB


def test_a_child_prefetches_while_its_parent_is_still_filling() -> None:
    """A chain of 3 hosts, a profile of 32 chunks no VM reads until the end: the leaf
    holds the profile one chunk and one round trip per level after the root does, not
    a whole profile later (store and forward per chunk, not per image)."""
    per_chunk = C / 125e6
    cfg = small("virtman", 3, fanout=1, parents=1, vms_per_host=1, working_set=C,
                pattern=BootPattern(((10.0, (0,)),)), prefetch=True,
                profile=tuple(range(32)))
    r = simulate(cfg)
    root, _, leaf = r.extra["prefetch_done_by_level"]
    assert root == pytest.approx(32 * per_chunk + 0.0004, abs=1e-9)
    assert leaf == pytest.approx(root + 2 * (per_chunk + 0.0004), abs=1e-9)
    assert r.parent_misses == 0


def paper_setting(hosts: int, **kw: object) -> SimConfig:
    """1,000 VMs per 100 hosts, 15 GB image, 300 MB working set, 1 GbE, T = 10 s."""
    pattern = pattern_from_trace(load_trace(None), C, 15 * GiB, 300 * MiB, 10.0)
    base = SimConfig(mode="virtman", hosts=hosts, vms_per_host=10, pattern=pattern)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_prefetch_is_never_slower_in_the_paper_setting() -> None:
    for hosts in (1, 2, 6, 14, 30):
        off = simulate(paper_setting(hosts)).all_booted_seconds
        assert off > 12.6  # on demand: at least one VM alone's 12.65 s
        for source in PREFETCH_FROM:
            on = simulate(paper_setting(hosts, prefetch=True, prefetch_from=source))
            assert on.all_booted_seconds <= off, (hosts, source)
            assert on.origin_bytes_sent == min(hosts, 2) * 300 * MiB
        # From the first parent only, no child outruns a parent, and the boot stays
        # within a few ms of the floor (T plus one chunk per level).
        primary = simulate(paper_setting(hosts, prefetch=True, prefetch_from="primary"))
        assert primary.parent_misses == 0
        assert primary.all_booted_seconds <= primary.floor_seconds + 0.01
        # From both parents in turn, a child outruns the slower one; a parent that
        # fetches those chunks as prefetch, not demand, keeps the VMs' misses first.
        miss = simulate(paper_setting(hosts, prefetch=True, prefetch_miss="prefetch"))
        assert miss.all_booted_seconds <= miss.floor_seconds + 0.01
        assert miss.origin_bytes_sent == min(hosts, 2) * 300 * MiB
        assert miss.extra["prefetch_promoted"] == 0


def test_the_store_and_forward_step_is_one_chunk_per_level() -> None:
    """A chain (fan-out 1) of depth D, one read at T = 1: store and forward costs
    (C/B + rtt) per level, cut-through C/B once and rtt per level; both meet their
    floor exactly, so the step per level is C/B."""
    per_chunk = C / 125e6
    steps = []
    for depth in (1, 2, 5, 13):
        times = {}
        for relay in RELAYS:
            cfg = small("virtman", depth, fanout=1, parents=1, vms_per_host=1,
                        working_set=C, pattern=BootPattern(((1.0, (0,)),)), relay=relay)
            r = simulate(cfg)
            assert r.depth == depth
            assert r.all_booted_seconds == pytest.approx(r.floor_seconds, abs=1e-9)
            times[relay] = r.all_booted_seconds
        assert times["store-and-forward"] == pytest.approx(
            1.0 + depth * (per_chunk + 0.0004), abs=1e-9)
        steps.append(times["store-and-forward"] - times["cut-through"])
    assert steps == pytest.approx([0.0, per_chunk, 4 * per_chunk, 12 * per_chunk], abs=1e-9)


def test_the_relay_step_grows_with_depth_in_the_paper_setting() -> None:
    """Fan-out 2, depth 1 to 5: what store and forward costs over cut-through is one
    chunk transfer per level below the first, at 1 and 10 GbE, both with prefetch (from
    the first parent) and on demand with the synthetic pattern (with the trace, on
    demand, queueing moves the last boot by more than the step, either way)."""
    for rate, kw in itertools.product(
        (125e6, 1.25e9), ({"prefetch": True, "prefetch_from": "primary"}, {"pattern": None})
    ):
        for depth, hosts in enumerate((2, 6, 14, 30, 62), start=1):
            sf = simulate(paper_setting(hosts, link_rate=rate, **kw))
            ct = simulate(paper_setting(hosts, link_rate=rate, relay="cut-through", **kw))
            assert sf.depth == depth
            step = sf.all_booted_seconds - ct.all_booted_seconds
            assert step == pytest.approx((depth - 1) * C / rate, abs=1e-6), (rate, kw, depth)


def test_calibration_simulates_prefetch_when_the_testbed_run_prefetched() -> None:
    """The hook for calibrating with prefetch: a testbed document (or run) that says
    ``prefetch`` is simulated with it, virtman mode only; one that does not, without."""
    testbed = {
        "kind": "testbed",
        "settings": {"chunk_size": C, "rate": "1gbit", "working_set": 8 * MiB},
        "runs": [],
    }
    run = {"mode": "virtman", "hosts": 6, "vms_per_host": 2, "single_vm_seconds": 10.0,
           "working_set_bytes": 8 * MiB, "all_booted_seconds": 10.5}
    off = calibrate.sim_run_for(testbed, run)
    assert "prefetch" not in off.extra
    with_setting = {**testbed, "settings": {**testbed["settings"], "prefetch": True}}
    on = calibrate.sim_run_for(with_setting, run)
    assert on.extra["prefetch"] is True
    assert on.extra["prefetch_miss"] == "prefetch"  # as the agent's prefetch export
    assert on.extra["prefetch_demand"] == "join"  # a miss is served from the run
    assert on.all_booted_seconds < off.all_booted_seconds
    assert calibrate.sim_run_for(testbed, {**run, "prefetch": True}).extra["prefetch"]
    assert "prefetch" not in calibrate.sim_run_for(with_setting, run, prefetch=False).extra
    paper = calibrate.sim_run_for(with_setting, {**run, "mode": "paper", "attach_delay": 0})
    assert "prefetch" not in paper.extra


def test_cli_prefetch_runs_virtman_mode_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    out = tmp_path / "sim.json"
    args = p.parse_args([
        "--modes", "paper,virtman", "--hosts", "6", "--vms-per-host", "2",
        "--image-size", "64M", "--working-set", "4M", "--prefetch", "--prefetch-from",
        "primary", "--prefetch-miss", "prefetch", "--prefetch-rate", "500mbit",
        "--prefetch-demand", "join", "--relay", "cut-through", "--json", str(out),
    ])
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    assert "prefetch (virtman mode)" in text and "x floor" in text
    doc = json.loads(out.read_text())
    assert "--prefetch --prefetch-batch 4M --prefetch-inflight 16M" in doc["command"]
    assert "--prefetch-rate 500mbit --relay cut-through" in doc["command"]
    assert doc["settings"]["prefetch"] is True
    assert doc["settings"]["prefetch_bytes_per_second"] == 62.5e6
    paper, virtman = doc["runs"]
    assert "prefetch" not in paper and paper["relay"] == "cut-through"
    assert virtman["prefetch"] is True and virtman["prefetch_from"] == "primary"
    assert virtman["prefetch_miss"] == "prefetch"
    assert virtman["prefetch_demand"] == "join"
    assert virtman["prefetch_bytes"] > 0
    with pytest.raises(ConfigError):
        cli.run(p.parse_args(["--prefetch", "--prefetch-batch", "64K"]))


def test_bad_prefetch_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="virtman mode"):
        small("paper", 3, prefetch=True)
    with pytest.raises(ConfigError, match="relay"):
        small("virtman", 3, relay="wormhole")
    with pytest.raises(ConfigError, match="prefetch miss"):
        small("virtman", 3, prefetch_miss="ignore")
    with pytest.raises(ConfigError, match="prefetch demand"):
        small("virtman", 3, prefetch_demand="later")
    with pytest.raises(ConfigError, match="prefetch from"):
        small("virtman", 3, prefetch_from="nearest")
    with pytest.raises(ConfigError, match="prefetch_batch_bytes"):
        small("virtman", 3, prefetch_batch_bytes=C - 1)
    with pytest.raises(ConfigError, match="prefetch rate"):
        small("virtman", 3, prefetch_rate=-1.0)
    with pytest.raises(ConfigError, match="profile"):
        small("virtman", 3, profile=(0, -1))


# --- µVMs: resumed from one bake (issue 12, section 6) ---------------------------------


def uvm_by_hand(**kw: object) -> SimConfig:
    """One host, C/B = 1 s, rtt 0.5 s, two VMs; the bake is a state of 2 chunks and a
    layer of 1; each VM resumes in 1 s on a core of its own."""
    settings: dict[str, object] = {
        "mode": "uvm", "hosts": 1, "vms_per_host": 2, "state_bytes": 2 * C,
        "layer_bytes": C, "resume_seconds": 1.0, "cores": 1.0, "pattern": None,
    }
    return hand_config(**(settings | kw))


def test_uvm_resume_by_hand() -> None:
    """t=0: QEMU reads state chunk 0, a miss: origin [0, 1], held at 1.5. Prefetch
    asks for the rest of the bake (state 1, layer 0): [1, 2] -> 2.5 and [2, 3] -> 3.5.
    At 1.5 QEMU reads state chunk 1, already on its way: the state is held at 2.5. The
    two VMs share one core: each resume takes 2 x 1 s, to 4.5; the layer has been held
    since 3.5, so both run at 4.5, the floor: 2 chunks + rtt + 2 s. With two cores the
    resume takes 1 s, and the layer (3.5) is what the VMs wait for."""
    for network in NETWORKS:
        r = simulate(uvm_by_hand(network=network))
        assert r.finish == pytest.approx([4.5], abs=1e-9)
        assert r.extra["state_done_seconds"] == pytest.approx(2.5, abs=1e-9)
        assert r.extra["bake_done_seconds"] == pytest.approx(3.5, abs=1e-9)
        assert r.origin_bytes_sent == 3 * C
        assert r.floor_seconds == pytest.approx(4.5, abs=1e-9)
        run = r.to_run()
        assert run.single_vm_seconds == 1.0  # one µVM alone: R
        assert run.extra["resume_wall_seconds"] == 2.0
        assert run.extra["bake_bytes"] == 3 * C
    two_cores = simulate(uvm_by_hand(cores=2.0))
    assert two_cores.finish == pytest.approx([3.5], abs=1e-9)
    # The bake's chunks are numbered after the image's, never a base chunk.
    state, layer = uvm_by_hand().bake_chunks()
    assert list(state) == [4, 5] and list(layer) == [6]
    assert two_cores.prefetched_chunks == frozenset({5, 6})  # 4 went as demand


def test_uvm_origin_sends_the_bake_once_per_root() -> None:
    """Every host receives every chunk of the bake once, from the origin (the roots)
    or a parent; the origin sends it once per root, whatever the host count."""
    bake = 8 * MiB + 2 * MiB
    for hosts, parents, source in itertools.product((1, 2, 14, 100), (1, 2), PREFETCH_FROM):
        r = simulate(small("uvm", hosts, state_bytes=8 * MiB, layer_bytes=2 * MiB,
                           parents=parents, prefetch_from=source))
        roots = min(hosts, 2)
        assert r.origin_bytes_sent == roots * bake, (hosts, parents, source)
        assert r.origin_bytes_sent + sum(r.host_bytes_sent) == hosts * bake
        assert r.to_run().extra["bake_bytes"] == bake
    # Reads of the base after resume come through the tree as in virtman mode: one
    # copy of them per root more, prefetched or not.
    for prefetch in (False, True):
        r = simulate(small("uvm", 14, state_bytes=8 * MiB, layer_bytes=2 * MiB,
                           base_read_bytes=4 * MiB, prefetch=prefetch))
        assert r.origin_bytes_sent == 2 * (bake + 4 * MiB)
        assert r.origin_bytes_sent + sum(r.host_bytes_sent) == 14 * (bake + 4 * MiB)


def test_uvm_time_grows_with_the_state_size() -> None:
    times = []
    for state in (1, 4, 16, 64):
        r = simulate(small("uvm", 30, state_bytes=state * MiB, layer_bytes=MiB))
        assert r.all_booted_seconds >= r.floor_seconds - 1e-9
        times.append(r.all_booted_seconds)
    assert all(b > a for a, b in itertools.pairwise(times)), times
    # The tree streams the state at the origin's rate over the two roots: each extra
    # MiB costs about 2 MiB / B.
    per_mib = (times[-1] - times[-2]) / 48
    assert per_mib == pytest.approx(2 * MiB / 125e6, rel=0.05)


def test_uvm_is_no_later_than_a_boot_when_the_bake_and_resume_are_smaller() -> None:
    """Same tree, link and VMs; the bake (state + layer) smaller than the boot's working
    set and the resume shorter than the local boot: the VMs run no later than booted
    VMs do, on demand or with prefetch. (Not a theorem: a resume starts only once the
    state is whole, while a boot overlaps its reads with its think time; the settings
    here are the regime of a µVM, a bake a fraction of the working set.)"""
    pattern = pattern_from_trace(load_trace(None), C, 64 * MiB, 16 * MiB, 10.0)
    for hosts, (state, layer), resume in itertools.product(
        (1, 6, 30), ((4 * MiB, MiB), (8 * MiB, 4 * MiB)), (0.5, 2.0, 5.0)
    ):
        assert state + layer < 16 * MiB and resume < 10.0
        uvm = simulate(small("uvm", hosts, working_set=16 * MiB, state_bytes=state,
                             layer_bytes=layer, resume_seconds=resume, cores=4.0))
        for prefetch in (False, True):
            boot = simulate(small("virtman", hosts, working_set=16 * MiB, pattern=pattern,
                                  prefetch=prefetch))
            assert uvm.depth == boot.depth
            assert uvm.all_booted_seconds <= boot.all_booted_seconds, (
                hosts, state, layer, resume, prefetch)


def test_uvm_budget_brackets_the_goal() -> None:
    """The budget's resume and bake meet the goal; a little more of either misses it."""
    cfg = small("uvm", 14, vms_per_host=10, state_bytes=16 * MiB, layer_bytes=4 * MiB,
                resume_seconds=0.5, cores=8.0)
    goal = 2.0
    b = uvm_budget(cfg, goal)
    assert b.all_running_seconds == simulate(cfg).all_booted_seconds < goal
    assert b.resume_check_seconds < goal and b.bake_check_seconds < goal
    assert simulate(replace(cfg, resume_seconds=b.max_resume_seconds)).all_booted_seconds < goal
    assert simulate(replace(cfg, resume_seconds=b.max_resume_seconds * 1.02)
                    ).all_booted_seconds >= goal
    scale = b.max_bake_bytes / (20 * MiB)
    assert scale > 1
    more = replace(cfg, state_bytes=int(16 * MiB * scale * 1.03),
                   layer_bytes=int(4 * MiB * scale * 1.03))
    assert simulate(more).all_booted_seconds >= goal
    # A resume longer than the goal leaves no bake that meets it.
    assert uvm_budget(replace(cfg, resume_seconds=2.0), goal).max_bake_bytes == 0
    with pytest.raises(ConfigError):
        uvm_budget(replace(cfg, mode="virtman"))


def test_cli_prints_the_uvm_row_beside_the_boot_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    out = tmp_path / "sim.json"
    args = p.parse_args([
        "--modes", "paper,virtman,uvm", "--hosts", "6", "--vms-per-host", "10",
        "--image-size", "64M", "--working-set", "8M", "--state-size", "4M",
        "--layer-size", "1M", "--resume-seconds", "0.25", "--cores", "4",
        "--goal-seconds", "1", "--uvm-budget", "--json", str(out),
    ])
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if not line.startswith(" ")]
    # One table: a row per mode, the uvm row with the boot modes' columns.
    table = [r for r in rows if len(r) > 2 and r[1] == "6"]
    assert [r[0] for r in table] == ["paper", "virtman", "uvm"]
    assert len({len(r) for r in table}) == 1
    assert "uvm goal: 60 VMs on 6 hosts all running in" in text
    assert "uvm budget for < 1 s: resume <=" in text
    doc = json.loads(out.read_text())
    assert "--state-size 4M --layer-size 1M --resume-seconds 0.25 --cores 4" in doc["command"]
    assert doc["settings"]["state_bytes"] == 4 * MiB
    uvm = doc["runs"][2]
    assert uvm["mode"] == "uvm" and uvm["state_bytes"] == 4 * MiB
    assert uvm["resume_wall_seconds"] == 0.25 * 10 / 4
    assert uvm["origin_bytes_sent"] == 2 * 5 * MiB
    assert uvm["goal_met"] is (uvm["all_booted_seconds"] < 1)
    assert uvm["budget_max_bake_bytes"] > 0
    assert all(key in uvm for key in RUN_KEYS)
    with pytest.raises(ConfigError):
        cli.run(p.parse_args(["--modes", "uvm", "--hosts", "2", "--goal-seconds", "0"]))


def test_calibration_of_a_uvm_run() -> None:
    """A testbed uvm run is simulated from its measured inputs, with its error."""
    testbed = {
        "kind": "testbed", "machine": {"cores": 2},
        "settings": {"chunk_size": C, "rate": "1gbit", "state_bytes": 8 * MiB,
                     "layer_bytes": 2 * MiB},
        "runs": [],
    }
    run = {"mode": "uvm", "hosts": 2, "vms_per_host": 5, "resume_seconds": 0.4,
           "single_vm_seconds": 0.4, "all_booted_seconds": 2.0}
    sim = calibrate.sim_run_for(testbed, run)
    assert sim.mode == "uvm" and sim.extra["bake_bytes"] == 10 * MiB
    assert sim.extra["cores"] == 1.0  # two cores shared by two hosts
    assert sim.extra["resume_wall_seconds"] == pytest.approx(0.4 * 5)
    assert sim.extra["testbed_all_booted_seconds"] == 2.0
    assert sim.extra["prefetch_demand"] == "join"  # as the agent, and as for boots
    error = 100 * (sim.all_booted_seconds - 2.0) / 2.0
    assert sim.extra["error_percent"] == round(error, 1)
    # The same through the function the lead can call with measured figures.
    m = calibrate.UvmMeasurement(hosts=2, vms_per_host=5, state_bytes=8 * MiB,
                                 layer_bytes=2 * MiB, resume_seconds=0.4, link_rate=125e6,
                                 all_running_seconds=2.0, cores=1.0)
    assert calibrate.sim_uvm_run(m).all_booted_seconds == sim.all_booted_seconds
    with pytest.raises(ConfigError, match="state_bytes"):
        calibrate.sim_run_for({**testbed, "settings": {"rate": "1gbit"}}, run)


def test_bad_uvm_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="state_bytes"):
        small("uvm", 3, state_bytes=0)
    with pytest.raises(ConfigError, match="layer_bytes"):
        small("uvm", 3, layer_bytes=-1)
    with pytest.raises(ConfigError, match="resume_seconds"):
        small("uvm", 3, resume_seconds=math.inf)
    with pytest.raises(ConfigError, match="cores"):
        small("uvm", 3, cores=0.0)
    with pytest.raises(ConfigError, match="base_read_bytes"):
        small("uvm", 3, base_read_bytes=9 * MiB)
    with pytest.raises(ConfigError, match="virtman mode"):
        small("star", 3, prefetch=True)
