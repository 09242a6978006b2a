"""The control plane's sandbox gate: per-name operations run together, reconciliation alone
(never beside a create in flight), and a thread inside may nest without deadlocking."""

from __future__ import annotations

import threading
import time

from appliance.control.sandboxes import _Gate


def test_reconciliation_waits_for_operations_in_flight_and_blocks_new_ones() -> None:
    gate = _Gate()
    events: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def create() -> None:
        with gate.shared():
            inside.set()
            release.wait(5)
            events.append("create done")

    def reconcile() -> None:
        with gate.exclusive():
            events.append("reconcile")
            time.sleep(0.1)
            events.append("reconcile done")

    def later() -> None:
        with gate.shared():
            events.append("later")

    first = threading.Thread(target=create)
    first.start()
    assert inside.wait(5)
    rec = threading.Thread(target=reconcile)
    rec.start()
    time.sleep(0.1)
    nxt = threading.Thread(target=later)
    nxt.start()
    time.sleep(0.1)
    assert events == []  # the reconciler waits for the create; the newcomer for the reconciler
    release.set()
    for t in (first, rec, nxt):
        t.join(5)
    assert events == ["create done", "reconcile", "reconcile done", "later"]


def test_two_shared_holders_run_together() -> None:
    gate = _Gate()
    both = threading.Barrier(2, timeout=5)

    def hold() -> None:
        with gate.shared():
            both.wait()  # raises BrokenBarrierError if the second never got in

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not both.broken


def test_a_thread_inside_may_nest_while_a_reconciler_waits() -> None:
    gate = _Gate()
    waiting = threading.Event()
    nested_done = threading.Event()

    def reconcile() -> None:
        waiting.set()
        with gate.exclusive():
            pass

    with gate.shared():
        rec = threading.Thread(target=reconcile)
        rec.start()
        assert waiting.wait(5)
        time.sleep(0.1)  # the reconciler now waits, and holds newcomers back
        with gate.shared():  # ...but not this thread, which it waits for
            nested_done.set()
    rec.join(5)
    assert nested_done.is_set() and not rec.is_alive()
