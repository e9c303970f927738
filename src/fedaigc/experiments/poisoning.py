"""`fedaigc experiment poisoning`: attacks inside a cluster, and the robust defense.

Five clients per style (more if the config asks for more clients), one in five of each style an
attacker, so 20 % of every cluster attacks; each style's cluster gets its own attack (backdoor,
scale, sign flip, noise: client/attacks.py). Runs per seed: no attack, no attack with the defense
(its false alarms and cost), attacked without and with the defense (server/defense.py). Per attack:
the quality of the cluster's honest members, detection precision / recall from every round's
rejections, and the backdoor's success on the honest members of its cluster.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedaigc import config
from fedaigc.client.attacks import TRIGGER, backdoor_target, trigger_class
from fedaigc.client.client_app import build_client
from fedaigc.data.dataset import ImageFolder, ensure_dataset, read_images, split
from fedaigc.eval.evaluate import sample_seed
from fedaigc.eval.evaluator import evaluator_for
from fedaigc.eval.metrics import confident_accuracy
from fedaigc.eval.plots import grouped_bars
from fedaigc.eval.report import markdown_table, render_report, save_grid, save_images
from fedaigc.experiments.common import (
    Plan,
    Result,
    Setting,
    federated,
    quality_table,
    report_data,
    run_lines,
    sample_grid,
    select,
    write_results,
)
from fedaigc.inference.device import PersonalModel, generate
from fedaigc.server.rundir import RunDir, write_json
from fedaigc.server.strategies import make_strategy

log = logging.getLogger("fedaigc.experiments")

PER_STYLE = 5  # clients per style at least: one attacker is then 20 % of its cluster
ATTACKER_SHARE = 0.2
STYLE_ATTACKS = ("backdoor", "scale", "signflip", "noise")  # the attack in the cluster of the i-th style (sorted)
ATTACK_LABELS = {"backdoor": "backdoor", "scale": "scaled update", "signflip": "sign flip", "noise": "random noise"}


def layout(plan: Plan) -> tuple[int, dict[int, str], list[str]]:
    """(number of clients, {attacker id: attack}, domains): client c's style is domains[c % D]
    (data.partition), and the first round(20 %) of each style's clients attack."""
    domains = ImageFolder(ensure_dataset(plan.data, plan.cfg), size=plan.cfg.data.size).domains
    per_style = max(PER_STYLE, math.ceil(plan.cfg.federation.num_clients / len(domains)))
    attackers_per_style = max(1, round(ATTACKER_SHARE * per_style))
    attackers = {
        d + len(domains) * j: STYLE_ATTACKS[d % len(STYLE_ATTACKS)]
        for j in range(attackers_per_style)
        for d in range(len(domains))
    }
    return per_style * len(domains), dict(sorted(attackers.items())), domains


def settings(attackers: dict[int, str], num_styles: int) -> list[Setting]:
    """k fixed to the number of styles: with 20 clients the silhouette chose k = 2 after round 1 in
    our demo run (art_painting + photo, cartoon + sketch), which would put two attacks in one cluster."""
    clean = {"strategy": "cluster", "k": num_styles}
    attacked = {**clean, "attackers": tuple(attackers), "attacks": tuple(attackers.values())}
    return [
        Setting("clean", "no attack", {"federation": clean}),
        Setting("clean_defended", "no attack, defense", {"federation": {**clean, "defense": "robust"}}),
        Setting("attacked", "attacked, no defense", {"federation": attacked}),
        Setting("defended", "attacked, defense", {"federation": {**attacked, "defense": "robust"}}),
    ]


def groups(num_clients: int, attackers: dict[int, str], domains: list[str]) -> dict[str, tuple[list[int], list[int]]]:
    """{attack: (its attackers, the honest clients of the styles it attacks)}."""
    out: dict[str, tuple[list[int], list[int]]] = {}
    for attack in dict.fromkeys(attackers.values()):
        bad = [c for c, a in attackers.items() if a == attack]
        styles = {c % len(domains) for c in bad}
        honest = [c for c in range(num_clients) if c % len(domains) in styles and c not in attackers]
        out[attack] = (bad, honest)
    return out


def detection(rounds: list[dict], bad: list[int], honest: list[int]) -> dict[str, float]:
    """Precision and recall of every round's rejections among `bad` + `honest`, and the false
    alarm rate (share of honest updates rejected); precision is NaN where nothing was rejected."""
    rejected = [{int(c) for c in r["rejected"]} for r in rounds]
    hits = sum(len(r & set(bad)) for r in rejected)
    false = sum(len(r & set(honest)) for r in rejected)
    return {
        "precision": hits / (hits + false) if hits + false else math.nan,
        "recall": hits / (len(bad) * len(rounds)) if bad else math.nan,
        "false_alarms": false / (len(honest) * len(rounds)) if honest else math.nan,
    }


def backdoor_success(plan: Plan, run_cfg: config.Config, run: RunDir, victims: list[int], target: str) -> float:
    """Share of the victims' samples for triggered prompts ("a <style> of a fish cf") that the
    evaluator confidently calls `target`; cached in metrics.json, images in samples/triggered/."""
    metrics = run.metrics()
    if "backdoor" in metrics:
        return metrics["backdoor"]["success"]
    folder = ImageFolder(ensure_dataset(plan.data, run_cfg), size=run_cfg.data.size)
    train, _ = split(folder.samples, run_cfg.data.held_out, run_cfg.data.seed)
    evaluator = evaluator_for(folder, train, run_cfg.evaluator, progress=plan.progress)
    aggregator = make_strategy(run_cfg)
    run.restore(aggregator, run.last_round())
    classes = [trigger_class(folder.classes[i % len(folder.classes)]) for i in range(run_cfg.client.samples)]
    per_client = {}
    for cid in victims:
        client = build_client(run_cfg, cid, run_cfg.federation.num_clients, plan.data, plan.model)
        client.load(*aggregator.model_for(cid), aggregator.base_delta())
        prompts = [client.prompt_for(client.domain, c) for c in classes]
        s = run_cfg.sample
        made = generate(
            PersonalModel(client.model, client.token),
            prompts,
            sample_seed(cid),  # evaluate_run's: triggered and plain prompts share their noise
            s.steps,
            s.guidance,
            guidance_rescale=s.guidance_rescale,
        )
        save_images(made.images, run.root / "samples" / "triggered" / f"client_{cid}")
        target_id = evaluator.domains.index(target)
        per_client[str(cid)] = confident_accuracy(
            evaluator.predict(made.images)["domain"], target_id, run_cfg.evaluator.confidence
        )["confident"]
    success = float(np.mean(list(per_client.values())))
    metrics["backdoor"] = {"trigger": TRIGGER, "target": target, "success": success, "per_client": per_client}
    write_json(run.metrics_file, metrics)
    return success


def scorer(plan: Plan, attackers: dict[int, str], domains: list[str]) -> Callable[[config.Config, RunDir], dict[str, float]]:
    """The experiment's own columns of one run: per attack, its honest members' quality, detection
    and (backdoor) trigger success; over all honest clients, quality and detection. The same
    clients count as attackers or honest in every setting, so the no-attack runs are the baseline."""

    def numbers(run_cfg: config.Config, run: RunDir) -> dict[str, float]:
        metrics = run.metrics()
        per_client = metrics["final"]["per_client"]
        num_clients = run_cfg.federation.num_clients
        attacking = bool(run_cfg.federation.attackers)  # in the no-attack runs the would-be attackers are honest too
        row: dict[str, float] = {}
        everyone = [c for c in range(num_clients) if c not in attackers]
        for name, (bad, honest) in [*groups(num_clients, attackers, domains).items(), ("all", (list(attackers), everyone))]:
            for col in ("style_acc", "class_acc", "fid"):
                row[f"{name}_{col}"] = float(np.mean([per_client[str(c)][col] for c in honest]))
            found = detection(metrics["rounds"], bad, honest) if attacking else detection(metrics["rounds"], [], bad + honest)
            row |= {f"{name}_{k}": v for k, v in found.items()}
            if name == "backdoor":
                target = backdoor_target(domains[bad[0] % len(domains)], domains)
                row["backdoor_success"] = backdoor_success(plan, run_cfg, run, honest, target)
        return row

    return numbers


def run_poisoning(plan: Plan, only: list[str] | None = None) -> tuple[Path, str]:
    """Every setting (or those in `only`) for every seed; writes results.csv, plots and report.md."""
    num_clients, attackers, domains = layout(plan)
    cfg = copy.deepcopy(plan.cfg)
    cfg.federation.num_clients = num_clients
    plan = dataclasses.replace(plan, cfg=cfg)
    log.info("[poisoning] %d clients, attackers %s", num_clients, attackers)
    results = federated("poisoning", plan, select(settings(attackers, len(domains)), only), scorer(plan, attackers, domains))
    seconds = plan.elapsed()
    write_results(plan, results, seconds)
    summary = "; ".join(
        f"{r.setting.label}: honest style {r.mean('all_style_acc'):.1%}, FID {r.mean('all_fid'):.1f}"
        + (f", recall {r.mean('all_recall'):.0%}" if "defense" in r.setting.label else "")
        for r in results
    )
    return write_report(plan, results, seconds, num_clients, attackers, domains), summary


def write_report(
    plan: Plan, results: list[Result], seconds: float, num_clients: int, attackers: dict[int, str], domains: list[str]
) -> Path:
    attack_groups = groups(num_clients, attackers, domains)
    attacks = list(attack_groups)
    rows = {
        a: f"{ATTACK_LABELS[a]} ({', '.join(sorted({domains[c % len(domains)] for c in attack_groups[a][0]}))})" for a in attacks
    }
    rows["all"] = "all clusters"
    plots = plan.out / "plots"
    grouped_bars(
        [rows[a] for a in attacks],
        {r.setting.label: [r.mean(f"{a}_style_acc") for a in attacks] for r in results},
        "Style accuracy of the attacked clusters' honest members",
        "confident style accuracy",
        plots / "honest_style_acc.png",
        ylim=(0, 1),
    )
    grouped_bars(
        [rows[a] for a in attacks],
        {r.setting.label: [r.mean(f"{a}_fid") for a in attacks] for r in results},
        "Evaluator-FID of the attacked clusters' honest members (lower is better)",
        "evaluator-FID",
        plots / "honest_fid.png",
    )
    defended = [r for r in results if r.setting.name == "defended"]
    if defended:
        d = defended[0]
        grouped_bars(
            [rows[a] for a in [*attacks, "all"]],
            {
                "precision": [d.mean(f"{a}_precision") for a in [*attacks, "all"]],
                "recall": [d.mean(f"{a}_recall") for a in [*attacks, "all"]],
                "false alarms": [d.mean(f"{a}_false_alarms") for a in [*attacks, "all"]],
            },
            "Detection by the robust defense (attacked runs)",
            "share",
            plots / "detection.png",
            ylim=(0, 1),
        )
    honest_rows = [
        (
            r.setting.label,
            r.runs[0] / "samples",
            {c: p for c, p in r.metrics[0]["final"]["per_client"].items() if int(c) not in attackers},
        )
        for r in results
    ]
    by_label = [r.setting.label for r in results]
    backdoor = None
    if "backdoor" in attack_groups:
        bad, victims = attack_groups["backdoor"]
        triggered = save_grid(
            [
                read_images(
                    sorted((r.runs[0] / "samples" / "triggered" / f"client_{victims[0]}").glob("*.png"))[:8], plan.cfg.data.size
                )
                for r in results
            ],
            plan.out / "backdoor_grid.png",
            labels=by_label,
            scale=2,
        )
        backdoor = {
            "target": backdoor_target(domains[bad[0] % len(domains)], domains),
            "table": markdown_table(
                ["setting", "backdoor success"], [[r.setting.label, r.cell("backdoor_success")] for r in results]
            ),
            "victim": victims[0],
            "grid": triggered.name,
        }
    data = report_data(plan, seconds, sample_grid(plan, honest_rows), run_lines(results)) | {
        "num_clients": num_clients,
        "styles": domains,
        "attackers": [f"client {c} ({domains[c % len(domains)]}, {a})" for c, a in attackers.items()],
        "trigger": TRIGGER,
        "quality": markdown_table(
            ["attack (cluster)", *[f"style acc: {x}" for x in by_label], *[f"FID: {x}" for x in by_label]],
            [
                [rows[a]] + [r.cell(f"{a}_style_acc") for r in results] + [r.cell(f"{a}_fid", 1) for r in results]
                for a in [*attacks, "all"]
            ],
        ),
        "detection": markdown_table(
            ["attack (cluster)", *[f"{k}: {x}" for x in by_label for k in ("recall", "precision", "false alarms")]],
            [
                [rows[a]] + [r.cell(f"{a}_{k}", 2) for r in results for k in ("recall", "precision", "false_alarms")]
                for a in [*attacks, "all"]
            ],
        ),
        "defended": bool(defended),
        "backdoor": backdoor,
        "every_client": quality_table("setting", results),
    }
    return render_report("poisoning", data, plan.out / "report.md")
