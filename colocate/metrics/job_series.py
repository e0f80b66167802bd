"""Per-job series: allocation, use, jobstats/seff efficiency, pressure and wasted money.

Every series carries ``node`` and ``job_id`` and disappears with the job (the collector
only exports jobs of the latest snapshot), so the job id never grows the series count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from colocate.metrics.accounting import CostAccount, cpu_efficiency, memory_efficiency
from monitors.snapshot import NodeSnapshot

Metric = GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily


def job_families(nodes: Sequence[tuple[NodeSnapshot, CostAccount]]) -> Iterator[Metric]:
    """The ``colocate_job_*`` families of every job of every node's latest snapshot."""
    labels = ["node", "job_id"]
    info = InfoMetricFamily(
        "colocate_job", "a running batch job (uid: colocate_job_uid)", labels=labels
    )
    uid = GaugeMetricFamily("colocate_job_uid", "numeric uid of the job's owner", labels=labels)
    cores = GaugeMetricFamily(
        "colocate_job_cores",
        "job cores: allocated, used (CPU-seconds per second), idle",
        labels=[*labels, "state"],
    )
    memory = GaugeMetricFamily(
        "colocate_job_memory_bytes",
        "job memory: allocated, used, peak, idle (allocated - used)",
        labels=[*labels, "state"],
    )
    cpu_seconds = CounterMetricFamily(
        "colocate_job_cpu_seconds",
        "CPU time the job used on this node since it started",
        labels=labels,
    )
    start = GaugeMetricFamily(
        "colocate_job_start_time_seconds", "job start, epoch seconds", labels=labels
    )
    elapsed = GaugeMetricFamily(
        "colocate_job_elapsed_seconds", "seconds since the job started", labels=labels
    )
    cpu_eff = GaugeMetricFamily(
        "colocate_job_cpu_efficiency_ratio",
        "jobstats/seff CPU efficiency: CPU seconds / (elapsed x allocated cores)",
        labels=labels,
    )
    mem_eff = GaugeMetricFamily(
        "colocate_job_memory_efficiency_ratio",
        "seff memory efficiency: peak / allocated memory",
        labels=labels,
    )
    cpu_psi = GaugeMetricFamily(
        "colocate_job_cpu_pressure_ratio",
        "PSI cpu some avg10 of the job's cgroup, 0..1",
        labels=labels,
    )
    mem_psi = GaugeMetricFamily(
        "colocate_job_memory_pressure_ratio",
        "PSI memory some avg10 of the job's cgroup, 0..1",
        labels=labels,
    )
    idle_core_s = CounterMetricFamily(
        "colocate_job_idle_core_seconds",
        "allocated core-seconds the job did not use, since colocate first saw it",
        labels=labels,
    )
    idle_mem_bs = CounterMetricFamily(
        "colocate_job_idle_memory_byte_seconds",
        "allocated byte-seconds the job did not use, since colocate first saw it",
        labels=labels,
    )
    wasted = CounterMetricFamily(
        "colocate_job_wasted_cost",
        "cost of the job's idle allocation since colocate first saw it (currency: colocate_price_info)",
        labels=[*labels, "resource"],
    )
    for snap, node_account in nodes:
        name = snap.node
        for job in snap.jobs:
            key = [name, job.job_id]
            info.add_metric(
                key, {"user": job.user, "colocate": "allow" if job.colocate else "deny"}
            )
            if job.uid is not None:
                uid.add_metric(key, float(job.uid))
            cores.add_metric([*key, "allocated"], float(job.cores_allocated))
            cores.add_metric([*key, "used"], job.cores_used)
            cores.add_metric([*key, "idle"], job.cores_idle)
            memory.add_metric([*key, "allocated"], float(job.memory_allocated_bytes))
            memory.add_metric([*key, "used"], float(job.memory_used_bytes))
            memory.add_metric([*key, "peak"], float(job.memory_peak_bytes))
            memory.add_metric([*key, "idle"], float(job.memory_unused_bytes))
            account = node_account.jobs.get(job.job_id)
            eff: float | None = None
            if job.start_time is not None:
                age = max(0.0, snap.t - job.start_time)
                start.add_metric(key, job.start_time)
                elapsed.add_metric(key, age)
                if job.cpu_seconds_total is not None:
                    eff = cpu_efficiency(job.cpu_seconds_total, age, job.cores_allocated)
            if eff is None and account is not None:
                # No cumulative CPU time from the monitor: use what colocate observed.
                eff = cpu_efficiency(account.cpu_seconds, account.observed_s, job.cores_allocated)
            if eff is not None:
                cpu_eff.add_metric(key, eff)
            if job.cpu_seconds_total is not None:
                cpu_seconds.add_metric(key, job.cpu_seconds_total)
            meff = memory_efficiency(job.memory_peak_bytes, job.memory_allocated_bytes)
            if meff is not None:
                mem_eff.add_metric(key, meff)
            if job.cpu_pressure is not None:
                cpu_psi.add_metric(key, job.cpu_pressure / 100.0)
            if job.memory_pressure is not None:
                mem_psi.add_metric(key, job.memory_pressure / 100.0)
            if account is not None:
                idle_core_s.add_metric(key, account.idle_core_seconds)
                idle_mem_bs.add_metric(key, account.idle_memory_byte_seconds)
                for resource, cost in sorted(account.wasted_cost.items()):
                    wasted.add_metric([*key, resource], cost)
    yield from (
        info,
        uid,
        cores,
        memory,
        cpu_seconds,
        start,
        elapsed,
        cpu_eff,
        mem_eff,
        cpu_psi,
        mem_psi,
        idle_core_s,
        idle_mem_bs,
        wasted,
    )
