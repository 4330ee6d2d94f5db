"""Stop agreement and heartbeats (smlt.protocol.control) against a real Redis.

The stop agreement is stated as one invariant, checked after every step of every interleaving:

    no worker has started an iteration >= the agreed stop.

A worker "starts" iteration u when its check at u (:func:`should_stop`) lets it through. If the
invariant breaks, a worker is inside an iteration that some peer will never contribute to (that
peer stopped before it), and the generation hangs until the shard timeout.

The interleavings that matter involve a replacement worker: rank r dies after publishing its
shard of u+1, so its peers may already be in u+1 while the scheduler re-invokes r at u.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from smlt.protocol.control import (
    Heartbeat,
    request_stop,
    schedule_stop,
    should_stop,
    stop_iteration,
)
from smlt.storage import redis_server as redis_server_module
from smlt.storage.redis_server import RedisServer, connect
from smlt.sync.keys import JobKeys

_generation = itertools.count()


class Generation:
    """The workers of one generation as the stop protocol sees them: each rank's checks, and
    which iterations those checks let it start."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.client = client
        self.keys = JobKeys(job_id, "s1")
        self.number = next(_generation)
        self.started: list[int] = []

    def check(self, iteration: int, *, propose: bool = False) -> bool:
        """One worker's check at the start of ``iteration``; True means it stops there."""
        stop = should_stop(self.client, self.keys, self.number, iteration, propose=propose)
        if not stop:
            self.started.append(iteration)
        return stop

    def request(self) -> None:
        request_stop(self.client, self.keys, self.number)

    @property
    def at(self) -> int | None:
        return stop_iteration(self.client, self.keys, self.number)

    def assert_invariant(self) -> None:
        at = self.at
        if at is not None and self.started:
            assert max(self.started) < at, (
                f"the agreed stop is {at}, but a worker has started iteration "
                f"{max(self.started)}: it waits for a peer that stopped"
            )

    def run_to_stop(self, iteration: int) -> int:
        """Check successive iterations from ``iteration`` until told to stop; where it stopped."""
        while not self.check(iteration):
            iteration += 1
            assert iteration < 1000, "no stop was ever agreed"
        return iteration


@pytest.fixture
def gen(redis_server: RedisServer, job_id: str) -> Generation:
    return Generation(connect(redis_server.url), job_id)


def _peers_ahead_of_a_replacement(gen: Generation, peers_in_6: int = 2) -> None:
    """Ranks 0, 1, 2 run iterations 0..5; rank 1 dies after publishing its shard of 6, so its
    peers (the first ``peers_in_6`` of ranks 0 and 2) start 6 while the scheduler re-invokes
    rank 1 at 5."""
    for u in range(6):
        for _rank in range(3):
            assert not gen.check(u)
    for _peer in range(peers_in_6):
        assert not gen.check(6)


def test_a_lagging_proposer_cannot_stop_below_its_peers(gen: Generation) -> None:
    _peers_ahead_of_a_replacement(gen)
    assert not gen.check(5, propose=True)  # the replacement is short of time
    gen.assert_invariant()
    assert gen.at == 7
    # Everyone reaches the agreed boundary: the replacement runs 5 and 6, its peers finish 6.
    assert [gen.run_to_stop(6), gen.run_to_stop(5), gen.run_to_stop(6)] == [7, 7, 7]


def test_a_requested_stop_seen_first_by_a_lagging_worker(gen: Generation) -> None:
    _peers_ahead_of_a_replacement(gen)
    gen.request()  # the scheduler re-scales
    assert gen.at is None  # a request is not a stop iteration until a worker's check
    assert not gen.check(5)
    gen.assert_invariant()
    assert gen.at == 7


@pytest.mark.parametrize("lagging_first", [True, False], ids=["lagging-first", "peer-first"])
def test_two_proposers_agree_on_one_stop(gen: Generation, lagging_first: bool) -> None:
    # Rank 0 is in 6; rank 2 is about to check 6; the replacement (rank 1) checks 5. Both of the
    # latter are short of time.
    _peers_ahead_of_a_replacement(gen, peers_in_6=1)
    proposals = [lambda: gen.check(5, propose=True), lambda: gen.check(6, propose=True)]
    if not lagging_first:
        proposals.reverse()
    for propose in proposals:
        assert not propose()
        gen.assert_invariant()
    assert gen.at == 7


def test_a_scheduled_stop_ends_every_worker_exactly_there(gen: Generation) -> None:
    """A trial of known length: fixed before any worker starts, however fast they run."""
    schedule_stop(gen.client, gen.keys, gen.number, 3)
    assert [gen.run_to_stop(0) for _rank in range(3)] == [3, 3, 3]
    gen.assert_invariant()
    assert gen.started == [0, 1, 2] * 3 and gen.at == 3


def test_a_replacement_behind_a_scheduled_stop_catches_up_to_it(gen: Generation) -> None:
    """Rank 1 dies in iteration 2 of a trial scheduled to end at 4; its peer goes on to the
    stop. The replacement, re-invoked at 2, runs 2 and 3 and stops at 4 with it."""
    schedule_stop(gen.client, gen.keys, gen.number, 4)
    for u in range(2):
        for _rank in range(2):
            assert not gen.check(u)
    assert not gen.check(2)  # rank 1 starts 2, then dies
    assert gen.run_to_stop(2) == 4  # rank 0
    assert gen.run_to_stop(2) == 4  # rank 1's replacement
    gen.assert_invariant()
    assert gen.at == 4


def test_a_worker_out_of_time_brings_a_scheduled_stop_earlier(gen: Generation) -> None:
    schedule_stop(gen.client, gen.keys, gen.number, 10)
    for u in range(4):
        for _rank in range(2):
            assert not gen.check(u)
    assert not gen.check(4, propose=True)  # rank 0's function is about to time out
    gen.assert_invariant()
    assert gen.at == 5
    assert [gen.run_to_stop(4), gen.run_to_stop(5)] == [5, 5]
    gen.request()  # the scheduler's own request changes nothing once a stop is agreed
    assert gen.at == 5


def test_a_proposal_after_the_stop_is_agreed_never_lowers_it(gen: Generation) -> None:
    _peers_ahead_of_a_replacement(gen)
    assert not gen.check(6, propose=True)  # rank 0 proposes: stop at 7
    assert gen.at == 7
    assert not gen.check(5, propose=True)  # the replacement, later, also short of time
    gen.assert_invariant()
    assert gen.at == 7
    assert gen.check(7, propose=True)  # at the boundary: stop, and the stop stays put
    assert gen.at == 7


def test_proposals_at_the_front_stop_after_the_next_iteration(gen: Generation) -> None:
    """Without replacements the rule is the paper's: a proposal at u stops everyone at u+1."""
    for u in range(3):
        for rank in range(2):
            assert not gen.check(u, propose=(u, rank) == (2, 1))
    assert gen.at == 3
    assert gen.check(3) and gen.check(3)


def test_random_interleavings_keep_the_invariant_and_never_deadlock(
    redis_server: RedisServer, job_id: str
) -> None:
    """Random schedules of three ranks: checks, contributions, deaths with re-invocation at the
    unfinished iteration, proposals and scheduler requests. The model enforces synchronous
    training (a rank starts t only once every rank has contributed to t-1); the test asserts the
    invariant after every step, and that the generation always ends with every rank at the agreed
    stop (no rank left waiting for a peer that stopped)."""
    client = connect(redis_server.url)
    for seed in range(150):
        rng = random.Random(seed)
        gen = Generation(client, job_id)
        ranks = 3
        next_check = [0] * ranks  # the iteration each rank checks next
        in_iteration: list[int | None] = [None] * ranks  # started, not yet contributed
        contributed = [-1] * ranks  # survives a rank's death: its shard is in the store
        stopped_at: list[int | None] = [None] * ranks
        for step in range(400):
            late = step > 60  # from here on every check proposes, so the generation ends
            moves = []
            for r in range(ranks):
                if stopped_at[r] is not None:
                    continue
                if in_iteration[r] is not None:
                    moves.append(("contribute", r))
                elif min(contributed) >= next_check[r] - 1:
                    moves.append(("check", r))
                if next_check[r] > 0 and rng.random() < 0.1:
                    moves.append(("die", r))
            if all(s is not None for s in stopped_at):
                break
            assert moves, (
                f"seed {seed}: deadlock: ranks at {next_check} wait for contributions "
                f"{contributed}, but ranks {stopped_at} stopped at the agreed {gen.at}"
            )
            move, r = rng.choice(moves)
            if move == "contribute":
                u = in_iteration[r]
                assert u is not None
                contributed[r] = max(contributed[r], u)
                in_iteration[r] = None
                next_check[r] = u + 1
            elif move == "die":
                # Re-invoked at the iteration the scheduler saw it start last, or the one before
                # if it died between publishing its shard and reporting.
                in_iteration[r] = None
                next_check[r] = max(0, next_check[r] - rng.choice((0, 1)))
            else:
                if rng.random() < 0.03:
                    gen.request()
                propose = late or rng.random() < 0.05
                u = next_check[r]
                if gen.check(u, propose=propose):
                    stopped_at[r] = u
                else:
                    in_iteration[r] = u
            gen.assert_invariant()
        assert stopped_at == [gen.at] * ranks, f"seed {seed}: stopped at {stopped_at}"


# -- heartbeats ---------------------------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class RestartableRedis:
    """An embedded Redis that a test can take away and bring back on the same port with the same
    password, as a user's Redis comes back after a restart: empty."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.server = RedisServer().start()
        self._all = [self.server]

    def restart(self, down_s: float) -> RedisServer:
        port, password = self.server.port, self.server.password
        self.server.stop()
        time.sleep(down_s)
        self.server = RedisServer()
        self.server.password = password
        self._monkeypatch.setattr(redis_server_module, "_free_port", lambda: port)
        self._all.append(self.server.start())
        return self.server

    def close(self) -> None:
        for server in self._all:
            server.stop()


@pytest.fixture
def restartable_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[RestartableRedis]:
    redis = RestartableRedis(monkeypatch)
    try:
        yield redis
    finally:
        redis.close()


def test_heartbeat_survives_redis_going_away_and_coming_back(
    restartable_redis: RestartableRedis,
) -> None:
    server = restartable_redis.server
    # No client-side retries: every failed beat reaches the heartbeat thread as a RedisError.
    client = redis.Redis.from_url(
        server.url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    keys = JobKeys("heartbeat-test", "s1")
    key = keys.heartbeat(0, 1, 0)
    beat = Heartbeat(client, keys, 0, 1, 0, interval_s=0.05, timeout_s=2.0).start()
    try:
        assert connect(server.url).exists(key)
        # Gone for ten intervals; back empty, so the key is there only if the thread renews it.
        back = connect(restartable_redis.restart(down_s=0.5).url)
        assert _wait_for(lambda: bool(back.exists(key)), timeout_s=5), (
            "the heartbeat was not renewed after Redis came back"
        )
        assert 0 < back.pttl(key) <= 2000
        assert beat.statistics()["errors"] >= 1  # it did see Redis gone
    finally:
        beat.stop()


def test_heartbeat_stops_renewing_once_stopped(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    keys = JobKeys("heartbeat-stop", "s1")
    key = keys.heartbeat(3, 0, 2)
    beat = Heartbeat(client, keys, 3, 0, 2, interval_s=0.05, timeout_s=0.3).start()
    time.sleep(0.2)
    assert beat.statistics()["beats"] >= 2
    beat.stop()
    assert _wait_for(lambda: not client.exists(key), timeout_s=2)
