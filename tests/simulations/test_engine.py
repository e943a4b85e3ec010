"""The simulation engine's adjustments to Flower's runtime."""

from __future__ import annotations

import inspect
import os
import threading
import time

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from simulations import engine


def test_flower_still_runs_its_client_workers_in_a_default_sized_pool() -> None:
    # What the adjustment relies on: one worker loop per actor, submitted to a pool built
    # with no size. If a Flower release changes this, the adjustment must be revisited.
    source = inspect.getsource(vce_api.run_api)
    assert "ThreadPoolExecutor()" in source and "backend.num_workers" in source


def test_every_actor_gets_a_worker_thread_on_a_small_machine() -> None:
    engine._size_worker_pool_to_actors()
    engine._size_worker_pool_to_actors()  # idempotent
    # More simultaneous workers than the stock default (cpu_count + 4) would allow here.
    workers = (os.cpu_count() or 1) + 4 + 6
    barrier = threading.Barrier(workers, timeout=20)
    with vce_api.ThreadPoolExecutor() as pool:
        # Each worker waits for all the others: this only completes if all run at once, as
        # Flower's worker loops (each blocked on its actor) must.
        results = list(pool.map(lambda _: barrier.wait(), range(workers)))
    assert sorted(results) == list(range(workers))


def test_client_threads_finish_their_work_before_ray_is_shut_down() -> None:
    """On Ctrl-C the engine shuts Ray down while Flower's client threads may still wait on an
    actor, and Ray's core worker then ends the process with status 1. The engine first lets
    every client pool's threads finish (here: a call that takes 0.3 s) and leave."""
    release = threading.Event()
    pool = engine._ActorSizedPool()
    running = pool.submit(release.wait, 0.3)  # an actor call in flight, answering in 0.3 s
    idle = pool.submit(lambda: None)
    idle.result(timeout=5)
    assert not running.done()
    pool.shutdown(wait=False)  # as Flower's ``with`` block leaves it, Ctrl-C or not
    engine._join_client_threads(10.0)
    assert running.done() and running.result() is False  # it ran to its end, not cut short
    alive = [t.name for t in threading.enumerate() if t.name.startswith(engine.CLIENT_THREAD_PREFIX)]
    assert alive == []  # the idle threads left too


def test_a_client_thread_that_will_not_finish_is_left_after_the_timeout() -> None:
    release = threading.Event()
    pool = engine._ActorSizedPool()
    stuck = pool.submit(release.wait, 30)
    try:
        engine._join_client_threads(0.2)  # returns: Ray is shut down anyway, with a warning
        assert not stuck.done()
    finally:
        release.set()
        stuck.result(timeout=5)
        pool.shutdown(wait=True)


def test_flowers_ray_backend_lets_the_client_threads_finish_before_it_shuts_ray_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's run_api sets its stop event and calls RayBackend.terminate (which shuts Ray down)
    at once; with the engine's adjustment, terminate waits for the client threads first."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    monkeypatch.setattr(RayBackend, "terminate", RayBackend.terminate)  # restored after the test
    order: list[str] = []
    monkeypatch.setattr("ray.shutdown", lambda *a, **k: order.append("ray.shutdown"))
    engine._join_clients_before_ray_shutdown()
    engine._join_clients_before_ray_shutdown()  # idempotent: one wrapper
    assert RayBackend.terminate.__wrapped__.__name__ == "terminate"  # type: ignore[attr-defined]
    pool = engine._ActorSizedPool()
    in_flight = pool.submit(lambda: (time.sleep(0.3), order.append("client done")))
    pool.shutdown(wait=False)  # as Flower's ``with`` block leaves it before terminate
    backend = object.__new__(RayBackend)  # what terminate reads of it: its actor pool, none here
    backend.pool = None  # type: ignore[assignment]
    RayBackend.terminate(backend)
    assert in_flight.done() and order == ["client done", "ray.shutdown"]
