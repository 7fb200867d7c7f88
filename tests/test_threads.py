"""The automatic thread count: the cores other programs leave free, measured from /proc/stat."""

from __future__ import annotations

import multiprocessing
import sys
import time

import pytest

from stablekit import threads
from stablekit.threads import CpuSample, auto_threads, free_cores, usable_cores


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_a_busy_process_takes_a_core_off_the_count():
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,))
    spinner.start()
    try:
        time.sleep(0.8)  # the child has started spinning
        free = free_cores(CpuSample.now())
    finally:
        spinner.terminate()
        spinner.join()
    assert free is not None and free <= usable_cores() - 0.6


def test_the_count_is_the_free_cores_rounded_and_at_least_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    monkeypatch.setattr(threads, "_own_seconds", lambda: 0.0)
    clock = iter([0.0, 1.0] * 4)
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    for others, expected in ((0.0, 8), (2.6, 5), (7.9, 1), (30.0, 1)):
        monkeypatch.setattr(threads, "_busy_seconds", lambda: others)
        since = CpuSample(0.0, 0.0, 0.0)  # `others` busy CPU-seconds in a 1 s window
        assert auto_threads(since) == expected, others


def test_omp_num_threads_wins_and_a_machine_without_proc_stat_uses_every_core(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(CpuSample(0.0, None, 0.0)) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert auto_threads(CpuSample(0.0, None, 0.0)) == threads.physical_cores()


def test_hyper_threads_are_not_counted_as_cores(monkeypatch):
    assert 1 <= threads.physical_cores() <= usable_cores()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    monkeypatch.setattr(threads, "free_cores", lambda since: 16.0)
    assert auto_threads(CpuSample(0.0, 0.0, 0.0)) == 8


def test_the_command_line_says_how_many_threads_it_chose(tiny_models, tmp_path, capsys, monkeypatch):
    import torch

    from stablekit.cli import main

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert main(["txt2img", "--model", str(tiny_models["sd1"].single_file), "--prompt", "p", "--steps", "1",
                     "--width", "64", "--height", "64", "--out", str(tmp_path)]) == 0
        err = capsys.readouterr().err
        assert f"1 thread of {usable_cores()} cores" in err
        assert "imports " in err and "model load " in err and "txt2img " in err
    finally:
        torch.set_num_threads(before)
