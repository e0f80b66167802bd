"""``colocate tune``: search policy limits that recover the most money within the slowdown
budget and an eviction-rate cap (Optuna's TPE sampler with constraints).

Each candidate is replayed over ``--seeds`` (same trace, same models); its value is the mean
recovered money, and it is feasible when the mean share of job-node time above
``limits.slowdown_budget`` stays under ``--max-violation-share`` and the mean evictions per
recovered core-hour under ``--max-eviction-rate``. Candidates are asked in batches of
``--batch`` and replayed by the chosen runner (local processes, a Slurm job array, Dask);
with the same ``--sampler-seed`` and batch size the study is identical whichever runs it.
The first candidate is the default limits, the baseline the best one is compared with.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Any

from colocate.errors import ConfigError

# name -> (low, high, log scale): limits that decide how much a node lends and for how long
DEFAULT_SPACE: dict[str, tuple[float, float, bool]] = {
    "max_function_share": (0.1, 1.0, False),
    "memory_margin_ratio": (0.0, 0.5, False),
    "cpu_growth_margin": (0.1, 1.0, False),
    "history_window_s": (60.0, 1800.0, True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from colocate.cli import sweep

    parser.add_argument("--jobs", metavar="PATH", help="job trace (default: bundled HPC2N excerpt)")
    parser.add_argument("--jobs-format", choices=["swf", "sacct-json", "sacct-pipe"])
    parser.add_argument(
        "--faas", metavar="PATH", help="FaaS trace (default: bundled Azure 2019 slice)"
    )
    parser.add_argument("--faas-format", choices=["azure2019", "azure2021"])
    parser.add_argument("--faas-scale", type=float, default=1.0, metavar="X")
    parser.add_argument("--nodes", type=int, metavar="N")
    parser.add_argument("--cores-per-node", type=int, metavar="N")
    parser.add_argument("--memory-per-node", metavar="SIZE")
    parser.add_argument(
        "--config",
        metavar="TOML",
        help="colocate config: its [policy.limits] are the start, [prices] the money",
    )
    parser.add_argument("--policy", default="headroom", help="policy to tune (default headroom)")
    parser.add_argument(
        "--seeds",
        default="0",
        metavar="LIST",
        help="replay seeds each candidate is averaged over (default 0)",
    )
    parser.add_argument(
        "--trials", type=int, default=16, metavar="N", help="candidates to replay (default 16)"
    )
    parser.add_argument(
        "--batch", type=int, default=4, metavar="K", help="candidates replayed at once (default 4)"
    )
    parser.add_argument(
        "--sampler-seed", type=int, default=0, help="seed of the search (default 0)"
    )
    parser.add_argument(
        "--param",
        action="append",
        metavar="NAME=LO:HI",
        help="a limit to search and its range (repeatable; append :log for a log scale); "
        "default: " + ", ".join(f"{k}={lo:g}:{hi:g}" for k, (lo, hi, _) in DEFAULT_SPACE.items()),
    )
    parser.add_argument(
        "--max-violation-share",
        type=float,
        default=0.005,
        metavar="SHARE",
        help="cap on the share of job-node time slowed beyond limits.slowdown_budget (default 0.005)",
    )
    parser.add_argument(
        "--max-eviction-rate",
        type=float,
        default=0.5,
        metavar="RATE",
        help="cap on evictions per recovered core-hour (default 0.5)",
    )
    parser.add_argument("--out", metavar="FILE", help="write the study (every candidate) as JSON")
    parser.add_argument("--json", action="store_true", help="print the study as JSON")
    sweep.add_runner_arguments(parser)


def parse_space(items: list[str] | None) -> dict[str, tuple[float, float, bool]]:
    if not items:
        return dict(DEFAULT_SPACE)
    from policies.limits import Limits

    space: dict[str, tuple[float, float, bool]] = {}
    for item in items:
        name, eq, rng = item.partition("=")
        parts = rng.split(":")
        try:
            if not eq or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                raise ValueError
            lo, hi = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(
                f"bad --param {item!r}; e.g. max_function_share=0.1:1 or history_window_s=60:1800:log",
                key="--param",
            ) from None
        if name not in Limits.model_fields:
            raise ConfigError(
                f"unknown limit {name!r}; known: {', '.join(sorted(Limits.model_fields))}",
                key="--param",
            )
        if not lo < hi or (len(parts) == 3 and lo <= 0):
            raise ConfigError(
                f"bad range in --param {item!r}: need LO < HI (and LO > 0 for :log)", key="--param"
            )
        space[name] = (lo, hi, len(parts) == 3)
    return space


def run(args: argparse.Namespace) -> int:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "colocate tune needs Optuna: pip install 'slurm-colocate[sweep]'"
        ) from None
    from colocate.cli import sweep
    from policies import POLICIES
    from policies.limits import Limits
    from traces.sweep import Trial, limit_overrides

    if args.policy not in POLICIES:
        raise ConfigError(
            f"unknown policy {args.policy}; known: {', '.join(POLICIES)}", key="--policy"
        )
    if args.trials < 1 or args.batch < 1:
        raise ConfigError("--trials and --batch must be at least 1", key="--trials")
    space = parse_space(args.param)
    seeds = sweep.parse_seeds(args.seeds, 0)
    fixed, prices = sweep.base_overrides(args)
    trace = sweep.resolve_traces(args, [args.jobs])[0]
    runner = sweep.make_runner(args)

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    sampler = optuna.samplers.TPESampler(seed=args.sampler_seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    defaults = Limits(**fixed)
    study.enqueue_trial(
        {k: min(hi, max(lo, float(getattr(defaults, k)))) for k, (lo, hi, _) in space.items()}
    )
    candidates: list[dict[str, Any]] = []
    started = time.perf_counter()
    rounds = math.ceil(args.trials / args.batch)
    for r in range(rounds):
        k = min(args.batch, args.trials - r * args.batch)
        asked = [study.ask() for _ in range(k)]
        params = []
        for ft in asked:
            p: dict[str, Any] = {}
            for name, (lo, hi, log_scale) in space.items():
                as_int = isinstance(Limits.model_fields[name].default, int) and not isinstance(
                    Limits.model_fields[name].default, bool
                )
                if as_int:
                    p[name] = ft.suggest_int(name, math.ceil(lo), math.floor(hi), log=log_scale)
                else:
                    p[name] = ft.suggest_float(name, lo, hi, log=log_scale)
            params.append(p)
        trials = []
        for p in params:
            lim = limit_overrides({**fixed, **p}, where="--param")
            trials += [
                Trial.from_dict(
                    {
                        **trace,
                        "policy": args.policy,
                        "seed": s,
                        "limits": lim,
                        "prices": prices,
                        "faas_scale": args.faas_scale,
                    }
                )
                for s in seeds
            ]
        rows = runner.run(trials)
        for i, (ft, p) in enumerate(zip(asked, params, strict=True)):
            mine = [row["summary"] for row in rows[i * len(seeds) : (i + 1) * len(seeds)]]
            value = sum(s["recovered_cost"] for s in mine) / len(mine)
            violation = sum(s["violation_share"] for s in mine) / len(mine)
            rate = sum(s["evictions_per_recovered_core_hour"] for s in mine) / len(mine)
            cons = [violation - args.max_violation_share, rate - args.max_eviction_rate]
            ft.set_constraint("violation_share", cons[0])  # feasible when <= 0
            ft.set_constraint("eviction_rate", cons[1])
            study.tell(ft, value)
            candidates.append(
                {
                    "number": ft.number,
                    "limits": p,
                    "recovered_cost": value,
                    "violation_share": violation,
                    "evictions_per_recovered_core_hour": rate,
                    "feasible": all(c <= 0 for c in cons),
                }
            )
            logging.getLogger(__name__).info("candidate %d: %.2f %s", ft.number, value, p)
    wall = time.perf_counter() - started
    baseline = candidates[0]
    feasible = [c for c in candidates if c["feasible"]]
    best = max(feasible, key=lambda c: (c["recovered_cost"], -c["number"])) if feasible else None
    doc = {
        "policy": args.policy,
        "trace": trace,
        "seeds": seeds,
        "space": {k: list(v) for k, v in space.items()},
        "max_violation_share": args.max_violation_share,
        "max_eviction_rate": args.max_eviction_rate,
        "runner": runner.name,
        "wall_s": wall,
        "baseline": baseline,
        "best": best,
        "candidates": candidates,
    }
    if args.out:
        try:
            with open(args.out, "w") as fh:
                json.dump(doc, fh, indent=2)
        except OSError as exc:
            raise ConfigError(f"cannot write the study: {exc.strerror}", path=args.out) from None
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    cur = prices.get("currency", "EUR")
    print(f"{'#':>3} {'recovered ' + cur:>14} {'violation %':>11} {'evict/core-h':>12}  limits")
    for c in candidates:
        shown = " ".join(f"{k}={v:.3g}" for k, v in c["limits"].items())
        flag = "" if c["feasible"] else "  (over a cap)"
        print(
            f"{c['number']:>3} {c['recovered_cost']:>14,.2f} {100 * c['violation_share']:>10.2f}% "
            f"{c['evictions_per_recovered_core_hour']:>12.3f}  {shown}{flag}"
        )
    print(f"{len(candidates)} candidates x {len(seeds)} seeds on {runner.name} in {wall:.1f} s")
    if best is None:
        print(
            "no candidate met both caps (violation share <= "
            f"{args.max_violation_share:g}, evictions per core-hour <= {args.max_eviction_rate:g}); "
            "widen --param ranges or relax the caps"
        )
        return 1
    gain = best["recovered_cost"] - baseline["recovered_cost"]
    print(
        f"best #{best['number']}: {best['recovered_cost']:,.2f} {cur} recovered "
        f"({gain:+,.2f} vs the default limits{'' if baseline['feasible'] else ', which break a cap'}) with "
        + ", ".join(f"{k} = {v:.4g}" for k, v in best["limits"].items())
    )
    return 0
