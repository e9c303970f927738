"""`fedaigc experiment dynamic`: clients that join a running federation.

Every client of the last domain and the last client of the domain before it join after round 1.
A newcomer's first round starts from the common start (the initial LoRA and neutral slot every
client began from), so its first update (or task embedding) is comparable with the profiles of
the clients already placed; the server places it by that similarity (server/strategies.py).
Clusters are formed once, in round 1 (`recluster_every` = every round), so no client already
placed moves. Four runs per seed, with the same clients and partition:

- joined: the existing clients from round 1, the newcomers from round 2, `rounds` rounds more;
- warm: the same, with the newcomers' first round from the global LoRA truncated to their rank
  (`newcomer_start = "global"`, the seed's proposal);
- without newcomers: the same run without them, the existing clients' reference;
- from scratch: the newcomers alone (`local`), each from the initial LoRA, `rounds` rounds.

Scores: the newcomers after 1 and after `rounds` rounds of their own (joined, warm, from scratch),
the existing clients after the last round (joined, warm, without newcomers), where the newcomers
were placed and whether that was right.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedaigc import config
from fedaigc.data.dataset import ImageFolder, ensure_dataset
from fedaigc.errors import UserError
from fedaigc.eval.plots import grouped_bars
from fedaigc.eval.report import markdown_table, render_report
from fedaigc.experiments.common import (
    Plan,
    Result,
    Setting,
    numbers,
    report_data,
    run_lines,
    sample_grid,
    select,
    write_results,
)
from fedaigc.server.rundir import RunDir
from fedaigc.server.strategies import join_threshold

log = logging.getLogger("fedaigc.experiments")

JOIN_AFTER = 1  # rounds the existing clients train before the newcomers join
GROUP = ("style_acc", "class_acc", "fid", "alignment")  # what is averaged over a group of clients
JOINING = ("joined", "warm")  # the settings in which newcomers join the federation


def newcomers(num_clients: int, num_domains: int) -> list[int]:
    """Every client of the last domain present (a domain the federation has not seen: it should
    get a new cluster) and the last client of the domain before it, if that domain keeps another
    client (a domain it has seen: it should join that domain's cluster). Client i's dominant
    domain is domain i mod D (data/dataset.py `partition`)."""
    present = min(num_clients, num_domains)
    if present < 2:
        raise UserError("the dynamic experiment needs clients of at least two domains: use --num-clients 2 or more")
    unseen = [c for c in range(num_clients) if c % num_domains == present - 1]
    seen = [c for c in range(num_clients) if c % num_domains == present - 2]
    return sorted(unseen + (seen[-1:] if len(seen) > 1 else []))


def settings(cfg: config.Config, late: list[int]) -> list[Setting]:
    n, rounds = cfg.federation.num_clients, cfg.federation.rounds
    total = JOIN_AFTER + rounds

    def joins(newcomer: int, existing: int) -> tuple[int, ...]:
        return tuple(newcomer if c in late else existing for c in range(n))

    fed = {"strategy": "cluster", "rounds": total, "recluster_every": total}
    join = fed | {"join_rounds": joins(JOIN_AFTER + 1, 1)}
    return [
        Setting("joined", "newcomers join (ours)", {"federation": join}),
        Setting("warm", "newcomers join, global warm start", {"federation": join | {"newcomer_start": "global"}}),
        Setting("static", "without newcomers", {"federation": fed | {"join_rounds": joins(total + 1, 1)}}),
        Setting(
            "scratch",
            "newcomers from scratch (local)",
            {"federation": {"strategy": "local", "rounds": rounds, "join_rounds": joins(1, rounds + 1)}},
        ),
    ]


def group(per_client: dict, cids: list[int], prefix: str) -> dict[str, float]:
    """Means over `cids` of the quality columns, the worst style accuracy, and each client's."""
    mine = [per_client[str(c)] for c in cids]
    row = {f"{prefix}_{k}": float(np.mean([p[k] for p in mine])) for k in GROUP}
    row[f"{prefix}_worst_style_acc"] = min(p["style_acc"] for p in mine)
    return row | {f"c{c}_{prefix}_style_acc": per_client[str(c)]["style_acc"] for c in cids}


def placement(metrics: dict, late: list[int]) -> dict[str, float]:
    """Where each newcomer went in its first round, and whether that was right: into a cluster with
    existing clients of its domain if there are any, else into a cluster without existing clients."""
    entry = next(r for r in metrics["rounds"] if r["round"] == JOIN_AFTER + 1)
    domains = {int(c): d for c, d in metrics["clustering"]["true_domains"].items()}
    clusters = {int(c): k for c, k in entry["clusters"].items()}
    row: dict[str, float] = {}
    for c in late:
        others = {domains[o] for o, k in clusters.items() if k == clusters[c] and o not in late}
        seen = any(domains[o] == domains[c] for o in clusters if o not in late)
        row[f"c{c}_similarity"] = float(entry["placed"][str(c)])
        row[f"c{c}_new_cluster"] = float(not others)
        row[f"c{c}_right"] = float(domains[c] in others if seen else not others)
    row["placed_right"] = float(np.mean([row[f"c{c}_right"] for c in late]))
    return row


def measure(plan: Plan, name: str, run_cfg: config.Config, run: RunDir, late: list[int], existing: list[int]) -> dict[str, float]:
    """One run's columns: the newcomers after their first and last round (joined, warm, scratch),
    the existing clients after the last (joined, warm, static), and where newcomers join the usual
    numbers and placement. Only those after their last round have every client scored; otherwise
    just the clients compared."""
    rounds = run_cfg.federation.rounds - (JOIN_AFTER if name != "scratch" else 0)
    joins = name in JOINING

    def scores(clients: list[int], at_round: int | None = None) -> dict:
        key = "final" if at_round is None else f"round_{at_round}"
        metrics = plan.scored(run_cfg, run, key=key, at_round=at_round, clients=None if joins and at_round is None else clients)
        return metrics[key]["per_client"]

    row: dict[str, float] = {}
    if name != "static":
        first = JOIN_AFTER + 1 if joins else 1  # the newcomers' first round
        row |= group(scores(late, first if rounds > 1 else None), late, "new_1")
        row |= group(scores(late), late, f"new_{rounds}")
    if name != "scratch":
        row |= group(scores(existing), existing, "old")
    if joins:
        metrics = run.metrics()
        row |= numbers(metrics) | placement(metrics, late)
    return row


def run_dynamic(plan: Plan, only: list[str] | None = None) -> tuple[Path, str]:
    """The four runs (or those in `only`) for every seed; writes results.csv, plots and report.md."""
    cfg = plan.cfg
    domains = ImageFolder(ensure_dataset(plan.data, cfg), size=cfg.data.size).domains
    late = newcomers(cfg.federation.num_clients, len(domains))
    existing = [c for c in range(cfg.federation.num_clients) if c not in late]
    rounds = cfg.federation.rounds
    results = [Result(s) for s in select(settings(cfg, late), only)]
    for seed in plan.seeds:
        for i, result in enumerate(results, 1):
            name = result.setting.name
            run_cfg = result.setting.config(cfg, seed)
            run_dir = plan.out / f"{name}_seed{seed}"
            log.info("[dynamic %d/%d] %s, seed %d: %s", i, len(results), result.setting.label, seed, run_dir)
            run = plan.train(run_cfg, run_dir)
            row = measure(plan, name, run_cfg, run, late, existing)
            result.add(run_dir, row, run.metrics())
    seconds = plan.elapsed()
    write_results(plan, results, seconds)
    by = {r.setting.name: r for r in results}
    summary = "; ".join(
        f"{r.setting.label}: newcomers' style {r.mean(f'new_{rounds}_style_acc'):.1%}, existing {r.mean('old_style_acc'):.1%}"
        for r in results
    )
    return write_report(plan, by, late, existing, domains, seconds), summary


def write_report(
    plan: Plan, by: dict[str, Result], late: list[int], existing: list[int], domains: list[str], seconds: float
) -> Path:
    cfg, plots = plan.cfg, plan.out / "plots"
    rounds = cfg.federation.rounds
    after = [1, rounds] if rounds > 1 else [1]
    domain = {c: domains[c % len(domains)] for c in range(cfg.federation.num_clients)}
    data = {"late": late, "existing": existing, "join_after": JOIN_AFTER, "threshold": join_threshold(cfg.federation)}
    data |= {"placement": None, "newcomers": None, "existing_clients": None}  # the sections whose settings ran fill them
    joining = [by[name] for name in JOINING if name in by]
    if joining:
        rows = []
        for r in joining:
            for c in late:
                seen = any(domain[o] == domain[c] for o in existing)
                rows.append(
                    [
                        r.setting.label,
                        f"{c} ({domain[c]})",
                        "yes" if seen else "no",
                        r.cell(f"c{c}_similarity"),
                        "new cluster" if r.mean(f"c{c}_new_cluster") == 1 else "existing cluster",
                        r.cell(f"c{c}_right", 2),
                    ]
                )
        data["placement"] = markdown_table(
            ["setting", "newcomer", "domain seen before", "similarity to nearest cluster", "placed in", "right"], rows
        )
    newcomer_rows = [by[name] for name in (*JOINING, "scratch") if name in by]
    if newcomer_rows:
        cols = [
            (f"new_{a}_{k}", f"{label} after {a}")
            for k, label in (("style_acc", "style acc"), ("fid", "evaluator-FID"))
            for a in after
        ]
        cols += [(f"new_{a}_worst_style_acc", f"worst style acc after {a}") for a in after]
        grouped_bars(
            [f"after {a} round{'s' if a > 1 else ''}" for a in after],
            {r.setting.label: [r.mean(f"new_{a}_style_acc") for a in after] for r in newcomer_rows},
            "Newcomers' confident style accuracy: joining vs from scratch",
            "style accuracy",
            plots / "newcomers.png",
            ylim=(0, 1),
        )
        per_client = [
            [f"{c} ({domain[c]})"] + [r.cell(f"c{c}_new_{a}_style_acc") for a in after for r in newcomer_rows] for c in late
        ]
        data["newcomers"] = {
            "table": markdown_table(
                ["setting", *[h for _, h in cols]], [[r.setting.label] + [r.cell(k) for k, _ in cols] for r in newcomer_rows]
            ),
            "per_client": markdown_table(
                ["newcomer", *[f"{r.setting.label}, after {a}" for a in after for r in newcomer_rows]], per_client
            ),
        }
    existing_rows = [by[name] for name in ("static", *JOINING) if name in by]
    if existing_rows:
        cols = [("old_style_acc", "style acc"), ("old_worst_style_acc", "worst style acc"), ("old_class_acc", "class acc")]
        cols += [("old_fid", "evaluator-FID"), ("old_alignment", "alignment")]
        grouped_bars(
            [f"{c} ({domain[c]})" for c in existing] + ["mean"],
            {
                r.setting.label: [r.mean(f"c{c}_old_style_acc") for c in existing] + [r.mean("old_style_acc")]
                for r in existing_rows
            },
            "Existing clients' confident style accuracy after the last round",
            "style accuracy",
            plots / "existing.png",
            ylim=(0, 1),
        )
        data["existing_clients"] = markdown_table(
            ["setting", *[h for _, h in cols]], [[r.setting.label] + [r.cell(k) for k, _ in cols] for r in existing_rows]
        )
    rows_of = [(r.setting.label, r.runs[0] / "samples", r.metrics[0]["final"]["per_client"]) for r in joining]
    grid = sample_grid(plan, rows_of) if joining else None
    data = report_data(plan, seconds, grid, run_lines(list(by.values()))) | data
    return render_report("dynamic", data, plan.out / "report.md")
