"""The broker's scheduling policy (nodes/broker_core.py) without processes, sockets or sleeps:
every call takes the time, and what the broker would send is returned as data."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from chunkbus.bus import mdp
from chunkbus.bus.mdp import RequestOptions, WorkerInfo
from chunkbus.nodes.broker_core import (
    Accepted,
    Answer,
    Dispatch,
    Removed,
    Scheduler,
    SchedulerConfig,
    State,
    ToWorker,
)


def scheduler(**config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config))


def ask(core: Scheduler, rid: str, now: float, service="svc", priority=0, ttl=None, key=None, robot="robot",
        identity="") -> list:
    """A request whose client, body and request id are all `rid`; `identity`: its key's (CURVE)."""
    options = RequestOptions(priority=priority, ttl=ttl, replace_key=key, request_id=rid, robot_id=robot)
    return core.request(rid.encode(), service, [rid.encode()], options, now, identity)


def join(core: Scheduler, name: str, now: float, capacity: int = 1, service: str = "svc") -> list:
    return core.worker_ready(name.encode(), service, WorkerInfo(capacity=capacity, name=name), now)


def dispatched(outputs: list) -> list[tuple[str, str]]:
    """(worker, request id) of each Dispatch, in order."""
    return [(o.worker.decode(), o.body[0].decode()) for o in outputs if isinstance(o, Dispatch)]


def answered(outputs: list) -> dict[str, str]:
    """{request id: outcome} of each Answer."""
    return {o.request_id: o.outcome for o in outputs if isinstance(o, Answer)}


def ticket_of(outputs: list, rid: str) -> bytes:
    return next(o.ticket for o in outputs if isinstance(o, Dispatch) and o.body[0].decode() == rid)


def answer_of(outputs: list, rid: str) -> Answer:
    return next(o for o in outputs if isinstance(o, Answer) and o.request_id == rid)


def finish(core: Scheduler, worker: str, now: float) -> list:
    """The reply of a worker that holds one request."""
    [ticket] = core.workers[worker.encode()].running
    return core.reply(worker.encode(), ticket, [b"ok"], now)


def test_priority_first_then_fifo_within_a_priority():
    core = scheduler()
    out = join(core, "w", 0.0) + ask(core, "busy", 1.0)
    for i, (name, priority) in enumerate([("b0", 0), ("c5", 5), ("d0", 0), ("e5", 5), ("f9", 9)]):
        out += ask(core, name, 2.0 + i, priority=priority)
    assert dispatched(out) == [("w", "busy")]
    order = []
    for i in range(5):
        order += [rid for _, rid in dispatched(finish(core, "w", 10.0 + i))]
    assert order == ["f9", "c5", "e5", "b0", "d0"]


def test_robots_take_turns_so_a_flood_delays_another_robot_by_the_running_work_only():
    core = scheduler()
    out = join(core, "w", 0.0)
    for i in range(8):  # robot "flood" sends eight at once; the first runs
        out += ask(core, f"flood{i}", 1.0 + i / 100, robot="flood")
    out += ask(core, "calm", 2.0, robot="calm")  # after all of them
    assert dispatched(out) == [("w", "flood0")]
    assert dispatched(finish(core, "w", 3.0)) == [("w", "calm")]  # next, ahead of flood1..7
    order = [rid for i in range(7) for _, rid in dispatched(finish(core, "w", 4.0 + i))]
    assert order == [f"flood{i}" for i in range(1, 8)]  # a robot's own stay in order


def test_a_robots_own_requests_stay_in_order_as_its_earlier_ones_finish():
    core = scheduler()
    out = join(core, "w", 0.0)
    for i in range(4):
        out += ask(core, f"a{i}", 1.0 + i / 10, robot="a")
    finish(core, "w", 2.0)  # a0 done, a1 runs
    out = finish(core, "w", 2.1)  # a1 done, a2 runs
    out += ask(core, "a4", 2.2, robot="a") + ask(core, "b0", 2.3, robot="b")
    order = [rid for _, rid in dispatched(out)]
    order += [rid for i in range(3) for _, rid in dispatched(finish(core, "w", 3.0 + i))]
    assert order == ["a2", "b0", "a3", "a4"]


def test_priority_still_goes_before_turns():
    core = scheduler()
    out = join(core, "w", 0.0) + ask(core, "a0", 1.0, robot="a") + ask(core, "a1", 1.1, robot="a", priority=5)
    out += ask(core, "b0", 1.2, robot="b")
    assert [rid for i in range(2) for _, rid in dispatched(finish(core, "w", 2.0 + i))] == ["a1", "b0"]


def test_a_robot_holds_at_most_max_per_robot_requests_and_others_are_not_refused():
    core = scheduler(max_per_robot=3)
    out = join(core, "w", 0.0)
    for i in range(5):
        out += ask(core, f"a{i}", 1.0, robot="a")
    out += ask(core, "b0", 1.0, robot="b")
    outcomes = answered(out)
    assert outcomes == {"a3": "rejected", "a4": "rejected"}
    assert "max-per-robot" in answer_of(out, "a3").why
    finish(core, "w", 2.0)  # a0 done: robot a may send one more
    assert answered(ask(core, "a5", 2.1, robot="a")) == {}


def test_the_bound_and_the_replace_keys_follow_the_key_identity_not_the_claimed_robot_id():
    core = scheduler(max_per_robot=2)
    join(core, "w", 0.0)
    out = ask(core, "x0", 1.0, robot="x", identity="lab") + ask(core, "y0", 1.0, robot="y", identity="lab")
    assert answered(ask(core, "z0", 1.0, robot="z", identity="lab")) == {"z0": "rejected"}
    assert dispatched(out) == [("w", "x0")]


def test_replace_keys_are_scoped_per_robot():
    core = scheduler()
    out = join(core, "w", 0.0) + ask(core, "busy", 1.0, robot="c")
    out += ask(core, "a-old", 2.0, key="k", robot="a")
    out += ask(core, "b-new", 3.0, key="k", robot="b")  # the same key, another robot: no effect on a's
    assert answered(out) == {}
    out = ask(core, "a-new", 4.0, key="k", robot="a")
    assert answered(out) == {"a-old": "superseded"}


def test_a_request_is_accepted_then_dispatched_and_its_reply_forwarded_as_it_came():
    core = scheduler()
    join(core, "w", 0.0)
    out = ask(core, "r", 1.0)
    assert [type(o) for o in out] == [Accepted, Dispatch]
    assert out[0].body == [b"r"] and out[1].worker == b"w"
    [answer] = core.reply(b"w", out[1].ticket, [b"chunk"], 1.5)
    assert (answer.client, answer.outcome, answer.reply) == (b"r", "ok", [b"chunk"])
    assert core.services["svc"].outcomes["ok"] == 1 and list(core.services["svc"].service_time) == [0.5]
    [error] = core.reply(b"w", ask(core, "e", 2.0)[1].ticket, [b"error"], 2.5, worker_error=True)
    assert error.outcome == "worker_error" and core.services["svc"].outcomes["worker_error"] == 1


def test_a_queued_request_expires_at_its_ttl_and_never_runs():
    core = scheduler()
    out = join(core, "w", 0.0) + ask(core, "busy", 0.0) + ask(core, "short", 0.0, ttl=0.2)
    assert core.next_expiry() == 0.2
    assert core.expire(0.19) == []
    [answer] = core.expire(0.2)
    assert (answer.request_id, answer.outcome) == ("short", "expired")
    assert "ttl passed" in answer.why
    assert dispatched(core.reply(b"w", ticket_of(out, "busy"), [b"ok"], 5.0)) == []


def test_the_broker_is_not_woken_for_the_ttl_of_a_request_no_longer_queued():
    core = scheduler()
    join(core, "w", 0.0)
    ask(core, "runs", 0.0, ttl=0.5)  # dispatched at once
    ask(core, "queued", 0.1, ttl=0.8)
    assert core.next_expiry() == 0.9
    finish(core, "w", 0.2)  # "queued" runs now
    assert core.next_expiry() == math.inf


def test_an_expired_request_is_answered_rather_than_dispatched_when_a_worker_frees_up():
    core = scheduler(default_ttl=1.0)  # for requests that carry no ttl
    out = join(core, "w", 0.0) + ask(core, "busy", 0.0) + ask(core, "waits", 0.0)
    done = core.reply(b"w", ticket_of(out, "busy"), [b"ok"], 2.0)  # before expire() ran
    assert answered(done) == {"busy": "ok", "waits": "expired"} and dispatched(done) == []


def test_a_zero_ttl_expires_even_without_a_worker():
    core = scheduler()
    ask(core, "x", 1.0, service="nobody", ttl=0.0)
    assert answered(core.expire(1.0)) == {"x": "expired"}


def test_a_new_request_supersedes_the_queued_one_with_its_key():
    core = scheduler()
    out = join(core, "w", 0.0) + ask(core, "busy", 0.0, key="robot")
    out += ask(core, "old", 1.0, key="robot") + ask(core, "other", 2.0, key="another-robot")
    new = ask(core, "new", 3.0, key="robot")
    assert answered(new) == {"old": "superseded"} and "'new'" in new[0].why
    assert core.services["svc"].queued == 2
    order = dispatched(finish(core, "w", 4.0)) + dispatched(finish(core, "w", 5.0))
    assert order == [("w", "other"), ("w", "new")]  # the running request was not superseded


def test_a_full_queue_rejects_at_once():
    core = scheduler(max_queue=2)
    out = join(core, "w", 0.0)
    for i, rid in enumerate(("busy", "q1", "q2", "q3")):
        out += ask(core, rid, float(i))
    assert answered(out) == {"q3": "rejected"}
    assert "full (2 requests)" in answer_of(out, "q3").why
    assert not any(isinstance(o, Accepted) and o.body == [b"q3"] for o in out)  # taps never see it


def test_a_worker_is_given_work_only_when_idle_as_many_as_its_capacity():
    core = scheduler()
    out = []
    for capacity in (1, 2, 3):
        out += join(core, f"w{capacity}", 0.0, capacity=capacity)
    for i in range(7):
        out += ask(core, f"r{i}", 1.0 + i)
    # The idle worker with the most capacity first; a busy one gets nothing, free slots or not.
    assert dispatched(out) == [("w3", "r0"), ("w2", "r1"), ("w1", "r2")]
    assert core.services["svc"].queued == 4
    assert all(len(w.running) == 1 for w in core.workers.values())
    # Idle again: a batch as large as its capacity, in queue order.
    batch = finish(core, "w3", 9.0)
    assert dispatched(batch) == [("w3", "r3"), ("w3", "r4"), ("w3", "r5")]
    assert [mdp.following(o.ticket) for o in batch if isinstance(o, Dispatch)] == [2, 1, 0]
    assert dispatched(finish(core, "w2", 9.5)) == [("w2", "r6")]


def test_a_high_priority_request_never_waits_behind_a_low_one_at_a_worker():
    core = scheduler()
    join(core, "w", 0.0, capacity=2)
    ask(core, "low1", 1.0)
    out = ask(core, "low2", 1.1) + ask(core, "low3", 1.2) + ask(core, "high", 1.3, priority=10)
    assert dispatched(out) == []  # w runs low1: a second request would wait there
    assert dispatched(finish(core, "w", 2.0)) == [("w", "high"), ("w", "low2")]


def test_requests_spread_over_idle_workers_before_filling_a_batch():
    core = scheduler(max_attempts=2)
    for i in range(3):
        ask(core, f"r{i}", float(i))
    assert dispatched(join(core, "a", 5.0, capacity=4)) == [("a", "r0"), ("a", "r1"), ("a", "r2")]
    join(core, "b", 6.0, capacity=2)
    join(core, "c", 6.0, capacity=2)
    # a is lost: its three requests go to the two idle workers, one each before a second;
    # each worker's batch is sent back to back, each ticket saying how many more follow it.
    out = core.remove_worker(b"a", "it disconnected", 7.0)
    assert dispatched(out) == [("b", "r0"), ("b", "r2"), ("c", "r1")]
    assert [mdp.following(o.ticket) for o in out if isinstance(o, Dispatch)] == [1, 0, 0]


def test_least_recently_used_also_among_workers_used_at_the_same_instant():
    core = scheduler()
    join(core, "a", 0.0)
    join(core, "b", 0.0)
    ask(core, "r0", 0.5)
    finish(core, "a", 1.0)
    assert dispatched(ask(core, "r1", 2.0) + ask(core, "r2", 2.0)) == [("b", "r1"), ("a", "r2")]
    finish(core, "a", 3.0)
    finish(core, "b", 3.0)
    assert dispatched(ask(core, "r3", 4.0)) == [("b", "r3")]  # b's turn came first at 2.0


def test_a_lost_workers_requests_are_requeued_in_their_arrival_order():
    core = scheduler(max_attempts=2)
    out = join(core, "dies", 0.0, capacity=2) + ask(core, "first", 1.0) + ask(core, "second", 2.0)
    out += ask(core, "third", 3.0)
    lost = core.remove_worker(b"dies", "it disconnected", 4.0)
    assert lost == [Removed("dies", "svc", "it disconnected", 1)]  # busy with "first": given no more
    assert core.services["svc"].queued == 3 and core.running == {}
    assert [rid for _, rid in dispatched(join(core, "healthy", 5.0, capacity=3))] == ["first", "second", "third"]


def test_a_request_fails_after_max_attempts_or_when_its_ttl_passed():
    core = scheduler(max_attempts=2)
    join(core, "a", 0.0)
    ask(core, "again", 0.0)
    assert answered(core.remove_worker(b"a", "it disconnected", 1.0)) == {}  # re-queued
    join(core, "b", 1.0)
    out = core.remove_worker(b"b", "it disconnected", 2.0)
    assert answered(out) == {"again": "failed"} and "after 2 attempts" in answer_of(out, "again").why
    join(core, "c", 3.0)
    ask(core, "short", 3.0, ttl=1.0)
    out = core.remove_worker(b"c", "it disconnected", 5.0)
    assert answered(out) == {"short": "failed"} and "ttl has passed" in answer_of(out, "short").why


def test_a_silent_worker_is_dropped_and_the_others_get_heartbeats():
    core = scheduler(heartbeat_interval=0.5, heartbeat_liveness=3)
    join(core, "silent", 0.0)
    join(core, "talks", 0.0)
    ask(core, "stranded", 0.1)
    core.heard(b"talks", 1.0)
    assert core.heartbeat(1.4) == [ToWorker(b"silent", mdp.HEARTBEAT), ToWorker(b"talks", mdp.HEARTBEAT)]
    core.heard(b"talks", 1.5)
    out = core.heartbeat(1.5)  # 1.5 s after "silent" was last heard
    assert out[0] == Removed("silent", "svc", "no heartbeat for 1.5 s", 1)
    assert dispatched(out) == [("talks", "stranded")]
    assert ToWorker(b"talks", mdp.HEARTBEAT) in out and b"silent" not in core.workers


def test_a_late_reply_is_discarded_and_counted():
    core = scheduler(heartbeat_liveness=3)
    out = join(core, "slow", 0.0) + ask(core, "r", 0.0)
    ticket = ticket_of(out, "r")
    core.remove_worker(b"slow", "no heartbeat for 1.5 s", 2.0)
    out = join(core, "fast", 2.0)
    assert answered(core.reply(b"fast", ticket_of(out, "r"), [b"ok"], 2.5)) == {"r": "ok"}
    assert core.reply(b"slow", ticket, [b"late"], 3.0) == []  # from the dropped worker
    assert core.reply(b"fast", ticket_of(out, "r"), [b"again"], 3.0) == []  # answered already
    assert core.reply(b"fast", b"no such ticket", [b"?"], 3.0) == []
    assert core.late_replies == 3


def test_a_request_a_worker_holds_too_long_fails_and_its_reply_is_late():
    core = scheduler(request_timeout=60.0)
    out = join(core, "w", 0.0) + ask(core, "stuck", 0.0) + ask(core, "next", 1.0)
    core.heard(b"w", 60.0)
    assert answered(core.heartbeat(60.0)) == {}
    core.heard(b"w", 60.5)
    timed_out = core.heartbeat(60.5)
    assert answered(timed_out) == {"stuck": "failed"}
    assert "did not answer within 60 s" in answer_of(timed_out, "stuck").why
    assert dispatched(timed_out) == [("w", "next")]  # its slot is free again
    assert core.reply(b"w", ticket_of(out, "stuck"), [b"late"], 61.0) == []


def test_ready_twice_drops_the_worker_and_tells_it_to_disconnect():
    core = scheduler()
    join(core, "w", 0.0)
    ask(core, "r", 0.0)
    out = join(core, "w", 1.0)
    assert out[0] == Removed("w", "svc", "it sent READY twice", 1)
    assert out[-1] == ToWorker(b"w", mdp.DISCONNECT)
    assert core.workers == {} and core.services["svc"].queued == 1


def test_shutdown_answers_everything_held_and_disconnects_every_worker():
    core = scheduler()
    join(core, "w", 0.0)
    ask(core, "running", 0.0)
    ask(core, "queued", 1.0)
    out = core.shutdown()
    assert answered(out) == {"running": "failed", "queued": "failed"}
    assert [o.request_id for o in out if isinstance(o, Answer)] == ["queued", "running"]
    assert out[-1] == ToWorker(b"w", mdp.DISCONNECT)


# --- every request is answered exactly once, whatever happens -----------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Random requests, workers that join, leave, die and reply (also too late), and time
    passing. Every output is checked as the broker would send it."""

    def __init__(self):
        super().__init__()
        self.core = scheduler(max_queue=4, request_timeout=5.0, max_attempts=2, heartbeat_liveness=3)
        self.now = 0.0
        self.requests: list[str] = []
        self.answers: dict[str, str] = {}
        self.holding: dict[bytes, dict[bytes, str]] = {}  # worker -> {ticket: request id} it was sent
        self.stale: list[tuple[bytes, bytes]] = []  # (worker, ticket) whose reply must be discarded
        self.dead: set[bytes] = set()  # workers that stopped talking
        self.workers = 0

    def apply(self, outputs: list) -> None:
        given: dict[bytes, set[bytes]] = {}
        for out in outputs:
            if isinstance(out, Dispatch):
                given.setdefault(out.worker, set()).add(out.ticket)
        for identity, tickets in given.items():  # a worker is given work only when it runs nothing
            if identity in self.core.workers:
                assert set(self.core.workers[identity].running) <= tickets
        for out in outputs:
            if isinstance(out, Dispatch):
                rid = out.body[0].decode()
                assert rid not in self.answers, f"{rid} dispatched after its answer"
                self.holding[out.worker][out.ticket] = rid
            elif isinstance(out, Answer):
                assert out.request_id not in self.answers, f"{out.request_id} answered twice"
                assert out.client == out.request_id.encode()
                assert (out.reply is not None) == (out.outcome in ("ok", "worker_error"))
                self.answers[out.request_id] = out.outcome
            elif isinstance(out, Removed):
                identity = out.name.encode()
                self.stale += [(identity, ticket) for ticket in self.holding.pop(identity)]
                self.dead.discard(identity)

    @rule(
        service=st.sampled_from(["a", "b"]),
        priority=st.integers(0, 3),
        ttl=st.none() | st.floats(0, 3),
        key=st.none() | st.sampled_from(["k1", "k2"]),
    )
    def request(self, service, priority, ttl, key):
        rid = f"r{len(self.requests)}"
        self.requests.append(rid)
        self.apply(ask(self.core, rid, self.now, service=service, priority=priority, ttl=ttl, key=key))

    @rule(service=st.sampled_from(["a", "b"]), capacity=st.integers(1, 3))
    def join(self, service, capacity):
        self.workers += 1
        identity = f"w{self.workers}".encode()
        self.holding[identity] = {}
        self.apply(join(self.core, identity.decode(), self.now, capacity=capacity, service=service))

    @rule(pick=st.integers(0, 99), twice=st.booleans())
    def leave(self, pick, twice):
        """DISCONNECT, or READY a second time."""
        if self.holding:
            identity = sorted(self.holding)[pick % len(self.holding)]
            if twice:
                self.apply(self.core.worker_ready(identity, "a", WorkerInfo(), self.now))
            else:
                self.apply(self.core.remove_worker(identity, "it disconnected", self.now))

    @rule(pick=st.integers(0, 99))
    def die(self, pick):
        if self.holding:
            self.dead.add(sorted(self.holding)[pick % len(self.holding)])

    @rule(pick=st.integers(0, 99), error=st.booleans())
    def reply(self, pick, error):
        held = [(w, t) for w, tickets in sorted(self.holding.items()) if w not in self.dead for t in tickets]
        if held:
            identity, ticket = held[pick % len(held)]
            rid = self.holding[identity].pop(ticket)
            body = [b"reply " + rid.encode()]
            self.core.heard(identity, self.now)
            outputs = self.core.reply(identity, ticket, body, self.now, worker_error=error)
            if rid in self.answers:  # timed out meanwhile: late
                assert outputs == []
            else:
                assert outputs[0].request_id == rid and outputs[0].reply == body
            self.stale.append((identity, ticket))
            self.apply(outputs)

    @rule(pick=st.integers(0, 99))
    def late_reply(self, pick):
        if self.stale:
            identity, ticket = self.stale[pick % len(self.stale)]
            late = self.core.late_replies
            assert self.core.reply(identity, ticket, [b"late"], self.now) == []
            assert self.core.late_replies == late + 1

    @rule(seconds=st.floats(0, 2))
    def time_passes(self, seconds):
        self.now += seconds
        for identity in self.holding.keys() - self.dead:
            self.core.heard(identity, self.now)
        self.apply(self.core.expire(self.now))

    @rule()
    def heartbeat(self):
        self.apply(self.core.heartbeat(self.now))

    @invariant()
    def the_books_agree(self):
        core = self.core
        by_worker = {t: r for w in core.workers.values() for t, r in w.running.items()}
        assert by_worker == core.running
        for ticket, request in core.running.items():
            assert request.state is State.RUNNING and request.ticket == ticket
            assert request.worker.running[ticket] is request
            assert request.options.request_id not in self.answers
        for worker in core.workers.values():
            assert len(worker.running) <= worker.info.capacity
        for service in core.services.values():
            queued = {id(r): r for *_, r in service.queue if r.state is State.QUEUED}
            assert service.queued == len(queued)
            assert all(r.state is State.QUEUED for r in service.by_key.values())
        # Each robot's bound counts exactly its requests queued or running.
        queued = {id(r): r for s in core.services.values() for *_, r in s.queue if r.state is State.QUEUED}
        held = Counter(r.robot for r in queued.values())
        held.update(r.robot for r in core.running.values())
        assert core.held == dict(held)

    def teardown(self):
        self.apply(self.core.shutdown())
        assert sorted(self.answers) == sorted(self.requests), "a request went unanswered"


TestEveryRequestIsAnsweredExactlyOnce = SchedulerMachine.TestCase
