"""The simulation engine's adjustments to Flower's runtime."""

from __future__ import annotations

import inspect
import os
import threading

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
