"""Usage over time: the real-shape model against the figures of the data it was learned from."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from traces import usage as usage_module
from traces.jobs import JobTrace
from traces.shapes import load_library, peak_mean_figures, pick_cpu_shapes
from traces.usage import SHORTEST_SHAPED_S, UsageModel

GIB = 1024**3


def trace(run_s: npt.NDArray[np.float64], cpu: float = np.nan) -> JobTrace:
    n = run_s.size
    return JobTrace(
        path="x",
        format="swf",
        job_id=np.arange(n, dtype=np.int64),
        submit_s=np.zeros(n),
        start_s=np.zeros(n),
        end_s=run_s.astype(np.float64),
        cores=np.full(n, 16, dtype=np.int64),
        nodes=np.full(n, 1, dtype=np.int64),
        memory_alloc_bytes=np.full(n, np.nan),
        cpu_used_ratio=np.full(n, cpu),
        memory_used_bytes=np.full(n, np.nan),
    )


def per_minute(
    usage_steps: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]], minutes: int
) -> npt.NDArray[np.float64]:
    """A job's step function (start fractions, levels) sampled at the middle of each minute."""
    frac, level = usage_steps
    at = (np.arange(minutes) + 0.5) / minutes
    return level[np.searchsorted(frac, at, side="right") - 1]


def modelled_series(
    model: UsageModel, run_s: npt.NDArray[np.float64], seed: int, kind: str
) -> list[npt.NDArray[np.float64]]:
    usage = model.sample(trace(run_s), np.full(run_s.size, 64.0 * GIB), seed)
    values = usage.step_cpu if kind == "cpu" else usage.step_memory
    out = []
    for j, run in enumerate(run_s.tolist()):
        lo, hi = usage.step_offsets[j], usage.step_offsets[j + 1]
        out.append(per_minute((usage.step_frac[lo:hi], values[lo:hi]), int(run // 60)))
    return out


@pytest.fixture(scope="module")
def long_runs() -> npt.NDArray[np.float64]:
    """Run times like the data's jobs of at least an hour (what ``reference`` describes)."""
    library = load_library()
    runs = library.cpu_duration_s[library.cpu_duration_s >= 3600.0]
    return np.random.default_rng(5).choice(runs, size=1500)


def test_cpu_peak_mean_and_bursts_match_the_surf_lisa_data(
    long_runs: npt.NDArray[np.float64],
) -> None:
    """Tolerances: peak/mean median within 10 %, 75th percentile within 20 % (the data is
    sparse between 2.5x and 3.5x), 90th within 15 %, share of jobs above 2x within 5 points,
    bursts (rising past 2x the mean) per hour within 35 % of the raw 1-minute series."""
    ref = load_library().reference["cpu"]
    got = peak_mean_figures(modelled_series(UsageModel(use_measured=False), long_runs, 3, "cpu"))
    for q, tolerance in (("peak_mean_p50", 0.1), ("peak_mean_p75", 0.2), ("peak_mean_p90", 0.15)):
        assert got[q] == pytest.approx(ref[q], rel=tolerance), q
    assert got["share_above_2x"] == pytest.approx(ref["share_above_2x"], abs=0.05)
    assert got["bursts_per_hour"] == pytest.approx(ref["bursts_per_hour"], rel=0.35)
    flat = peak_mean_figures(
        modelled_series(UsageModel(time_shapes="flat", use_measured=False), long_runs, 3, "cpu")
    )
    assert flat["peak_mean_p90"] == pytest.approx(1.0)  # the old model: no variation at all


def test_memory_is_steadier_like_the_google_data(long_runs: npt.NDArray[np.float64]) -> None:
    ref = load_library().reference["memory"]
    got = peak_mean_figures(modelled_series(UsageModel(use_measured=False), long_runs, 3, "memory"))
    assert got["peak_mean_p50"] == pytest.approx(ref["peak_mean_p50"], abs=0.05)
    assert got["peak_mean_p90"] == pytest.approx(ref["peak_mean_p90"], rel=0.15)
    assert got["share_above_2x"] == pytest.approx(ref["share_above_2x"], abs=0.03)


def test_same_seed_same_shapes_other_seed_other_shapes() -> None:
    runs = np.full(300, 7200.0)
    a, b, c = (UsageModel().sample(trace(runs), np.full(300, GIB), s) for s in (1, 1, 2))
    assert np.array_equal(a.step_cpu, b.step_cpu) and np.array_equal(a.step_frac, b.step_frac)
    assert not np.array_equal(a.step_cpu, c.step_cpu)


def test_a_measured_mean_wins_and_the_shape_varies_around_it() -> None:
    runs = np.full(400, 4 * 3600.0)
    usage = UsageModel().sample(trace(runs, cpu=0.3), np.full(400, GIB), seed=0)
    assert usage.cpu_measured.all()
    means = []
    for j in range(400):
        lo, hi = usage.step_offsets[j], usage.step_offsets[j + 1]
        series = per_minute((usage.step_frac[lo:hi], usage.step_cpu[lo:hi]), 240)
        means.append(series.mean())
    # levels are capped at all cores, so a bursty shape keeps a little less than its mean
    assert np.median(means) == pytest.approx(0.3, rel=0.1)
    assert np.diff(usage.step_offsets).max() > 1  # not flat


def test_short_jobs_are_flat_and_steps_start_at_the_start() -> None:
    usage = UsageModel().sample(trace(np.array([120.0, 7200.0])), np.full(2, GIB), seed=0)
    assert usage.step_offsets[1] == 1  # a 2-minute job: one step
    first = usage.step_offsets[:-1]
    assert np.all(usage.step_frac[first] == 0.0)
    assert np.all((usage.step_cpu >= 0) & (usage.step_cpu <= 1))


def plain_steps(
    run_s: npt.NDArray[np.float64], seed: int
) -> tuple[list[int], list[float], list[float], list[float]]:
    """The real-shape steps of each job, one job at a time: the union of its CPU and memory
    shape's step times, each value the last step of its kind at or before that time, scaled
    by the job's means and capped at 1 (a short job: one flat step). The shapes are drawn
    with ``UsageModel.sample``'s generator calls, in its order."""
    library = load_library()
    model = UsageModel()
    rng = np.random.default_rng(seed)
    rng.random(run_s.size)  # the quantile draws sample() makes first
    u_mem = rng.random(run_s.size)
    cpu_shape = pick_cpu_shapes(library, run_s, rng)
    mem_shape = rng.integers(0, len(library.memory), size=run_s.size)
    mem_mean = np.interp(
        u_mem, np.linspace(0.0, 1.0, len(model.memory_quantiles)), model.memory_quantiles
    )
    job: list[int] = []
    frac: list[float] = []
    cpu: list[float] = []
    mem: list[float] = []
    for j, run in enumerate(run_s.tolist()):
        cpu_mean = float(library.cpu_mean_share[cpu_shape[j]])
        if run < SHORTEST_SHAPED_S:
            job.append(j)
            frac.append(0.0)
            cpu.append(min(cpu_mean, 1.0))
            mem.append(min(float(mem_mean[j]), 1.0))
            continue
        c_lo, c_hi = library.cpu.offsets[cpu_shape[j]], library.cpu.offsets[cpu_shape[j] + 1]
        m_lo, m_hi = library.memory.offsets[mem_shape[j]], library.memory.offsets[mem_shape[j] + 1]
        c_frac, c_level = library.cpu.frac[c_lo:c_hi], library.cpu.level[c_lo:c_hi]
        m_frac, m_level = library.memory.frac[m_lo:m_hi], library.memory.level[m_lo:m_hi]
        assert c_frac[0] == 0.0 and m_frac[0] == 0.0
        for f in sorted(set(c_frac.tolist()) | set(m_frac.tolist())):
            c = c_level[np.searchsorted(c_frac, f, side="right") - 1]
            m = m_level[np.searchsorted(m_frac, f, side="right") - 1]
            job.append(j)
            frac.append(f)
            cpu.append(min(float(c) * cpu_mean, 1.0))
            mem.append(min(float(m) * float(mem_mean[j]), 1.0))
    return job, frac, cpu, mem


@pytest.mark.parametrize("chunk", [1 << 20, 64, 5])
def test_vectorised_shape_steps_equal_a_plain_per_job_merge(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oracle for the vectorised merge in ``UsageModel._real_steps`` (one sort per chunk of
    jobs, values looked up only for the steps kept): every step, bit for bit, whether the
    jobs fit one chunk or are cut into many (chunks of 5 raw steps: most jobs alone)."""
    monkeypatch.setattr(usage_module, "CHUNK_STEPS", chunk)
    rng = np.random.default_rng(7)
    run_s = np.concatenate([rng.uniform(60, 600, 40), rng.uniform(600, 3 * 86400, 160)])
    usage = UsageModel().sample(trace(run_s), np.full(run_s.size, GIB), seed=3)
    job, frac, cpu, mem = plain_steps(run_s, seed=3)
    got_job = np.repeat(np.arange(run_s.size), np.diff(usage.step_offsets)).tolist()
    assert got_job == job
    assert usage.step_frac.tolist() == frac
    assert usage.step_cpu.tolist() == cpu
    assert usage.step_memory.tolist() == mem
