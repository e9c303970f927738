"""`fedaigc experiment privacy`: what a curious server learns about each client's style, and what
each defense costs. Four cluster-aware federations: plain prompts, private style tokens (ours),
private tokens + a keyed rotation of the uploaded embedding and slot, and that + the Gaussian
mechanism on them (client/privacy.py). Per setting: utility, clustering ARI per round, and the
accuracy of attribute-inference attacks (eval/attacks.py) on what the servers received:

- round-1 uploads, replayed exactly (same config, seeds and starting point as in the run): the
  task embedding and slot as sent, and the LoRA tensors;
- the training server's state after the last round (the client's cluster slot or centroid, and
  its cluster adapter);
- the inference server's view: the text-encoder states of the client's prompts, encoded by its
  personalized model (the cluster adapter and its own slot).

The attacker's shadow clients are trained with the same code and public base model on images of
its own (the procedural generator with another seed). A noise-only sweep over ε, on the private
setting's round-1 uploads, gives the attacks and the clustering ARI as functions of ε.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from fedaigc import config
from fedaigc.client.client_app import build_client
from fedaigc.client.privacy import EmbeddingGuard, analytic_gaussian_sigma, composed_epsilon
from fedaigc.client.tokens import slot_init
from fedaigc.client.train import LocalClient, style_prompt
from fedaigc.data.dataset import ImageFolder, ensure_dataset
from fedaigc.data.render import DOMAINS, STYLE_WORDS
from fedaigc.eval.attacks import accuracy, chance, invert, match_geometry, probe, vocabulary_rank
from fedaigc.eval.metrics import clustering_ari
from fedaigc.eval.plots import curves, grouped_bars
from fedaigc.eval.report import markdown_table, render_report
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
from fedaigc.model.base import load_model
from fedaigc.protocol.lora import flatten
from fedaigc.protocol.seeds import derived_seed
from fedaigc.server.clustering import cluster
from fedaigc.server.rundir import RunDir
from fedaigc.server.strategies import make_strategy

log = logging.getLogger("fedaigc.experiments")

KEY = 7919  # the clients' shared secret in the defended settings (any non-zero integer)
EPSILON = 8.0  # per round and upload, at the config's embedding_delta
SWEEP = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)  # ε of the noise-only sweep
SWEEP_DRAWS = 5  # noise draws per ε in the sweep
NOISY_COPIES = 16  # the noise-aware attacker's noisy copies of each shadow row
SHADOWS_PER_STYLE = {"tiny": 1}  # else 2


def _settings(prompt_mode: str, key: int = 0, epsilon: float = 0.0) -> dict:
    client = {"prompt_mode": prompt_mode, "embedding_key": key, "embedding_epsilon": epsilon}
    return {"federation": {"strategy": "cluster"}, "client": client}


SETTINGS = [
    Setting("plain", "plain prompts", _settings("plain")),
    Setting("private", "private tokens (ours)", _settings("private")),
    Setting("rotated", "private + keyed rotation", _settings("private", KEY)),
    Setting("noised", f"private + rotation + noise (ε={EPSILON:g})", _settings("private", KEY, EPSILON)),
]
UTILITY = [("style_acc", "style acc"), ("class_acc", "class acc"), ("alignment", "alignment")]
# what the training server receives (round 1) or keeps (final): column key -> header
UPLOAD_ATTACKS = {
    "invert_emb": "embedding: nearest word",
    "probe_emb": "embedding: shadow probe",
    "geometry_emb": "embedding: geometry match",
    "probe_lora": "LoRA: shadow probe",
}
REQUEST_ATTACKS = {"invert_request": "requests: nearest prompt", "probe_request": "requests: shadow probe"}


@dataclass
class Rows:
    """Feature rows (one per client, in client order) of what a server saw, with the true styles."""

    styles: list[str]
    rows: dict[str, np.ndarray]

    def save(self, path: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in self.rows.items()}, str(path), {"styles": json.dumps(self.styles)})

    @classmethod
    def load(cls, path: Path) -> Rows:
        with safe_open(str(path), framework="np") as f:
            return cls(json.loads(f.metadata()["styles"]), {k: f.get_tensor(k) for k in f.keys()})


@dataclass
class Public:
    """What the attacker computes with the public base model, per style: the input embedding of
    its word (the slot's space), the pooled states of "a <word>" (the plain task embedding's
    space) and the position-mean states of "a <word> of a <class>" over classes (a request's)."""

    words: dict[str, np.ndarray]
    phrases: dict[str, np.ndarray]
    prompts: dict[str, np.ndarray]
    start: np.ndarray  # the slot every client starts from (the public word `tokens.SLOT_INIT_WORD`)
    vocabulary: np.ndarray  # every input embedding of the tokenizer's vocabulary
    word_ids: dict[str, int]  # style -> the token id of its word (its first word piece)

    @classmethod
    @torch.no_grad()
    def of(cls, model_dir: Path | None, styles: list[str], classes: list[str]) -> Public:
        model = load_model(model_dir, "cpu")  # a few encoder calls: not worth a GPU
        table = model.text_encoder.get_input_embeddings().weight
        words, phrases, prompts, word_ids = {}, {}, {}, {}
        for style in styles:
            word = STYLE_WORDS.get(style, style)
            ids = model.tokenizer(word, add_special_tokens=False)["input_ids"]
            words[style], word_ids[style] = table[ids].mean(0).double().numpy(), ids[0]
            phrases[style] = model.pooled_prompts([f"a {word}"])[0].double().numpy()
            states = model.encode_prompts([style_prompt(word, c) for c in classes])
            prompts[style] = states.mean((0, 1)).double().numpy()
        return cls(words, phrases, prompts, slot_init(model).double().numpy(), table.double().numpy(), word_ids)


@torch.no_grad()
def request_row(client: LocalClient, classes: list[str]) -> np.ndarray:
    """What the inference server gets from a client asking for one image of each class: the
    text-encoder states of its prompts (private token included), as the mean over prompts and
    positions (the server sees every position, padding too)."""
    prompts = [client.prompt_for(client.domain, c) for c in classes]
    return client.model.encode_prompts(prompts).mean((0, 1)).double().cpu().numpy()


def first_round(client: LocalClient, cfg: config.Config, cid: int, generator_seed: int | None = None):
    """The client's round-1 upload, replayed: the server's round-1 plan for it (`ServerStrategy.plan_for`)
    and the round's seed as the ClientApp derives it (or `generator_seed`, for shadows)."""
    plan = make_strategy(cfg).plan_for(1, cid, cfg.client)
    return client.follow(plan, plan.client_seed(cid) if generator_seed is None else generator_seed)


def server_view(cfg: config.Config, run: RunDir, plan: Plan, classes: list[str]) -> Rows:
    """Every client's round-1 upload (replayed), the server's state for it after the last round,
    and its inference requests. Cached in the run directory."""
    path = run.root / "server_view.safetensors"
    if path.is_file():
        return Rows.load(path)
    fed = cfg.federation
    aggregator = make_strategy(cfg)
    run.restore(aggregator, run.last_round())
    styles, rows = [], defaultdict(list)
    for cid in range(fed.num_clients):
        client = build_client(cfg, cid, fed.num_clients, plan.data, plan.model)
        upload = first_round(client, cfg, cid)
        adapter, slot = aggregator.model_for(cid)
        kept = slot
        if slot is None or not slot.numel():
            kept = torch.from_numpy(aggregator.clusters[aggregator.assignment[cid]].centroid)
        client.load(adapter, slot)
        styles.append(client.domain)
        rows["emb_r1"].append(upload.embedding.double().numpy())
        rows["lora_r1"].append(flatten(upload.lora).double().numpy())
        rows["emb_final"].append(kept.double().numpy())
        rows["lora_final"].append(flatten(adapter).double().numpy())
        rows["request"].append(request_row(client, classes))
    view = Rows(styles, {k: np.stack(v) for k, v in rows.items()})
    view.save(path)
    return view


def shadows(cfg: config.Config, plan: Plan, classes: list[str]) -> Rows:
    """The attacker's shadow clients: as the victims (same config, public model and LoRA seed),
    but on its own images (data seed + 1), SHADOWS_PER_STYLE of each style, trained for one
    round from the start, uploading in the clear. Cached in the experiment directory."""
    shadow_cfg = copy.deepcopy(cfg)
    shadow_cfg.client = replace(cfg.client, embedding_key=0, embedding_epsilon=0.0)
    shadow_cfg.data.seed += 1
    n = SHADOWS_PER_STYLE.get(cfg.preset, 2) * len(DOMAINS)
    shadow_cfg.federation.num_clients = n
    path = plan.out / f"shadows_{cfg.client.prompt_mode}_{derived_seed(config.to_toml(shadow_cfg)):08x}.safetensors"
    if path.is_file():
        return Rows.load(path)
    log.info("[privacy] training %d shadow clients (%s prompts) on the attacker's own images", n, cfg.client.prompt_mode)
    styles, rows = [], defaultdict(list)
    for i in range(n):
        client = build_client(shadow_cfg, i, n, None, plan.model)
        upload = first_round(client, shadow_cfg, i, generator_seed=derived_seed("shadow", i))
        styles.append(client.domain)
        rows["emb_r1"].append(upload.embedding.double().numpy())
        rows["lora_r1"].append(flatten(upload.lora).double().numpy())
        rows["request"].append(request_row(client, classes))
    out = Rows(styles, {k: np.stack(v) for k, v in rows.items()})
    out.save(path)
    return out


def privatized(rows: np.ndarray, guard: EmbeddingGuard, start: np.ndarray | None, seed: int, copies: int = 1) -> np.ndarray:
    """`copies` draws of the mechanism for each row (consecutive), from the attacker's own seed."""
    gen = torch.Generator().manual_seed(seed)
    ref = None if start is None else torch.from_numpy(start)
    return np.stack([guard.privatize(torch.from_numpy(r), ref, gen).numpy() for r in rows for _ in range(copies)])


def noise_aware(shadow: Rows, guard: EmbeddingGuard, start: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """The attacker's training set for the embedding: the shadows' clean rows, or NOISY_COPIES
    draws of the public mechanism per row when it is on (its σ and clip are public, the clients'
    noise is not)."""
    if guard.sigma == 0:
        return shadow.rows["emb_r1"], shadow.styles
    rows = privatized(shadow.rows["emb_r1"], guard, start, seed=1, copies=NOISY_COPIES)
    return rows, [s for s in shadow.styles for _ in range(NOISY_COPIES)]


def attack(cfg: config.Config, view: Rows, shadow: Rows, public: Public) -> dict[str, float]:
    """Every attack's accuracy on one run (share of clients whose style it names)."""
    private = cfg.client.prompt_mode == "private"
    candidates, start = (public.words, public.start) if private else (public.phrases, None)
    mechanism = EmbeddingGuard.from_config(replace(cfg.client, embedding_key=0), len(public.start))
    shadow_emb, shadow_styles = noise_aware(shadow, mechanism, start)
    truth = view.styles
    out = {"atk_chance": chance(truth)}
    for when in ("r1", "final"):
        emb = view.rows[f"emb_{when}"]
        out[f"atk_invert_emb_{when}"] = accuracy(invert(emb, candidates, start), truth)
        out[f"atk_probe_emb_{when}"] = accuracy(probe(shadow_emb, shadow_styles, emb), truth)
        out[f"atk_geometry_emb_{when}"] = accuracy(match_geometry(emb, shadow_emb, shadow_styles), truth)
        out[f"atk_probe_lora_{when}"] = accuracy(probe(shadow.rows["lora_r1"], shadow.styles, view.rows[f"lora_{when}"]), truth)
        if private:  # the slot lives in the vocabulary's space: how far down is the true word?
            ranks = vocabulary_rank(emb, public.vocabulary, [public.word_ids[s] for s in truth], public.start)
            out[f"vocab_rank_{when}"] = float(np.median(ranks))
    centre = np.mean(list(public.prompts.values()), axis=0)
    out["atk_invert_request"] = accuracy(invert(view.rows["request"], public.prompts, centre), truth)
    out["atk_probe_request"] = accuracy(probe(shadow.rows["request"], shadow.styles, view.rows["request"]), truth)
    if mechanism.sigma > 0:
        c = cfg.client
        eps_run, delta_run = composed_epsilon(
            c.embedding_epsilon, c.embedding_delta, mechanism.sigma, 2 * c.embedding_clip, cfg.federation.rounds
        )
        out |= {"sigma": mechanism.sigma, "epsilon_round": c.embedding_epsilon, "epsilon_run": eps_run, "delta_run": delta_run}
    return out


def noise_sweep(cfg: config.Config, view: Rows, shadow: Rows, public: Public) -> list[dict[str, float]]:
    """The Gaussian mechanism alone (no rotation) at each ε of SWEEP, applied to the private
    setting's clean round-1 slots: attack accuracies and the round-1 clustering ARI (the server's
    clustering by task embeddings), each the mean over SWEEP_DRAWS noise draws."""
    c = cfg.client
    out = []
    for eps in SWEEP:
        guard = EmbeddingGuard(None, analytic_gaussian_sigma(eps, c.embedding_delta, 2 * c.embedding_clip), c.embedding_clip)
        shadow_emb, shadow_styles = noise_aware(shadow, guard, public.start)
        scores = defaultdict(list)
        for draw in range(SWEEP_DRAWS):
            noisy = privatized(view.rows["emb_r1"], guard, public.start, seed=100 + draw)
            scores["invert"].append(accuracy(invert(noisy, public.words, public.start), view.styles))
            scores["probe"].append(accuracy(probe(shadow_emb, shadow_styles, noisy), view.styles))
            scores["geometry"].append(accuracy(match_geometry(noisy, shadow_emb, shadow_styles), view.styles))
            scores["ari"].append(clustering_ari(view.styles, cluster(noisy).tolist()))
        out.append({"epsilon": eps, "sigma": guard.sigma, **{k: float(np.mean(v)) for k, v in scores.items()}})
    return out


def run_privacy(plan: Plan, only: list[str] | None = None) -> tuple[Path, str]:
    """Every setting (or those in `only`) for every seed, then the attacks; writes results.csv,
    plots and report.md."""
    folder = ImageFolder(ensure_dataset(plan.data, plan.cfg), size=plan.cfg.data.size)
    public = Public.of(plan.model, folder.domains, folder.classes)
    shadow_sets: dict[str, Rows] = {}
    clean: list[Rows] = []  # the private setting's views (no key, no noise): the sweep's input

    def attacks(run_cfg: config.Config, run: RunDir) -> dict[str, float]:
        mode = run_cfg.client.prompt_mode
        if mode not in shadow_sets:
            shadow_sets[mode] = shadows(run_cfg, plan, folder.classes)
        log.info("[privacy] replaying round 1 and encoding requests of %s", run.root)
        view = server_view(run_cfg, run, plan, folder.classes)
        c = run_cfg.client
        if mode == "private" and not c.embedding_key and not c.embedding_epsilon:
            clean.append(view)
        ari = {f"ari_round_{r['round']}": r["ari"] for r in run.metrics()["rounds"]}
        return ari | attack(run_cfg, view, shadow_sets[mode], public)

    results = federated("privacy", plan, select(SETTINGS, only), attacks)
    sweep = noise_sweep(plan.cfg, clean[0], shadow_sets["private"], public) if clean else []
    seconds = plan.elapsed()
    write_results(plan, results, seconds)
    if sweep:
        (plan.out / "noise_sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    summary = "; ".join(
        f"{r.setting.label}: style {r.mean('style_acc'):.1%}, ARI {r.mean('ari'):.2f}, "
        f"strongest attack {max(r.mean('atk_' + k + '_r1') for k in UPLOAD_ATTACKS):.0%}"
        for r in results
    )
    return write_report(plan, results, sweep, seconds), summary


def _strongest(result: Result, columns: dict[str, str]) -> str:
    """The best mean accuracy among `columns` (column -> attack name), with the attack's name."""
    best = max(columns, key=result.mean)
    return f"{result.cell(best, 2)} ({columns[best]})"


def write_report(plan: Plan, results: list[Result], sweep: list[dict], seconds: float) -> Path:
    cfg, plots = plan.cfg, plan.out / "plots"
    rounds = results[0].per_round("ari")[0]
    attack_cols = [f"atk_{k}_r1" for k in UPLOAD_ATTACKS] + [f"atk_{k}" for k in REQUEST_ATTACKS]
    attack_names = list(UPLOAD_ATTACKS.values()) + list(REQUEST_ATTACKS.values())
    grouped_bars(
        attack_names + ["chance"],
        {r.setting.label: [r.mean(col) for col in attack_cols + ["atk_chance"]] for r in results},
        "Attribute inference: share of clients whose style the attacker names (round-1 uploads, requests)",
        "attack accuracy",
        plots / "attacks.png",
        ylim=(0, 1),
    )
    curves(
        {r.setting.label: r.per_round("ari") for r in results},
        "Clustering ARI against the true dominant domains, per round",
        "round",
        "adjusted Rand index",
        plots / "ari_per_round.png",
    )
    grouped_bars(
        [label for _, label in UTILITY],
        {r.setting.label: [r.mean(key) for key, _ in UTILITY] for r in results},
        "Utility per privacy setting",
        "share / cosine",
        plots / "utility.png",
        ylim=(0, 1),
    )

    def eps_cell(r: Result) -> str:
        if math.isnan(r.mean("epsilon_round")):
            return "none"
        run = f"ε = {r.mean('epsilon_run'):.1f}, δ = {r.mean('delta_run'):.0e} over {cfg.federation.rounds} rounds"
        return (
            f"ε = {r.mean('epsilon_round'):g}, δ = {cfg.client.embedding_delta:.0e} per round; {run}; σ = {r.mean('sigma'):.3f}"
        )

    emb_attacks = {f"atk_{k}_r1": name.removeprefix("embedding: ") for k, name in UPLOAD_ATTACKS.items() if k.endswith("_emb")}
    request_attacks = {f"atk_{k}": name.removeprefix("requests: ") for k, name in REQUEST_ATTACKS.items()}
    summary_rows = [
        [
            r.setting.label,
            r.cell("style_acc"),
            r.cell("fid", 1),
            r.cell("ari", 2),
            eps_cell(r),
            _strongest(r, emb_attacks),
            r.cell("atk_probe_lora_r1", 2),
            _strongest(r, request_attacks),
            r.cell("atk_chance", 2),
        ]
        for r in results
    ]
    detail_rows = [
        [r.setting.label]
        + [f"{r.cell(f'atk_{k}_r1', 2)} / {r.cell(f'atk_{k}_final', 2)}" for k in UPLOAD_ATTACKS]
        + [r.cell(f"atk_{k}", 2) for k in REQUEST_ATTACKS]
        + [f"{r.cell('vocab_rank_r1', 0)} / {r.cell('vocab_rank_final', 0)}"]
        for r in results
    ]
    data = {
        "shadows": SHADOWS_PER_STYLE.get(cfg.preset, 2),
        "summary": markdown_table(
            [
                "setting",
                "style acc",
                "evaluator-FID",
                "clustering ARI",
                "noise",
                "strongest embedding attack",
                "LoRA probe",
                "strongest request attack",
                "chance",
            ],
            summary_rows,
        ),
        "detail": markdown_table(["setting", *attack_names, "slot: vocabulary rank of the true word"], detail_rows),
        "sweep": None,
        "utility": quality_table("setting", results),
        "ari": markdown_table(
            ["setting", *[f"round {x}" for x in rounds]],
            [[r.setting.label] + [r.cell(f"ari_round_{x}", 2) for x in rounds] for r in results],
        ),
    }
    if sweep:
        curves(
            {
                name: ([math.log2(s["epsilon"]) for s in sweep], [s[key] for s in sweep])
                for key, name in (
                    ("probe", "shadow probe (noise-aware)"),
                    ("geometry", "geometry match"),
                    ("invert", "nearest word"),
                    ("ari", "clustering ARI, round 1"),
                )
            },
            "Gaussian mechanism alone on the round-1 slots: attacks and clustering vs ε",
            "log2 ε per round",
            "attack accuracy / ARI",
            plots / "noise_sweep.png",
            integer_x=False,
        )
        table = markdown_table(
            ["ε per round", "σ", "nearest word", "shadow probe", "geometry match", "clustering ARI"],
            [
                [f"{s['epsilon']:g}", f"{s['sigma']:.3f}", f"{s['invert']:.2f}", f"{s['probe']:.2f}"]
                + [f"{s['geometry']:.2f}", f"{s['ari']:.2f}"]
                for s in sweep
            ],
        )
        data["sweep"] = {"draws": SWEEP_DRAWS, "epsilon": EPSILON, "table": table}
    grid = sample_grid(plan, [(r.setting.label, r.runs[0] / "samples", r.metrics[0]["final"]["per_client"]) for r in results])
    return render_report("privacy", report_data(plan, seconds, grid, run_lines(results)) | data, plan.out / "report.md")
