"""tools/policy_sim.py, the simulator the cache policy was chosen with: every candidate keeps within its
capacity, scores as `mooncakefs replay` scores (prefix hits), and the ones with a known answer give it."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from mooncakefs.replay import belady_hits, lru_hits

_spec = importlib.util.spec_from_file_location(
    "policy_sim", Path(__file__).resolve().parents[1] / "tools" / "policy_sim.py"
)
assert _spec is not None and _spec.loader is not None
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


def chains(n: int = 200, seed: int = 3) -> list[list[int]]:
    """Shared prefixes and one-off chains, small enough that every policy is quick."""
    return sim.zipf_chains(requests=n, groups=20, seed=seed)


def held(policy, blocks: set[int]) -> int:
    return sum(policy.present(b) for b in blocks)


@pytest.mark.parametrize("name", [n for n in sim.CANDIDATES if not n.startswith("oracle") and n != "LRU"])
def test_every_candidate_keeps_within_its_capacity(name):
    requests = chains()
    blocks = {b for chain in requests for b in chain}
    policy = sim.CANDIDATES[name](40, requests)
    for i, chain in enumerate(requests):
        policy.serve(chain, sim.prefix_len(policy, chain))
        assert i % 10 or held(policy, blocks) <= 40


@pytest.mark.parametrize("name", list(sim.TIERED))
def test_dram_over_ssd_keeps_within_both_tiers(name):
    requests = chains()
    blocks = {b for chain in requests for b in chain}
    tiers = sim.two_level(sim.TIERED[name], 60, 0.33)
    for i, chain in enumerate(requests):
        tiers.serve(chain, sim.prefix_len(tiers, chain))
        assert i % 10 or held(tiers, blocks) <= 60
        assert not any(tiers.dram.present(b) for b in tiers.ssd)  # one copy of each block


def test_the_simulator_scores_as_replay_does():
    requests = chains()
    for capacity in (10, 50, 200):
        assert sim.score(requests, sim.Lru(capacity)) == lru_hits(requests, capacity)
        assert sim.score(requests, sim.Belady(capacity, requests)) == belady_hits(requests, capacity)
    # prefix hits: a block present after a missing one is no hit
    assert sim.score([[1, 2, 3], [9, 2, 3]], sim.Lru(10)) == 0


def test_sieve_keeps_a_visited_block_and_evicts_the_unvisited_in_order():
    sieve = sim.Sieve(3)
    for b in (1, 2, 3, 1, 4):  # 1 visited: the hand spares it and takes 2
        sieve.use(b)
    assert sorted(sieve.visited) == [1, 3, 4]
    sieve.use(5)
    assert sorted(sieve.visited) == [1, 4, 5]


def test_fresh_main_cold_tail_leaves_a_request_s_last_block_first_to_go():
    policy = sim.FreshMain(100, fresh=0.05, leaf_first=True, cold_tail=True)
    policy.serve([1, 2, 3], 0)
    assert list(policy.fresh) == [3, 2, 1]  # oldest first: the tail, then its chain from the leaf up
    policy.serve([1, 2, 7], 2)  # a branch off a known prefix: its new block is cold
    assert next(iter(policy.fresh)) == 7


def test_fresh_main_admits_a_ghost_into_main():
    policy = sim.FreshMain(4, fresh=0.25, ghost=2.0)
    for b in range(6):  # 0 and 1 leave fresh unread, into the ghost list
        policy.use(b)
    assert not policy.present(0) and 0 in policy.ghost
    policy.use(0)
    assert 0 in policy.main


def test_shuffled_keeps_the_requests_and_their_window():
    requests = [[i] for i in range(1000)]
    out = sim.shuffled(requests, window=200, seed=random.randrange(1 << 30))
    assert sorted(out) == requests
    assert all(i // 200 == out[i][0] // 200 for i in range(1000))
