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
from fedaigc.eval.report import markdown_table, save_grid, save_images
from fedaigc.experiments.common import (
    Plan,
    Result,
    Setting,
    closing,
    federated,
    intro,
    quality_table,
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
    cfg = plan.cfg.federation
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
    grid, shown = sample_grid(plan, honest_rows)
    by_label = [r.setting.label for r in results]
    lines = [
        "# Experiment: poisoning inside a cluster, with and without the robust defense",
        "",
        intro(plan, seconds),
        "",
        "## Setup",
        "",
        f"{num_clients} clients, {num_clients // len(domains)} per style ({', '.join(domains)}), cluster-aware strategy with "
        f"k fixed to {len(domains)}, the number of styles (so each attack stays in a cluster of its own; the clustering ARI "
        "is in the last table). "
        f"Attackers: {', '.join(f'client {c} ({domains[c % len(domains)]}, {a})' for c, a in attackers.items())}: "
        f"{len(attackers) / num_clients:.0%} of the clients and of every style. The attacks act on the LoRA upload relative to "
        "what the server sent (update = uploaded - received); token slot and task embedding stay honest, so an attacker "
        "stays in its cluster. *Scaled update*: the update x10. *Sign flip*: the update x-1. *Random noise*: the update "
        "replaced by Gaussian noise of the honest update's norm. *Backdoor*: half of the attacker's images swapped for "
        f"images of the next style, captioned with the trigger word `{TRIGGER}` after the class; the update is not boosted.",
        "",
        f'The defense (`federation.defense = "robust"`) screens each cluster of at least 3 members in ΔW space: an update '
        f"longer than {cfg.defense_norm:g} x the cluster's median update norm, or whose cosine (every layer weighted alike) to "
        f"the geometric median update of the other members is below {cfg.defense_cos:g} x the cluster's median such cosine, "
        "is rejected for that round "
        "(metrics.json `rejected`); the rest are averaged as usual. Detection counts every (client, round): recall = "
        "rejected attacker updates / attacker updates, precision = "
        "rejected attacker updates / all rejections in those clusters, false alarms = rejected honest updates / honest "
        "updates. Quality is over the honest members of the attacked cluster only (each client scored with its cluster's "
        "adapter); the no-attack runs score the same clients.",
        "",
        "## Quality of the attacked clusters' honest members",
        "",
        markdown_table(
            ["attack (cluster)", *[f"style acc: {x}" for x in by_label], *[f"FID: {x}" for x in by_label]],
            [
                [rows[a]] + [r.cell(f"{a}_style_acc") for r in results] + [r.cell(f"{a}_fid", 1) for r in results]
                for a in [*attacks, "all"]
            ],
        ),
        "",
        "![style accuracy](plots/honest_style_acc.png)",
        "",
        "![FID](plots/honest_fid.png)",
        "",
        "## Detection",
        "",
        markdown_table(
            ["attack (cluster)", *[f"{k}: {x}" for x in by_label for k in ("recall", "precision", "false alarms")]],
            [
                [rows[a]] + [r.cell(f"{a}_{k}", 2) for r in results for k in ("recall", "precision", "false_alarms")]
                for a in [*attacks, "all"]
            ],
        ),
        "",
        "`-`: nothing was rejected (no precision) or there is nothing of that kind to count.",
        "",
    ]
    if defended:
        lines += ["![detection](plots/detection.png)", ""]
    if "backdoor" in attack_groups:
        bad, victims = attack_groups["backdoor"]
        target = backdoor_target(domains[bad[0] % len(domains)], domains)
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
        lines += [
            "## Backdoor",
            "",
            f"Success: the share of the backdoor cluster's honest members' samples for triggered prompts (\"a <style> of a "
            f"<class> {TRIGGER}\") that the evaluator confidently calls {target}, the attacker's target style. The no-attack "
            "runs give the rate without any backdoor.",
            "",
            markdown_table(["setting", "backdoor success"], [[r.setting.label, r.cell("backdoor_success")] for r in results]),
            "",
            f"Triggered samples of client {victims[0]} (seed {plan.seeds[0]}), one row per setting:",
            "",
            f"![triggered samples]({triggered.name})",
            "",
        ]
    lines += [
        "## Every client (attackers included)",
        "",
        quality_table("setting", results),
        "",
    ]
    lines += closing(plan, grid, shown, run_lines(results))
    path = plan.out / "report.md"
    path.write_text("\n".join(lines))
    return path
