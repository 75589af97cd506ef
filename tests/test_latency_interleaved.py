"""Tests of interleaved latency measurement (kdforge.evaluation.latency.interleaved_latency).

Most tests run on a fake integer-microsecond clock (``perf_counter`` of the module is patched)
so the timings, and hence medians, spreads and speedups, are known exactly; one test uses real
``time.sleep`` durations.
"""

import gc
import json
import os
import time

import numpy as np
import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.evaluation import latency as latency_mod
from kdforge.evaluation.latency import (
    describe_latency_noise,
    interleaved_latency,
    measure_latency,
    speedup_interval,
)
from kdforge.evaluation.model_report import ModelReport, comparison_summary


class FakeClock:
    """An integer-microsecond clock; forwards advance it by their cost."""

    def __init__(self):
        self.us = 0

    def __call__(self) -> float:
        return self.us / 1e6


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(latency_mod, "perf_counter", fake)
    return fake


@pytest.fixture
def quiet_machine(monkeypatch):
    """Load average 0 on 2 CPUs, so only the timings can make a result noisy."""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


def constant_forwards(clock, costs_us, calls=None):
    """name -> forward that costs ``costs_us[name]`` microseconds (and logs (name, bs) to ``calls``)."""

    def make(name):
        def forward(batch_size):
            if calls is not None:
                calls.append((name, batch_size))
            clock.us += costs_us[name]

        return forward

    return {name: make(name) for name in costs_us}


# --------------------------------------------------------------------------- speedup_interval


def test_speedup_interval_hand_built():
    assert speedup_interval([10, 10, 10, 10], [5, 5, 5, 5]) == (2.0, 2.0, 2.0)
    # ratio of medians 20 / 5 = 4; every resampled median of ref is 10, 20 or 30 -> ratios in [2, 6]
    ratio, low, high = speedup_interval([10, 20, 30], [5, 5, 5], n_boot=500, seed=1)
    assert ratio == pytest.approx(4.0)
    assert 2.0 <= low <= ratio <= high <= 6.0 and low < high
    assert speedup_interval([10, 20, 30], [5, 5, 5], n_boot=500, seed=1) == (ratio, low, high)  # seeded


def test_speedup_interval_resamples_rounds_paired():
    # round r of the model is exactly half of round r of the reference, whatever the load was in that
    # round: resampling the SAME rounds for both gives ratio 2 in every resample; independent
    # resampling would not (e.g. median 1 vs median 50).
    ref = [2.0, 4.0, 8.0, 16.0, 100.0, 3.0, 50.0]
    model = [x / 2 for x in ref]
    ratio, low, high = speedup_interval(ref, model, n_boot=2000, seed=3)
    assert (ratio, low, high) == pytest.approx((2.0, 2.0, 2.0))


def test_speedup_interval_bad_input():
    with pytest.raises(KDForgeError, match="equally long"):
        speedup_interval([1.0, 2.0], [1.0])
    with pytest.raises(KDForgeError, match="equally long"):
        speedup_interval([], [])
    with pytest.raises(KDForgeError, match="positive"):
        speedup_interval([1.0, 2.0], [0.0, 1.0])


# --------------------------------------------------------------------------- interleaved_latency


def test_interleaved_sleep_speedup_about_three(quiet_machine):
    def sleeper(seconds):
        def forward(batch_size):
            assert torch.is_inference_mode_enabled()
            time.sleep(seconds)

        return forward

    result = interleaved_latency({"teacher": sleeper(0.006), "student": sleeper(0.002)},
                                 batch_sizes=(1,), warmup=1, repeats=15)
    teacher = result["models"]["teacher"]["batch_sizes"]["1"]
    student = result["models"]["student"]["batch_sizes"]["1"]
    assert teacher["median_ms"] >= 6.0 and student["median_ms"] >= 2.0
    speed = result["speedup"]["student"]["1"]
    assert result["reference"] == "teacher" and set(result["speedup"]) == {"student"}
    assert speed["ratio"] == pytest.approx(teacher["median_ms"] / student["median_ms"])
    assert 2.3 < speed["ratio"] < 3.3  # sleep overshoots by a fraction of a ms on a busy machine
    assert speed["low"] <= speed["ratio"] <= speed["high"]


def test_interleaved_rotation_and_warmup_call_order(clock, quiet_machine):
    calls = []
    names = ["a", "b", "c"]
    forwards = constant_forwards(clock, {"a": 1000, "b": 2000, "c": 3000}, calls)
    interleaved_latency(forwards, batch_sizes=(1, 4), warmup=2, repeats=5)
    per_bs = 3 * (2 + 5)
    assert len(calls) == 2 * per_bs
    for i, bs in enumerate((1, 4)):
        block = calls[i * per_bs:(i + 1) * per_bs]
        assert {b for _, b in block} == {bs}
        warm, timed = block[:6], block[6:]
        assert sorted(n for n, _ in warm) == ["a", "a", "b", "b", "c", "c"]
        rounds = [[n for n, _ in timed[3 * r:3 * r + 3]] for r in range(5)]
        assert all(sorted(order) == names for order in rounds)  # every model once per round
        assert rounds[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]  # rotated left by r
        assert {order[0] for order in rounds} == set(names)  # each model is first in some round


def test_interleaved_warmup_not_timed_exact_stats(clock, quiet_machine):
    counts = {"teacher": 0, "student": 0}
    cost_us = {"teacher": 6000, "student": 2000}

    def make(name):
        def forward(batch_size):
            counts[name] += 1
            # the first 3 calls per model (the warm-up of batch size 2) take 100 s on the fake clock
            clock.us += 100_000_000 if counts[name] <= 3 else cost_us[name] * batch_size // 2

        return forward

    result = interleaved_latency({n: make(n) for n in cost_us}, batch_sizes=(2, 8), warmup=3, repeats=7)
    assert counts == {"teacher": 2 * (3 + 7), "student": 2 * (3 + 7)}
    t2 = result["models"]["teacher"]["batch_sizes"]["2"]
    assert t2["median_ms"] == pytest.approx(6.0) and t2["p90_ms"] == pytest.approx(6.0)
    assert t2["mean_ms"] == pytest.approx(6.0) and t2["per_sample_ms"] == pytest.approx(3.0)
    assert t2["q25_ms"] == pytest.approx(6.0) and t2["q75_ms"] == pytest.approx(6.0)
    assert t2["spread"] == pytest.approx(0.0, abs=1e-9)
    s8 = result["models"]["student"]["batch_sizes"]["8"]
    assert s8["median_ms"] == pytest.approx(8.0) and s8["per_sample_ms"] == pytest.approx(1.0)
    for bs in ("2", "8"):
        assert tuple(result["speedup"]["student"][bs].values()) == pytest.approx((3.0, 3.0, 3.0))
    assert result["noisy"] is False and result["noisy_reasons"] == []
    assert describe_latency_noise(result) is None
    for model in result["models"].values():
        assert (model["warmup"], model["repeats"]) == (3, 7)


def test_interleaved_reference_choice(clock, quiet_machine):
    forwards = constant_forwards(clock, {"teacher": 6000, "student": 2000, "tiny": 1000})
    result = interleaved_latency(forwards, batch_sizes=(1,), warmup=0, repeats=4, reference="student")
    assert result["reference"] == "student" and set(result["speedup"]) == {"teacher", "tiny"}
    assert result["speedup"]["teacher"]["1"]["ratio"] == pytest.approx(1 / 3)
    assert result["speedup"]["tiny"]["1"]["ratio"] == pytest.approx(2.0)


def load_jump_forwards(clock, base_us, onset_us, slow):
    """Forwards whose cost changes from ``base`` to ``slow(base)`` for calls starting at/after ``onset_us``
    (another process starts on the machine at that moment); logs (name, cost in ms) of every call."""
    log = []

    def make(name):
        def forward(batch_size):
            cost = base_us[name] if clock.us < onset_us else slow(base_us[name])
            log.append((name, cost / 1e3))
            clock.us += cost

        return forward

    return {name: make(name) for name in base_us}, log


def test_load_jump_interleaving_keeps_ratio_sequential_does_not(clock, quiet_machine):
    base = {"teacher": 6000, "student": 2000}
    # 20 rounds of 8 ms; from 80 ms on (rounds 10..19) the machine runs everything twice as slowly
    forwards, _ = load_jump_forwards(clock, base, onset_us=80_000, slow=lambda us: 2 * us)
    result = interleaved_latency(forwards, batch_sizes=(1,), warmup=0, repeats=20)
    speed = result["speedup"]["student"]["1"]
    assert (speed["ratio"], speed["low"], speed["high"]) == pytest.approx((3.0, 3.0, 3.0))  # the true ratio
    # but the timings themselves are bimodal (6 / 12 ms): IQR / median = (12 - 6) / 9
    teacher = result["models"]["teacher"]["batch_sizes"]["1"]
    assert teacher["spread"] == pytest.approx(6 / 9)
    assert result["noisy"] is True
    assert result["noisy_reasons"] == ["teacher timings spread 67% (IQR/median) at batch 1",
                                       "student timings spread 67% (IQR/median) at batch 1"]
    assert interleaved_latency(forwards, (1,), warmup=0, repeats=20, max_spread=1.0)["noisy"] is False

    # the same load arriving halfway through a one-after-the-other measurement: teacher (120 ms) then
    # student (40 ms); the load hits 6 of the teacher's 20 runs but all of the student's -> ratio 1.5
    clock.us = 0
    forwards, _ = load_jump_forwards(clock, base, onset_us=80_000, slow=lambda us: 2 * us)
    teacher_ms = measure_latency(forwards["teacher"], (1,), warmup=0, repeats=20)["batch_sizes"]["1"]["median_ms"]
    student_ms = measure_latency(forwards["student"], (1,), warmup=0, repeats=20)["batch_sizes"]["1"]["median_ms"]
    assert teacher_ms / student_ms == pytest.approx(1.5)


def test_load_jump_additive_interval_covers_per_round_ratios(clock, quiet_machine):
    base = {"teacher": 6000, "student": 2000}
    # from round 10 on, every call takes 4 ms longer: per-round ratios are 6/2 = 3, then 10/6
    forwards, log = load_jump_forwards(clock, base, onset_us=80_000, slow=lambda us: us + 4000)
    result = interleaved_latency(forwards, batch_sizes=(1,), warmup=0, repeats=20)
    teacher_ms = [ms for name, ms in log if name == "teacher"]
    student_ms = [ms for name, ms in log if name == "student"]
    per_round = np.asarray(teacher_ms) / np.asarray(student_ms)
    assert sorted(set(np.round(per_round, 6))) == pytest.approx([10 / 6, 3.0])
    speed = result["speedup"]["student"]["1"]
    assert speed["ratio"] == pytest.approx(np.median(teacher_ms) / np.median(student_ms))  # 8 / 4
    assert per_round.min() - 1e-9 <= speed["low"] <= speed["ratio"] <= speed["high"] <= per_round.max() + 1e-9
    assert speed["low"] <= float(np.median(per_round)) <= speed["high"]
    assert result["noisy"] is True
    # a one-after-the-other measurement with the load starting as the student starts: 6 / 6 = 1,
    # outside every per-round ratio
    clock.us = 0
    forwards, _ = load_jump_forwards(clock, base, onset_us=120_000, slow=lambda us: us + 4000)
    sequential = [measure_latency(forwards[n], (1,), warmup=0, repeats=20)["batch_sizes"]["1"]["median_ms"]
                  for n in ("teacher", "student")]
    assert sequential[0] / sequential[1] == pytest.approx(1.0)
    assert sequential[0] / sequential[1] < per_round.min() - 0.5


def test_noisy_reasons_from_load_average(clock, monkeypatch):
    forwards = constant_forwards(clock, {"teacher": 6000, "student": 2000})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    loads = iter([(0.5, 0.4, 0.3), (5.04, 1.0, 0.5)])  # before, after
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    result = interleaved_latency(forwards, (1,), warmup=0, repeats=3)
    assert result["load"] == {"before": [0.5, 0.4, 0.3], "after": [5.04, 1.0, 0.5], "cpus": 2}
    assert result["noisy"] is True and result["noisy_reasons"] == ["machine load 5.0 on 2 CPUs"]
    line = describe_latency_noise(result)
    assert line == ("latency noisy: machine load 5.0 on 2 CPUs — re-measure on an idle machine with "
                    "`kdforge bench-latency RUN_DIR`")

    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # exactly one task per CPU: not oversubscribed
    assert interleaved_latency(forwards, (1,), warmup=0, repeats=3)["noisy"] is False

    def no_loadavg():
        raise OSError("not available")

    monkeypatch.setattr(os, "getloadavg", no_loadavg)
    result = interleaved_latency(forwards, (1,), warmup=0, repeats=3)
    assert result["load"]["before"] is None and result["noisy"] is False


def test_interleaved_json_round_trip_and_report_format(clock, quiet_machine):
    forwards = constant_forwards(clock, {"teacher": 6000, "student": 1500})
    result = interleaved_latency(forwards, batch_sizes=(1, 32), warmup=1, repeats=5)
    assert json.loads(json.dumps(result)) == result
    assert set(result) == {"models", "speedup", "reference", "max_spread", "load", "noisy", "noisy_reasons"}
    single = measure_latency(forwards["student"], (1, 32), warmup=1, repeats=5)
    for model in result["models"].values():
        assert set(model) == set(single)  # stored as a model's latency, exactly measure_latency's format
        assert set(model["batch_sizes"]) == {"1", "32"}
        for bs, stats in model["batch_sizes"].items():
            assert set(single["batch_sizes"][bs]) <= set(stats)
    # the report's speedup (teacher median / student median) is the interleaved ratio
    reports = [ModelReport(name=n, metrics={"accuracy": 0.9}, main_metric="accuracy", ece=None, params=1,
                           size_mb=1.0, latency=result["models"][n]) for n in ("teacher", "student")]
    summary = comparison_summary(*reports)
    assert summary["speedup"] == pytest.approx({bs: result["speedup"]["student"][bs]["ratio"] for bs in ("1", "32")})
    assert summary["speedup"]["1"] == pytest.approx(4.0)


def test_interleaved_threads_and_gc_restored(clock, quiet_machine):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    seen = []

    def forward(batch_size):
        seen.append((torch.get_num_threads(), gc.isenabled()))
        clock.us += 1000

    result = interleaved_latency({"a": forward, "b": forward}, (1,), warmup=1, repeats=2, threads=wanted)
    assert seen[:2] == [(wanted, True)] * 2  # warm-up: gc still on
    assert seen[2:] == [(wanted, False)] * 4  # timed: gc off
    assert result["models"]["a"]["threads"] == wanted and torch.get_num_threads() == before
    assert gc.isenabled()

    def boom(batch_size):
        raise RuntimeError("fail")

    with pytest.raises(RuntimeError):
        interleaved_latency({"a": forward, "b": boom}, (1,), warmup=0, repeats=2, threads=wanted)
    assert torch.get_num_threads() == before and gc.isenabled()


def test_interleaved_bad_input(clock, quiet_machine):
    forwards = constant_forwards(clock, {"teacher": 2000, "student": 1000})
    with pytest.raises(KDForgeError, match="reference 'nope'"):
        interleaved_latency(forwards, reference="nope")
    with pytest.raises(KDForgeError, match="at least one model"):
        interleaved_latency({})
    with pytest.raises(KDForgeError, match="repeats >= 1"):
        interleaved_latency(forwards, repeats=0)
    with pytest.raises(KDForgeError, match="latency_batch_sizes"):
        interleaved_latency(forwards, batch_sizes=(0,))
