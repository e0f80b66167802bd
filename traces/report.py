"""The replay's report: ``report.json`` (a contract other tools read), ``report.md`` and PNG plots.

``report.json`` top level: ``cluster``, ``jobs_trace``, ``faas_trace``, ``policies`` (policy
name -> ``recovered_core_hours``, ``recovered_memory_gib_hours``, ``wasted_cost``,
``recovered_cost``, ``faas_invocations_total``, ``faas_invocations_served``,
``faas_invocations_rejected``, ``evictions``, ``interference_violation_hours``,
``replay_seconds`` and more), plus ``wasted``, ``prices``, ``limits``, ``models``,
``measured_vs_modelled`` and ``assumptions``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from policies.limits import Limits
from policies.prices import GIB, Prices
from traces.interference import InterferenceModel
from traces.replay import ReplayResult
from traces.usage import UsageModel

log = logging.getLogger(__name__)

CITATIONS = (
    "Parallel Workloads Archive: D. G. Feitelson, D. Tsafrir, D. Krakov, 'Experience with using the "
    "Parallel Workloads Archive', JPDC 74(10), 2014 (acknowledge the log's provider, see its header).",
    "Azure Functions 2019: M. Shahrad et al., 'Serverless in the Wild', USENIX ATC 2020 (CC-BY 4.0); "
    "the bundled slice is In-Vitro's (D. Ustiugov et al., 2023).",
    "Azure Functions 2021: Y. Zhang et al., 'Faster and Cheaper Serverless Computing on Harvested "
    "Resources', SOSP 2021 (CC-BY 4.0).",
    "Co-location slowdowns and Piz Daint utilization: M. Copik et al., 'Software Resource "
    "Disaggregation for HPC with Serverless Computing', IPDPS 2024.",
)


def report_dict(
    result: ReplayResult,
    *,
    jobs_path: str,
    jobs_format: str,
    faas_path: str,
    faas_format: str,
    prices: Prices,
    limits: Limits,
    usage: UsageModel,
    interference: InterferenceModel,
) -> dict[str, Any]:
    """Everything report.json holds (see the module docstring)."""
    info = result.info
    cluster = result.cluster
    wasted_idle = float(result.wasted_idle_cost.sum())
    wasted_unalloc = float(result.wasted_unallocated_cost.sum())
    hours = result.step_s / 3600.0
    return {
        "cluster": {
            "nodes": cluster.nodes,
            "cores_per_node": cluster.cores_per_node,
            "memory_per_node_bytes": cluster.memory_per_node_bytes,
            "memory_reserved_bytes": cluster.memory_reserved_bytes,
            "cores": cluster.cores,
            "memory_bytes": cluster.memory_bytes,
        },
        "jobs_trace": {
            "path": jobs_path,
            "format": jobs_format,
            "jobs": info["jobs_in_trace"],
            "jobs_placed": info["jobs_placed"],
            "job_pieces": info["job_pieces"],
            "skipped_by_reader": info["jobs_skipped_by_reader"],
            "skipped_by_placement": {
                k: v
                for k, v in _notes(info["jobs_skipped_by_placement"]).items()
                if "(placed)" not in k
            },
            "placed_with_notes": {
                k: v
                for k, v in _notes(info["jobs_skipped_by_placement"]).items()
                if "(placed)" in k
            },
            "span_days": info["span_days"],
            "start_epoch_s": float(result.t[0]) if result.t.size else 0.0,
        },
        "faas_trace": {
            "path": faas_path,
            "format": faas_format,
            "functions": info["faas_functions"],
            "trace_minutes": info["faas_trace_minutes"],
            "repeats": info["faas_repeats"],
            "scale": info["faas_scale"],
            "invocations_total": float(result.demand.invocations.sum()),
            "mean_demand_cores": float(result.demand.cores.mean()) if result.t.size else 0.0,
            "mean_demand_memory_gib": float(result.demand.memory_bytes.mean() / GIB)
            if result.t.size
            else 0.0,
            "notes": info["faas_notes"],
        },
        "wasted": {
            "idle_in_allocations_cost": wasted_idle,
            "unallocated_cost": wasted_unalloc,
            "total_cost": wasted_idle + wasted_unalloc,
            "idle_in_allocations_core_hours": float(
                (result.allocated_cores - result.used_cores).sum() * hours
            ),
            "unallocated_core_hours": float((cluster.cores - result.allocated_cores).sum() * hours),
            "idle_in_allocations_memory_gib_hours": float(
                (result.allocated_memory_bytes - result.used_memory_bytes).sum() * hours / GIB
            ),
            "unallocated_memory_gib_hours": float(
                (
                    cluster.nodes * (cluster.memory_per_node_bytes - cluster.memory_reserved_bytes)
                    - result.allocated_memory_bytes
                ).sum()
                * hours
                / GIB
            ),
        },
        "policies": {name: dict(series.summary) for name, series in result.policies.items()},
        "prices": prices.model_dump(),
        "limits": limits.model_dump(),
        "models": {
            "usage": usage.model_dump(),
            "interference": interference.model_dump(),
            "seed": info["seed"],
        },
        "measured_vs_modelled": {
            "jobs_placed": info["jobs_placed"],
            "cpu_use_measured_jobs": info["cpu_use_measured_jobs"],
            "memory_use_measured_jobs": info["memory_use_measured_jobs"],
            "cpu_use_modelled_jobs": _int(info["jobs_placed"])
            - _int(info["cpu_use_measured_jobs"]),
            "memory_use_modelled_jobs": _int(info["jobs_placed"])
            - _int(info["memory_use_measured_jobs"]),
            "memory_bound_jobs_modelled": info["memory_bound_jobs"],
        },
        "assumptions": [
            *assumptions(result),
            f"Policies decide under the limits in report.json; with the guard on, functions may hold "
            f"at most {limits.max_function_share:.0%} of a node's cores and memory, and modelled "
            f"pressure reaching {limits.cpu_pressure_limit:g} % makes it take leases back."
            if limits.guard
            else "Policies decide under the limits in report.json, without the interference guard.",
        ],
        "differences": policy_differences(result, prices.currency),
        "citations": list(CITATIONS),
    }


GROWTH = ("cpu_growth", "memory_growth")
EXAMPLES = 5


def _top(counts: dict[str, int], n: int = EXAMPLES) -> list[str]:
    return [j for j, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def policy_differences(result: ReplayResult, currency: str = "EUR") -> dict[str, Any]:
    """Why the policies' figures differ: per policy, evictions by reason and the jobs behind
    them (jobs whose use grew into lent cores or memory, jobs that started on leased
    resources); per pair of policies, the difference in offers, money and evictions, and the
    jobs that evicted leases under one policy only. ``text``: one sentence per pair."""
    per: dict[str, Any] = {}
    for name, series in result.policies.items():
        by_reason = {r: int(sum(j.values())) for r, j in series.eviction_jobs.items()}
        grew: dict[str, int] = {}
        for reason in GROWTH:
            for job, count in series.eviction_jobs.get(reason, {}).items():
                grew[job] = grew.get(job, 0) + count
        started = series.eviction_jobs.get("job_start", {})
        per[name] = {
            "evictions": int(series.summary.get("evictions", 0)),
            "evictions_by_reason": {
                k.removeprefix("evictions_"): int(v)
                for k, v in series.summary.items()
                if k.startswith("evictions_")
            },
            "job_evictions_by_reason": by_reason,
            "jobs_that_grew": len(grew),
            "jobs_that_grew_examples": _top(grew),
            "jobs_starting_on_leases": len(started),
            "jobs_starting_on_leases_examples": _top(started),
            "_grew": grew,
        }
    pairs: list[dict[str, Any]] = []
    text: list[str] = []
    names = list(result.policies)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sa, sb = result.policies[a].summary, result.policies[b].summary
            ga, gb = per[a]["_grew"], per[b]["_grew"]
            reasons = sorted(
                set(per[a]["job_evictions_by_reason"]) | set(per[b]["job_evictions_by_reason"])
            )
            reason_diff = {
                r: per[b]["job_evictions_by_reason"].get(r, 0)
                - per[a]["job_evictions_by_reason"].get(r, 0)
                for r in reasons
            }
            reason_diff = {r: d for r, d in reason_diff.items() if d}
            only_b = {j: c for j, c in gb.items() if j not in ga}
            only_a = {j: c for j, c in ga.items() if j not in gb}
            pair = {
                "a": a,
                "b": b,
                "offered_core_hours": sb["offered_core_hours"] - sa["offered_core_hours"],
                "offered_memory_gib_hours": sb["offered_memory_gib_hours"]
                - sa["offered_memory_gib_hours"],
                "recovered_cost": sb["recovered_cost"] - sa["recovered_cost"],
                "evictions": sb["evictions"] - sa["evictions"],
                "interference_violation_hours": sb["interference_violation_hours"]
                - sa["interference_violation_hours"],
                "job_evictions_by_reason": reason_diff,
                "jobs_grew_only_under_b": len(only_b),
                "jobs_grew_only_under_b_examples": _top(only_b),
                "jobs_grew_only_under_a": len(only_a),
                "jobs_grew_only_under_a_examples": _top(only_a),
            }
            pairs.append(pair)
            text.append(_pair_sentence(pair, currency))
    for p in per.values():
        del p["_grew"]
    return {"policies": per, "pairs": pairs, "text": text}


def _pair_sentence(p: dict[str, Any], currency: str) -> str:
    a, b = p["a"], p["b"]
    if not any(
        (
            abs(p["offered_core_hours"]) > 1e-9,
            abs(p["offered_memory_gib_hours"]) > 1e-9,
            p["evictions"],
            p["job_evictions_by_reason"],
        )
    ):
        return (
            f"{b} and {a} made the same offers and evictions: no job's use in this trace falls "
            "between their sizing rules."
        )
    reasons = ", ".join(f"{r} {d:+,}" for r, d in p["job_evictions_by_reason"].items()) or "none"
    out = (
        f"{b} vs {a}: offers {p['offered_core_hours']:+,.0f} core-h and "
        f"{p['offered_memory_gib_hours']:+,.0f} GiB-h, recovers {p['recovered_cost']:+,.2f} "
        f"{currency}, {p['evictions']:+,.0f} evictions (per job and reason: {reasons}), "
        f"{p['interference_violation_hours']:+,.1f} violation h."
    )
    for side, other, key, sign in ((b, a, "b", 1), (a, b, "a", -1)):
        n = p[f"jobs_grew_only_under_{key}"]
        if not n:
            continue
        ex = ", ".join(p[f"jobs_grew_only_under_{key}_examples"])
        out += f" Under {side} only, {_jobs(n)} evicted leases as their use grew (e.g. {ex})"
        if sign * p["offered_core_hours"] > 0 or sign * p["offered_memory_gib_hours"] > 0:
            out += f": {other} had not lent them what they grew into."
        elif sign * p["job_evictions_by_reason"].get("memory_growth", 0) > 0:
            out += f": {side} takes memory back on a rising trend, before the job reaches it."
        else:
            out += "."
    pressure = p["job_evictions_by_reason"].get("pressure", 0)
    if pressure and pressure * p["offered_core_hours"] > 0:
        more, less = (b, a) if pressure > 0 else (a, b)
        out += (
            f" The extra pressure evictions and violation hours come from functions on idle "
            f"cores inside running jobs, which {more} lends and {less} does not."
        )
    if abs(p["recovered_cost"]) < 0.005 and p["offered_core_hours"]:
        out += (
            " The extra offer recovers no money: the FaaS load was already served by what "
            "both offered."
        )
    return out


def _jobs(n: int) -> str:
    return f"{n:,} job" if n == 1 else f"{n:,} jobs"


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _notes(value: object) -> dict[str, int]:
    return dict(value) if isinstance(value, dict) else {}


def assumptions(result: ReplayResult) -> list[str]:
    """What the replay assumed, in words, for the report."""
    info = result.info
    return [
        "Jobs run at their recorded start times, placed first fit on identical nodes; times are "
        "snapped to a 1-minute grid (a job shorter than a minute holds its allocation for one grid minute).",
        "Where a trace has no memory allocation, a job gets a core-proportional share of node memory.",
        "Mean job usage is measured where the trace has it (SWF fields 6/7, sacct TotalCPU/MaxRSS); "
        "else the busy share comes with the real CPU shape of a SURF Lisa job of about the same "
        "duration and memory from the HPC2N fit. Use varies over time along real shapes "
        "(traces/shapes.py: SURF Lisa CPU, Google 2011 memory), on the 1-minute grid, in quarter "
        "cores and 1/64 of the allocation.",
        f"The FaaS trace ({info['faas_trace_minutes']} minutes) is repeated back to back "
        f"{_float(info['faas_repeats']):.1f} times to cover the job trace"
        + (
            " (the Azure 2019 window is 8 h, so it repeats three times a day and the rest of the daily cycle is not modelled)"
            if info["faas_trace_minutes"] == 480
            else ""
        )
        + f", scaled by {info['faas_scale']}.",
        "FaaS demand is a fluid per minute: each running invocation holds one core and its "
        "function's instance memory; the served share is min(1, offered/demanded) over cores and memory.",
        "Each node's lease is its share of the cluster-wide FaaS load (offer x utilisation); evicted "
        "instances restart elsewhere (counted as cold starts).",
        "Interference: slowdown = class sensitivity x function share of the node's cores (LULESH "
        "-1.1..+3.1 %, MILC +3.0..+12.4 % at half the node, Copik et al. 2024); violation hours "
        "count job-node time above limits.slowdown_budget.",
    ]


def comparison_table(report: dict[str, Any]) -> str:
    """A fixed-width table of the policies for the terminal."""
    currency = report["prices"]["currency"]
    head = (
        f"{'policy':<12} {'offered core-h':>15} {'recovered core-h':>17} {'recovered GiB-h':>16} "
        f"{'recovered ' + currency:>14} {'% of wasted':>11} {'served %':>9} {'evictions':>10} {'violation h':>12}"
    )
    lines = [head, "-" * len(head)]
    wasted = report["wasted"]["total_cost"]
    for name, s in report["policies"].items():
        total = s["faas_invocations_total"]
        served = 100.0 * s["faas_invocations_served"] / total if total else 0.0
        share = 100.0 * s["recovered_cost"] / wasted if wasted else 0.0
        lines.append(
            f"{name:<12} {s['offered_core_hours']:>15,.0f} {s['recovered_core_hours']:>17,.0f} "
            f"{s['recovered_memory_gib_hours']:>16,.0f} {s['recovered_cost']:>14,.2f} {share:>10.2f}% "
            f"{served:>8.1f}% {s['evictions']:>10,.0f} {s['interference_violation_hours']:>12,.1f}"
        )
    w = report["wasted"]
    lines.append(
        f"wasted: {w['total_cost']:,.2f} {currency} "
        f"({w['idle_in_allocations_cost']:,.2f} idle inside allocations, {w['unallocated_cost']:,.2f} unallocated)"
    )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """report.md: tables, what was measured and what modelled, assumptions, citations."""
    c, j, f, w = report["cluster"], report["jobs_trace"], report["faas_trace"], report["wasted"]
    currency = report["prices"]["currency"]
    out = [
        "# colocate replay report",
        "",
        f"Cluster: {c['nodes']} nodes x {c['cores_per_node']} cores, "
        f"{c['memory_per_node_bytes'] / GIB:.1f} GiB per node.",
        f"Jobs: `{j['path']}` ({j['format']}), {j['jobs']} jobs, {j['jobs_placed']} placed, "
        f"{j['span_days']:.1f} days. Skipped: {j['skipped_by_reader'] or 'none'} (reader), "
        f"{j['skipped_by_placement'] or 'none'} (placement); placed with a note: "
        f"{j['placed_with_notes'] or 'none'}.",
        f"FaaS: `{f['path']}` ({f['format']}), {f['functions']} functions, {f['trace_minutes']} minutes "
        f"repeated {f['repeats']:.1f} times, scale {f['scale']}; mean demand {f['mean_demand_cores']:.1f} cores, "
        f"{f['mean_demand_memory_gib']:.2f} GiB.",
        "",
        "## Policies",
        "",
        "| policy | offered core-h | offered GiB-h | recovered core-h | recovered GiB-h | recovered "
        f"{currency} | wasted {currency} | invocations served | rejected | evictions | cold starts | "
        "violation h | replay s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, s in report["policies"].items():
        out.append(
            f"| {name} | {s['offered_core_hours']:,.0f} | {s['offered_memory_gib_hours']:,.0f} | "
            f"{s['recovered_core_hours']:,.0f} | {s['recovered_memory_gib_hours']:,.0f} | "
            f"{s['recovered_cost']:,.2f} | {s['wasted_cost']:,.2f} | {s['faas_invocations_served']:,.0f} | "
            f"{s['faas_invocations_rejected']:,.0f} | {s['evictions']:,.0f} | {s['cold_starts']:,.0f} | "
            f"{s['interference_violation_hours']:,.1f} | {s['replay_seconds']:.2f} |"
        )
    mm = report["measured_vs_modelled"]
    out += [
        "",
        "## Why the policies differ",
        "",
        *[f"- {t}" for t in report["differences"]["text"]],
        *[
            f"- {name}: evictions per job and reason {d['job_evictions_by_reason'] or 'none'}; "
            f"{d['jobs_that_grew']:,} jobs grew into lent resources"
            + (f" (e.g. {', '.join(d['jobs_that_grew_examples'])})" if d["jobs_that_grew"] else "")
            + f"; {d['jobs_starting_on_leases']:,} jobs started on leased resources."
            for name, d in report["differences"]["policies"].items()
        ],
        "",
        "## Money wasted (policy-independent)",
        "",
        "| | core-h | GiB-h | cost |",
        "|---|--:|--:|--:|",
        f"| idle inside allocations | {w['idle_in_allocations_core_hours']:,.0f} | "
        f"{w['idle_in_allocations_memory_gib_hours']:,.0f} | {w['idle_in_allocations_cost']:,.2f} |",
        f"| unallocated | {w['unallocated_core_hours']:,.0f} | {w['unallocated_memory_gib_hours']:,.0f} | "
        f"{w['unallocated_cost']:,.2f} |",
        "",
        "## Measured and modelled",
        "",
        f"- Measured from the trace: job times and allocations; CPU use of {mm['cpu_use_measured_jobs']} "
        f"jobs, memory use of {mm['memory_use_measured_jobs']} jobs (of {mm['jobs_placed']} placed).",
        f"- Modelled: CPU use of {mm['cpu_use_modelled_jobs']} jobs and memory use of "
        f"{mm['memory_use_modelled_jobs']} jobs (traces/usage.py), the start-up phase of every job, "
        f"the interference class of every job ({mm['memory_bound_jobs_modelled']} memory-bound), "
        "FaaS placement and cold starts.",
        f"- Seed {report['models']['seed']}; prices: {report['prices']}.",
        "",
        "## Assumptions",
        "",
        *[f"- {a}" for a in report["assumptions"]],
        "",
        "## Plots",
        "",
        "![harvestable and harvested](harvest.png)",
        "![wasted and recovered money](money.png)",
        "![evictions](evictions.png)",
        "",
        "## Citations",
        "",
        *[f"- {c}" for c in report["citations"]],
        "",
    ]
    return "\n".join(out)


def _hourly(
    values: np.ndarray[Any, np.dtype[np.float64]], per: int
) -> np.ndarray[Any, np.dtype[np.float64]]:
    n = values.size // per * per
    if n == 0:
        return values
    return np.asarray(values[:n].reshape(-1, per).mean(axis=1), dtype=np.float64)


def plots(result: ReplayResult, report: dict[str, Any], out: Path) -> list[Path]:
    """harvest.png, money.png and evictions.png in ``out`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = max(1, result.t.size // 1500)  # at most ~1500 points per line
    days = _hourly((result.t - result.t[0]) / 86400.0, per) if result.t.size else result.t
    paths = []

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(
        days,
        _hourly(result.cluster.cores - result.used_cores, per),
        color="0.6",
        lw=0.8,
        label="wasted cores (idle + unallocated)",
    )
    for name, s in result.policies.items():
        line = ax.plot(days, _hourly(s.offered_cores, per), lw=0.9, label=f"{name}: offered")[0]
        ax.plot(
            days,
            _hourly(s.harvested_cores, per),
            lw=0.9,
            ls="--",
            color=line.get_color(),
            label=f"{name}: harvested",
        )
    ax.set_xlabel("days since trace start")
    ax.set_ylabel("cores")
    ax.set_title("Harvestable (offered) and harvested cores")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "harvest.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(report["policies"])
    recovered = [report["policies"][n]["recovered_cost"] for n in names]
    ax.bar(
        ["wasted"],
        [report["wasted"]["idle_in_allocations_cost"]],
        color="0.5",
        label="idle inside allocations",
    )
    ax.bar(
        ["wasted"],
        [report["wasted"]["unallocated_cost"]],
        bottom=[report["wasted"]["idle_in_allocations_cost"]],
        color="0.75",
        label="unallocated",
    )
    ax.bar(names, recovered, color="tab:green", label="recovered by functions")
    ax.set_ylabel(report["prices"]["currency"])
    ax.set_title("Money wasted and recovered")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "money.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    for name, s in result.policies.items():
        ax.plot((result.t - result.t[0]) / 86400.0, np.cumsum(s.evictions), lw=1.0, label=name)
    ax.set_xlabel("days since trace start")
    ax.set_ylabel("evictions (cumulative)")
    ax.set_title("Lease evictions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "evictions.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(result: ReplayResult, report: dict[str, Any], out: Path) -> list[Path]:
    """Write report.json, report.md and the plots into ``out`` (created); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    written = [out / "report.json", out / "report.md", *plots(result, report, out)]
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written
