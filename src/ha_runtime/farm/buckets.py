"""256 buckets shared out by power: the same map on every node, minimal movement.

Choice: *balanced rendezvous hashing*. Every bucket has a preference list, an ordering of
all the module's configured nodes; the owner of a bucket under a membership is the first
node of its list that is a member. Two properties follow by construction, for every
membership and every change of it, with no history and no coordination:

- determinism: the lists depend only on the configured nodes and their powers (the module
  file, the same on every node), so every node computes the same map from the same members;
- minimal movement: when a node leaves, only the buckets it owned move (the others' first
  member is unchanged); when it returns, only the buckets it takes back move. Any scheme
  with that property for every transition is of this form (a single-valued choice that
  ignores removed non-chosen alternatives is a choice by a fixed order), which is why a
  "stable largest-remainder with stickiness" scheme is not used: it depends on the order of
  past events, so two nodes with different histories would disagree.

Plain weighted rendezvous hashing (random lists) gives each node its share only on average:
with 256 buckets a node is typically 8 buckets (3 %) off. So the lists are seeded by
weighted rendezvous hashing and then *balanced*: a deterministic local search swaps adjacent
entries of a bucket's list while that brings the bucket counts of every possible membership
closer to `256 * power / total power` (the full membership and single losses weigh most).
Farms of up to 4 nodes then also try every ordering of each bucket's list. Only integer
hashes and IEEE-exact float operations (+ - * /, no libm) are used, so every platform
computes bit-identical lists.

Balance, measured and property-tested (tests/unit/farm/test_buckets.py): two nodes get
their ideal share rounded (within ±1 bucket) in every membership; up to 6 nodes every node
of every membership is within 2.5 buckets (1 % of the traffic) of its ideal share, mostly
within 1.5 (measured up to 8 nodes: within 3). Exactly ±1 for *every* membership of larger farms is
not reached: balancing all 2^n memberships at once with one fixed list per bucket is a
discrepancy problem the local search does not always solve, and minimal movement (which
needs fixed lists) matters more. The search runs once per (nodes, powers), in at most a few
hundred milliseconds for 8 nodes, and is cached.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from ha_runtime.config.farm import MAX_NODES

NBUCKETS = 256
# How much more the full membership and single-node losses weigh in the balancing.
_TOP_WEIGHT = 16.0
_MAX_PASSES = 100
# Up to this many nodes, every ordering of a bucket's list is tried (n! orderings).
_EXHAUSTIVE_NODES = 4


def _hash(name: str, bucket: int) -> int:
    digest = hashlib.blake2b(f"{name}\0{bucket}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _penalty(dev: float) -> float:
    a = abs(dev)
    return a * a + (0.0 if a <= 1.0 else 1000.0 * (a - 1.0) * (a - 1.0))


def _submasks(mask: int) -> Iterator[int]:
    sub = mask
    while True:
        yield sub
        if sub == 0:
            return
        sub = (sub - 1) & mask


@dataclass(frozen=True)
class BucketMap:
    """Owner of every bucket (None when there is no member)."""

    owners: tuple[str | None, ...]

    def buckets_of(self, node: str) -> frozenset[int]:
        return frozenset(b for b, o in enumerate(self.owners) if o == node)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.owners:
            if o is not None:
                out[o] = out.get(o, 0) + 1
        return out

    def moved(self, other: BucketMap) -> frozenset[int]:
        return frozenset(
            b for b, (x, y) in enumerate(zip(self.owners, other.owners, strict=True)) if x != y
        )


@dataclass(frozen=True)
class BucketPlan:
    """The preference list of every bucket for one set of configured nodes and powers."""

    nodes: tuple[str, ...]  # sorted
    powers: tuple[int, ...]
    prefs: tuple[tuple[int, ...], ...]  # per bucket: node indexes, most preferred first

    def assign(self, members: Iterable[str]) -> BucketMap:
        index = {n: i for i, n in enumerate(self.nodes)}
        mask = 0
        for m in members:
            if m not in index:
                raise ValueError(f"{m!r} is not one of the configured nodes {self.nodes}")
            mask |= 1 << index[m]
        owners: list[str | None] = []
        for pref in self.prefs:
            owner = next((self.nodes[i] for i in pref if mask >> i & 1), None)
            owners.append(owner)
        return BucketMap(tuple(owners))

    def ideal(self, members: Iterable[str]) -> dict[str, float]:
        power = dict(zip(self.nodes, self.powers, strict=True))
        present = set(members)
        total = sum(power[m] for m in present)
        return {m: NBUCKETS * power[m] / total for m in present}


def plan(powers: Mapping[str, int]) -> BucketPlan:
    """The (cached) balanced plan for these configured nodes and powers."""
    if not 1 <= len(powers) <= MAX_NODES:
        raise ValueError(f"a farm has 1 to {MAX_NODES} nodes, got {len(powers)}")
    if any(p < 1 for p in powers.values()):
        raise ValueError("powers must be positive integers")
    return _plan(tuple(sorted(powers.items())))


def assignment(powers: Mapping[str, int], members: Iterable[str]) -> BucketMap:
    return plan(powers).assign(members)


def _seed_key(
    names: tuple[str, ...], weights: tuple[int, ...], bucket: int
) -> Callable[[int], tuple[float, str]]:
    def key(i: int) -> tuple[float, str]:
        return ((_hash(names[i], bucket) + 1) / weights[i], names[i])

    return key


@functools.lru_cache(maxsize=64)
def _plan(items: tuple[tuple[str, int], ...]) -> BucketPlan:
    names = tuple(n for n, _ in items)
    weights = tuple(p for _, p in items)
    n = len(names)
    full = (1 << n) - 1
    # Seed: weighted rendezvous order (smaller hash/power first), ties broken by name.
    prefs = [sorted(range(n), key=_seed_key(names, weights, b)) for b in range(NBUCKETS)]
    if n == 1:
        return BucketPlan(names, weights, tuple(tuple(p) for p in prefs))
    popcount = [bin(m).count("1") for m in range(full + 1)]
    importance = [_TOP_WEIGHT if popcount[m] >= n - 1 else 1.0 for m in range(full + 1)]
    total = [sum(weights[i] for i in range(n) if m >> i & 1) for m in range(full + 1)]
    ideal = [
        [NBUCKETS * weights[i] / total[m] if m >> i & 1 else 0.0 for i in range(n)]
        for m in range(full + 1)
    ]
    count = [[0] * n for _ in range(full + 1)]
    for pref in prefs:
        for m in range(1, full + 1):
            count[m][next(i for i in pref if m >> i & 1)] += 1

    for _ in range(_MAX_PASSES):
        improved = False
        for pref in prefs:
            before = 0  # nodes ahead of position k in this bucket's list
            for k in range(n - 1):
                a, c = pref[k], pref[k + 1]
                both = (1 << a) | (1 << c)
                # Swapping a and c changes the owner (a -> c) exactly for the memberships
                # holding both and none of the nodes ahead of them.
                free = full & ~(before | both)
                delta = 0.0
                for sub in _submasks(free):
                    m = sub | both
                    da = count[m][a] - ideal[m][a]
                    dc = count[m][c] - ideal[m][c]
                    delta += importance[m] * (
                        _penalty(da - 1) - _penalty(da) + _penalty(dc + 1) - _penalty(dc)
                    )
                if delta < -1e-9:
                    for sub in _submasks(free):
                        m = sub | both
                        count[m][a] -= 1
                        count[m][c] += 1
                    pref[k], pref[k + 1] = c, a
                    improved = True
                before |= 1 << pref[k]
        if not improved:
            break
    if n <= _EXHAUSTIVE_NODES:
        _polish(prefs, count, ideal, importance, n)
    return BucketPlan(names, weights, tuple(tuple(p) for p in prefs))


def _polish(
    prefs: list[list[int]],
    count: list[list[int]],
    ideal: list[list[float]],
    importance: list[float],
    n: int,
) -> None:
    """Small farms: also try every ordering of a bucket's list (n! of them), which escapes
    the local minima of adjacent swaps."""
    full = (1 << n) - 1
    orders = list(itertools.permutations(range(n)))
    owner_of = {
        o: [next((i for i in o if m >> i & 1), -1) for m in range(full + 1)] for o in orders
    }
    for _ in range(_MAX_PASSES):
        improved = False
        for b, pref in enumerate(prefs):
            current = owner_of[tuple(pref)]
            for m in range(1, full + 1):
                count[m][current[m]] -= 1
            best, best_cost = tuple(pref), 0.0
            costs = {}
            for o in orders:
                owners = owner_of[o]
                cost = 0.0
                for m in range(1, full + 1):
                    d = count[m][owners[m]] - ideal[m][owners[m]]
                    cost += importance[m] * (_penalty(d + 1) - _penalty(d))
                costs[o] = cost
            best_cost = costs[best]
            for o in orders:
                if costs[o] < best_cost - 1e-9:
                    best, best_cost = o, costs[o]
            if best != tuple(pref):
                improved = True
                prefs[b] = list(best)
            for m in range(1, full + 1):
                count[m][owner_of[best][m]] += 1
        if not improved:
            return
