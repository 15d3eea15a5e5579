"""The read-ahead a lazy mount chooses from the link it measures (storage/link.py)."""

from __future__ import annotations

import random

from naiad.storage.link import DEFAULT_AMPLIFY, MAX_AMPLIFY, MIN_AMPLIFY, LinkEstimate

KiB, MiB = 1 << 10, 1 << 20


def fed(latency: float, throughput: float, sizes: list[int], noise: float = 0.0) -> LinkEstimate:
    link = LinkEstimate()
    rng = random.Random(7)
    for size in sizes:
        link.record(size, (latency + size / throughput) * (1 + rng.uniform(-noise, noise)))
    return link


SIZES = [64 * KiB, 300 * KiB, 1 * MiB, 2 * MiB, 700 * KiB, 4 * MiB, 128 * KiB, 1500 * KiB] * 4


def test_the_default_holds_until_there_is_something_to_fit() -> None:
    assert LinkEstimate().amplify() == DEFAULT_AMPLIFY
    assert fed(0.005, 12.5e6, SIZES[:5]).amplify() == DEFAULT_AMPLIFY  # too few requests
    assert fed(0.005, 12.5e6, [1 * MiB] * 20).amplify() == DEFAULT_AMPLIFY  # sizes all alike


def test_a_fast_local_registry_gets_the_largest_read_ahead() -> None:
    link = fed(0.005, 600e6, SIZES, noise=0.1)  # 5 ms a request, 600 MB/s
    assert link.amplify() == MAX_AMPLIFY
    latency, throughput = link.fit()
    assert 0.003 < latency < 0.008 and 300e6 < throughput < 1200e6


def test_a_ceiling_caps_a_fast_link_but_not_a_slow_one() -> None:
    fast, slow = fed(0.005, 600e6, SIZES, noise=0.1), fed(0.005, 12.5e6, SIZES, noise=0.1)
    for link in (fast, slow):
        link.ceiling = 1 * MiB  # a mount that follows access hints (storage/hints.py)
    assert fast.amplify() == 1 * MiB and slow.amplify() == 128 * KiB


def test_a_100_mbit_link_gets_a_small_read_ahead() -> None:
    link = fed(0.005, 12.5e6, SIZES, noise=0.1)  # 4 x 5 ms x 12.5 MB/s = 250 kB: 128K
    assert link.amplify() == 128 * KiB
    assert fed(0.020, 12.5e6, SIZES, noise=0.1).amplify() == 512 * KiB  # farther away: more


def test_nonsense_samples_fall_back_to_the_default() -> None:
    link = LinkEstimate()
    for size in SIZES:  # bigger requests answered sooner: no fit
        link.record(size, 1.0 / size)
    assert link.amplify() == DEFAULT_AMPLIFY and link.fit() is None
    assert MIN_AMPLIFY <= fed(0.0001, 1e6, SIZES).amplify() <= MAX_AMPLIFY
