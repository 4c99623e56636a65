"""Eviction policies order victims as documented."""

from kvtier.core.eviction import LFUPolicy, LRUPolicy


def test_lru_evicts_least_recently_used():
    p = LRUPolicy()
    for k in "abc":
        p.insert(k)
    p.touch("a")
    assert p.victim() == "b"
    p.remove("b")
    assert p.victim() == "c" and len(p) == 2
    p.remove("missing")
    p.touch("missing")
    assert len(p) == 2


def test_lfu_evicts_least_frequently_used_then_oldest():
    p = LFUPolicy()
    for k in "abcd":
        p.insert(k)
    for _ in range(3):
        p.touch("a")
    p.touch("b")
    assert p.victim() == "c"
    p.remove("c")
    assert p.victim() == "d"
    p.remove("d")
    assert p.victim() == "b"
    p.remove("b")
    assert p.victim() == "a"
    p.remove("a")
    assert p.victim() is None and len(p) == 0


def test_lfu_counts_saturate():
    p = LFUPolicy(max_count=2)
    p.insert("old")
    for _ in range(10):
        p.touch("old")
    p.insert("new")
    p.touch("new")
    assert p.victim() == "old", "equal saturated counts fall back to recency"
