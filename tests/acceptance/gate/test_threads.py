"""Under xdist the gate's workers share the cores: N workers computing at once each get cores / N torch threads
(every torch process otherwise starts one thread per core, and N x cores threads spin-wait for each other)."""

from __future__ import annotations

import os

import pytest

from qexport.pytest_plugin import _threads_per_worker


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


def test_one_busy_worker_keeps_torch_default(two_cores):
    assert _threads_per_worker(1) is None


def test_busy_workers_share_the_cores(two_cores):
    assert _threads_per_worker(2) == 1


def test_more_workers_than_cores_still_get_one_thread(two_cores):
    assert _threads_per_worker(8) == 1


def test_omp_num_threads_set_by_the_user_wins(two_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _threads_per_worker(2) is None
