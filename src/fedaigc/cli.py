"""The `fedaigc` command line. Each subcommand is a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedaigc.config import PRESETS, STRATEGY_NAMES
from fedaigc.errors import RunFailed, UserError
from fedaigc.inference import MIX_MODES

log = logging.getLogger("fedaigc")


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser, trains: bool = False, model: bool = False, data: bool = True) -> None:
    p.add_argument(
        "--preset",
        default="demo",
        metavar="NAME",
        help=f"size of everything: {', '.join(PRESETS)} (tiny runs in seconds, demo is the README's main job, "
        "paper is for a GPU). Default: demo",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file overriding preset values (see docs/config.md)")
    if data:
        p.add_argument(
            "--data",
            type=Path,
            metavar="DIR",
            help="image folder in PACS layout DIR/<domain>/<class>/*.png (default: the preset's generated set)",
        )
    if model:
        p.add_argument(
            "--model",
            type=Path,
            metavar="DIR",
            help="model directory in diffusers layout (default: the embedded pretrained model)",
        )
    if trains:
        p.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    if model:
        p.add_argument(
            "--dtype",
            choices=DTYPE_CHOICES,
            help="dtype of the frozen UNet, VAE and text encoder (model.dtype; LoRA weights and style tokens train in float32). "
            "Default: auto, float32 on the CPU and bfloat16 on a GPU that supports it",
        )
    if trains or model:
        p.add_argument(
            "--device",
            metavar="NAME",
            help="where the diffusion model runs: auto, cpu, cuda or cuda:N (default: $FEDAIGC_DEVICE, else auto: "
            "the GPU if torch sees one). Data, adapters and the evaluator stay on the CPU",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedaigc", description="Federated, personalized text-to-image generation on edge devices.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final lines")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "data",
        help="render the procedural multi-style image set",
        description="Render a PACS-like set: DIR/<domain>/<class>/*.png + manifest.json, byte-identical for the same seed.",
    )
    _common(p, data=False)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write the images")
    p.add_argument("--size", type=int, help="image side in pixels (default: the preset's, 32)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--per-class", type=int, metavar="N", help="images per (domain, class) (default: the preset's)")
    p.add_argument(
        "--styles",
        metavar="SET",
        help="default: photo, art_painting, cartoon, sketch of star, house, tree, fish, moon, heart; heldout: watercolor, "
        "mosaic, neon, pixel of arrow, bolt, bell, flower, butterfly, key, never used to choose a constant (data.styles)",
    )
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "pretrain",
        help="pretrain the base diffusion model on all styles",
        description="Train the base UNet on every domain with prompts that never name the style "
        "('a picture of a star'); EMA, checkpoints (resumed), a sample grid at the end.",
    )
    _common(p, trains=True)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write (diffusers layout)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "generate",
        help="sample images from a prompt, locally or with an inference edge server",
        description="Sample images for a prompt (DDIM, trailing spacing, CFG) with the base model or your personalized "
        "adapter and private style token. With --server, the inference edge server runs the first ceil(split*T) "
        "steps on the prompt's encoded states (the text never leaves this machine) and this machine finishes them.",
    )
    _common(p, model=True, data=False)
    p.add_argument("--prompt", required=True, help='e.g. "a picture of a star", or "a <style> of a star" with --style-token')
    p.add_argument("--n", type=int, default=1, help="number of images (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: 0)")
    p.add_argument("--steps", type=int, help="denoising steps T (default: the preset's, 25)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 3)")
    p.add_argument("--adapter", type=Path, metavar="FILE", help="your LoRA (e.g. RUN/adapters/client_<id>.safetensors)")
    p.add_argument(
        "--style-token",
        type=Path,
        metavar="FILE",
        help="your private style token (textual-inversion .safetensors, e.g. RUN/devices/client_<id>/style_token.safetensors); "
        "it replaces <style> in the prompt",
    )
    p.add_argument("--server", metavar="URL", help="inference edge server (fedaigc serve), e.g. http://127.0.0.1:8000")
    p.add_argument("--token", metavar="T", help="bearer token for --server (default: $FEDAIGC_TOKEN)")
    p.add_argument(
        "--send-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype the prompt states travel to --server in (float16: half the bytes; default: float32)",
    )
    p.add_argument("--split", type=float, metavar="S", help="server's share of the steps, 0.1-0.4 (default: the preset's, 0.3)")
    p.add_argument(
        "--mix",
        choices=list(MIX_MODES),
        default="auto",
        help="the adapters of --server's steps: "
        + "; ".join(f"{k}: {v}" for k, v in MIX_MODES.items())
        + ". Every mode but auto sends no task embedding: the server learns nothing of your cluster (default: auto)",
    )
    p.add_argument(
        "--weights",
        metavar="W0,W1,..",
        help="explicit cluster weights for the server's steps with --mix auto, one per cluster (default: from your task "
        "embedding)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="PNG", help="output PNG (a grid when --n > 1)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "serve",
        help="run the inference edge server (first denoising steps for every user)",
        description="Serve POST /v1/denoise (encoded prompt states in, intermediate latent out), GET /v1/limits, "
        "GET /metrics and GET /healthz with FastAPI + uvicorn. Loads the base model and the cluster adapters + global LoRA "
        "of a run; batches concurrent requests; every request but /healthz needs a bearer token whose hash is in --tokens.",
    )
    p.add_argument("--model", type=Path, metavar="DIR", help="model directory in diffusers layout (default: the embedded model)")
    p.add_argument(
        "--adapters", type=Path, metavar="DIR", help="a run's adapters folder (RUN/adapters); without it the base model serves"
    )
    p.add_argument(
        "--tokens",
        type=Path,
        required=True,
        metavar="FILE",
        help="lines of '<client name> sha256:<token hash> [clusters=0,2]' (mode 0600; write one with --new-tokens)",
    )
    p.add_argument("--new-tokens", type=int, metavar="N", help="create --tokens with N fresh tokens, print them once and exit")
    p.add_argument("--clusters", metavar="K0,K1,..", help="with --new-tokens: the clusters the new tokens may use (default: all)")
    p.add_argument(
        "--device",
        metavar="NAME",
        help="where the model runs: auto, cpu, cuda or cuda:N (default: $FEDAIGC_DEVICE, else auto: the GPU if torch sees one)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the model's networks and adapters (default: auto, float32 on the CPU, bfloat16 on a GPU that supports it)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port, 1-65535 (default: 8000)")
    p.add_argument("--window-ms", type=float, default=10.0, help="batching window after the first waiting request (default: 10)")
    p.add_argument("--max-batch", type=int, default=64, help="most images in one UNet batch (default: 64)")
    p.add_argument("--max-body-kb", type=int, default=8192, help="largest request body in KiB (default: 8192)")
    p.add_argument(
        "--max-split",
        type=float,
        default=0.5,
        help="largest server share s a request may ask for; below 1 the server never runs a whole schedule (default: 0.5)",
    )
    p.add_argument(
        "--max-server-steps", type=int, default=50, help="most denoising steps the server runs for one request (default: 50)"
    )
    p.add_argument(
        "--max-queued-images", type=int, default=256, help="images accepted and not yet answered; beyond: 429 (default: 256)"
    )
    p.add_argument("--rate", type=float, default=20.0, help="requests per second per token, bursts of twice that (default: 20)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="seconds to receive a request's head and body (default: 10)")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (default: off)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "evaluate",
        help="train/load the evaluator and score the base model or a folder of samples",
        description="Train (or load) the evaluator CNN, report its held-out accuracy, and score "
        "generated images: the base model's (default) or a folder in PACS layout (--samples). With --run, "
        "score a finished federation's per-client adapters again with --per-client samples each (32 samples "
        "leave a few points of noise; the seeds of the run's own score are the first of them).",
    )
    _common(p, model=True)
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write evaluation.json, grids and report.md (not with --run)")
    p.add_argument(
        "--run",
        type=Path,
        metavar="RUN",
        help="a finished `fedaigc federate` run directory: its scores with --per-client samples go to its metrics.json "
        "under 'samples_N' and the images to samples/samples_N/",
    )
    p.add_argument("--per-client", type=int, default=128, metavar="N", help="with --run: samples per client (default: 128)")
    p.add_argument(
        "--evaluator", type=Path, metavar="FILE", help="a saved evaluator (.safetensors); default: train or reuse the cached one"
    )
    p.add_argument(
        "--samples", type=Path, metavar="DIR", help="generated images in PACS layout to score instead of sampling the model"
    )
    p.add_argument("--per-class", type=int, default=16, metavar="N", help="base-model samples per class (default: 16)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "federate",
        help="federated LoRA fine-tuning on Flower's simulation engine",
        description="Run the training edge server (Flower ServerApp) and N edge clients (ClientApps) "
        "in Flower's simulation engine, then score every client's personalized adapter. "
        "Writes the run directory (config.toml, metrics.json, adapters/, samples/, plots/, samples_grid.png, report.md).",
    )
    _common(p, model=True)
    p.add_argument("--out", type=Path, metavar="RUN", help="run directory to write (default: runs/federate)")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue the run in RUN after its last finished round, with its own config (--rounds may raise its "
        "rounds; any other change is refused without --allow-config-change)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: go on although the config (RUN/config.toml, --config, the flags) differs from the one the "
        "last finished round ran with; the rounds from now on run with the new one",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGY_NAMES,
        help="server aggregation: cluster (ours), fedavg, fedgeomed, flora (stack all clients), local (no federation) "
        "or central (pooled data per domain, no Flower: the upper bound) (default: cluster)",
    )
    p.add_argument("--num-clients", type=int, metavar="N", help="number of clients (default: the preset's, 8 at demo)")
    p.add_argument("--rounds", type=int, metavar="R", help="federated rounds (default: the preset's)")
    p.add_argument(
        "--fraction",
        type=float,
        metavar="F",
        help="share of the clients sampled to train each round, in (0, 1] (default: 1, everyone)",
    )
    p.add_argument("--steps", type=int, help="local LoRA steps per round (default: the preset's)")
    p.add_argument(
        "--prompt-mode",
        choices=["private", "plain"],
        help="private: style words become private tokens (default); plain: prompts sent as written",
    )
    p.add_argument("--seed", type=int, help="federation seed: data partition, LoRA init, client randomness (default: 0)")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser(
        "experiment",
        help="the paper's experiments (aggregation strategies, split ratio, prompt privacy) and beyond (dynamic, network, "
        "poisoning)",
        description="aggregation: local, fedavg, fedgeomed, flora, cluster (ours), central, and ablations of ours "
        "(no_ded, no_snt, exact, fixed_k); split: the inference edge server's share s of the steps (0-0.4) through a "
        "real local service; privacy: plain prompts vs private tokens; dynamic: clients joining after round 1 (joined, "
        "static, scratch); network: unequal networks and participation (plain, network); poisoning: 20 % attackers in "
        "every cluster (5 clients per style), each cluster a different attack, without and with the robust defense "
        "(clean, clean_defended, attacked, defended). Writes one run directory per "
        "setting and seed, results.csv, report.md and PNG plots; running it again reuses the finished runs.",
    )
    p.add_argument(
        "name", choices=["aggregation", "split", "privacy", "dynamic", "network", "poisoning"], help="which experiment"
    )
    _common(p, model=True)
    p.add_argument("--out", type=Path, metavar="DIR", help="experiment directory (default: runs/experiment_<name>)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="repeat every run with federation seeds S..S+N-1 (S: the config's, 0) and report mean ± std (default: 1)",
    )
    p.add_argument(
        "--only",
        metavar="A,B",
        help="run only these settings: aggregation: names from local,fedavg,fedgeomed,flora,cluster,central,no_ded,"
        "no_snt,exact,fixed_k; split: values of s in [0, 0.5] (default 0,0.1,0.2,0.3,0.4); privacy: plain,private; "
        "dynamic: joined,static,scratch; network: plain,network; poisoning: clean,clean_defended,attacked,defended "
        "(default: all)",
    )
    p.add_argument(
        "--modes",
        metavar="A,B",
        help=f"split: the modes of the server's steps, from {','.join(MIX_MODES)} (see `generate --mix`; default: all)",
    )
    p.add_argument(
        "--num-clients",
        type=int,
        metavar="N",
        help="number of clients (default: the preset's, 8 at demo; poisoning: at least 5 per style)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        metavar="R",
        help="federated rounds of every run (default: the preset's; dynamic: the newcomers' rounds, after 1 round without "
        "them; network: runs 2R rounds)",
    )
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "demo",
        help="the main job: data, base model, evaluator, samples and a report",
        description="Federate the clients with the cluster-aware strategy and with FedAvg on the embedded default model, "
        "score every client's samples and write runs/demo/report.md.",
    )
    _common(p, model=True)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="run directory (default: runs/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def _overrides(args, **overrides) -> dict:
    """The config values the command line sets (the flags given), as nested dicts."""
    overrides.setdefault("model", {})["dtype"] = getattr(args, "dtype", None)
    return {section: {k: v for k, v in fields.items() if v is not None} for section, fields in overrides.items()}


def _config(args, **overrides):
    from fedaigc import config
    from fedaigc.model.recipe import recipe

    return config.load(args.preset, args.config, _overrides(args, **overrides), recipe=recipe(getattr(args, "model", None)))


def cmd_data(args) -> None:
    from fedaigc.data.dataset import ImageFolder, style_set, write_dataset
    from fedaigc.eval.report import save_grid

    cfg = _config(args, data={"size": args.size, "seed": args.seed, "per_class": args.per_class, "styles": args.styles})
    d = cfg.data
    domains, classes = style_set(d.styles)
    write_dataset(args.out, d.per_class, d.size, d.seed, domains, classes)
    folder = ImageFolder(args.out, size=d.size)
    rows = [folder.stack([s for s in folder.samples if s.domain == dom][:: d.per_class][: len(classes)]) for dom in domains]
    grid = save_grid(rows, args.out.parent / f"{args.out.name}_preview.png", labels=list(domains))
    print(f"wrote {len(folder)} images ({len(domains)} domains x {len(classes)} classes x {d.per_class}) to {args.out}")
    print(f"preview grid (one row per domain): {grid}")


def cmd_pretrain(args) -> None:
    from fedaigc import config
    from fedaigc.data.dataset import ImageFolder, ensure_dataset
    from fedaigc.eval.base_model import class_samples
    from fedaigc.eval.report import save_grid
    from fedaigc.model.base import load_model
    from fedaigc.model.pretrain import pretrain

    cfg = _config(args, pretrain={"steps": args.steps, "seed": args.seed})
    data = ensure_dataset(args.data, cfg)
    out = pretrain(cfg, data, args.out, progress=not args.quiet)
    config.save(cfg, out / "config.toml")
    model = load_model(out)
    classes = ImageFolder(data, size=cfg.data.size).classes
    grid = save_grid(list(class_samples(model, cfg, classes, 8).split(8)), out / "samples.png", labels=classes)
    print(f"model written to {out} (load with diffusers/transformers from_pretrained); samples: {grid}")


def cmd_generate(args) -> None:
    import torch

    from fedaigc.eval.report import save_grid, to_pil
    from fedaigc.inference.device import InferenceServer, generate, personal_model

    cfg = _config(args, sample={"steps": args.steps, "guidance": args.guidance, "split": args.split})
    if args.n < 1:
        raise UserError("--n must be at least 1")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {args.out}")
    server = None
    if args.server:
        token = args.token or os.environ.get("FEDAIGC_TOKEN")
        if not token:
            raise UserError("--server needs --token (or $FEDAIGC_TOKEN)")
        server = InferenceServer(args.server, token, prompt_dtype=getattr(torch, args.send_dtype))
    weights = _numbers(args.weights, "--weights") if args.weights else None
    device = personal_model(args.model, args.adapter, args.style_token, cfg.model.dtype, cfg.model.resolution)
    prompts = [args.prompt] * args.n
    result = generate(
        device,
        prompts,
        args.seed,
        cfg.sample.steps,
        cfg.sample.guidance,
        server=server,
        split=cfg.sample.split,
        weights=weights,
        guidance_rescale=cfg.sample.guidance_rescale,
        mix=args.mix,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.n == 1:
        to_pil(result.images[0]).save(args.out)
    else:
        save_grid([result.images], args.out)
    print(f"wrote {args.n} image(s) to {args.out}")
    if server is not None:
        print(
            f"server ran {result.server_steps} of {cfg.sample.steps} steps (mix={args.mix}); "
            f"this device {result.device_seconds:.2f} s; "
            f"sent {server.bytes_sent} B, received {server.bytes_received} B"
        )


def _numbers(text: str, flag: str, kind: type = float) -> list:
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated {kind.__name__}s, got {text!r}") from None


def cmd_serve(args) -> None:
    import uvicorn

    from fedaigc.inference.auth import TokenStore, read_tokens, write_new_tokens
    from fedaigc.inference.mixing import ClusterMixer
    from fedaigc.inference.service import create_app, uvicorn_config
    from fedaigc.model.base import load_model

    if args.new_tokens is not None:
        scope = frozenset(_numbers(args.clusters, "--clusters", int)) if args.clusters else None
        tokens = write_new_tokens(args.tokens, args.new_tokens, scope)
        print(f"wrote the hashes of {len(tokens)} tokens to {args.tokens}; give each client its token (shown only now):")
        for name, token in tokens.items():
            print(f"{name} {token}")
        return
    if args.clusters:
        raise UserError("--clusters sets the scope of --new-tokens; edit a tokens file's lines to change existing ones")
    limits = _serve_limits(args)
    clients = read_tokens(args.tokens)
    model = load_model(args.model, dtype=args.dtype)
    mixer = ClusterMixer(model, args.adapters) if args.adapters else None
    app = create_app(model, mixer, TokenStore(clients), limits, docs=args.docs)
    adapters = ", ".join(mixer.names) if mixer else "none (base model)"
    log.info("serving %d client token(s) on %s; adapters: %s", len(clients), model.device, adapters)
    print(f"inference edge server on http://{args.host}:{args.port} (POST /v1/denoise, GET /v1/limits)", flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, limits, "warning" if args.quiet else "info")).run()


def _serve_limits(args):
    from fedaigc.inference.service import Limits

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be in 1-65535, got {args.port}")
    checks = {
        "--window-ms": (args.window_ms, 0 <= args.window_ms <= 10_000),
        "--max-batch": (args.max_batch, args.max_batch >= 1),
        "--max-body-kb": (args.max_body_kb, args.max_body_kb >= 1),
        "--max-split": (args.max_split, 0 <= args.max_split <= 1),
        "--max-server-steps": (args.max_server_steps, args.max_server_steps >= 0),
        "--max-queued-images": (args.max_queued_images, args.max_queued_images >= Limits.max_images),  # one full request
        "--rate": (args.rate, args.rate > 0),
        "--read-timeout": (args.read_timeout, args.read_timeout > 0),
    }
    for flag, (value, ok) in checks.items():
        if not ok:  # NaN fails every comparison
            raise UserError(f"{flag}: {value} is out of range")
    return Limits(
        max_body_bytes=args.max_body_kb * 1024,
        max_batch=args.max_batch,
        window_s=args.window_ms / 1000,
        max_split=args.max_split,
        max_server_steps=args.max_server_steps,
        max_queued_images=args.max_queued_images,
        rate_per_token=args.rate,
        burst_per_token=max(1, round(2 * args.rate)),
        read_timeout_s=args.read_timeout,
    )


def cmd_evaluate(args) -> None:
    if args.run is not None:
        return rescore_run(args)
    if args.out is None:
        raise UserError("give --out DIR (where evaluation.json goes), or --run RUN to score a finished federation")
    cfg = _config(args)
    from fedaigc.eval.base_model import evaluate_base

    result = evaluate_base(cfg, args.out, args.data, args.model, args.evaluator, args.samples, args.per_class, not args.quiet)
    (args.out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    ev = result["evaluator"]
    print(
        f"evaluator on {ev['images']} held-out real images: domain {ev['domain_top']:.1%} "
        f"(confident {ev['domain_confident']:.1%}), class {ev['class_top']:.1%} (confident {ev['class_confident']:.1%})"
    )
    if "base_model" in result:
        b = result["base_model"]
        print(
            f"base model, {b['samples']} samples: class accuracy {b['class_acc']:.1%} confident "
            f"(top guess {b['class_top']:.1%}) at threshold {result['threshold']}"
        )
    print(f"results: {args.out / 'evaluation.json'}")


def rescore_run(args) -> None:
    """A finished run's adapters scored again with `--per-client` samples per client (device-only sampling)."""
    from fedaigc.eval.evaluate import evaluate_run
    from fedaigc.server.rundir import RunDir
    from fedaigc.simulation.federate import saved_run

    if args.out is not None:
        raise UserError("--run scores into the run directory itself: leave out --out")
    if args.per_client < 1:
        raise UserError(f"--per-client must be at least 1, got {args.per_client}")
    if not (args.run / "config.toml").is_file():
        raise UserError(f"{args.run} is not a run directory (no config.toml)")
    cfg, data, model = saved_run(args.run)
    run = RunDir(args.run)
    run.check(cfg)  # before the evaluator trains: the config its rounds ran with, their state, metrics.json
    if run.last_round() < cfg.federation.rounds:
        raise UserError(f"{args.run} finished {run.last_round()} of {cfg.federation.rounds} rounds: resume it first")
    cfg.client.samples = args.per_client
    key = f"samples_{args.per_client}"
    metrics = evaluate_run(cfg, run, args.data or data, args.model or model, progress=not args.quiet, key=key)
    scores = metrics[key]
    for cid, s in scores["per_client"].items():
        print(f"client {cid} ({s['domain']}): style {s['style_acc']:.1%}, class {s['class_acc']:.1%}, FID {s['fid']:.1f}")
    mean = scores["mean"]
    print(
        f"{cfg.federation.strategy}, {args.per_client} samples per client: style acc {mean['style_acc']:.1%}, "
        f"class acc {mean['class_acc']:.1%}, evaluator-FID {mean['fid']:.1f} ({run.metrics_file}, key {key!r})"
    )


def cmd_federate(args) -> None:
    from fedaigc import config
    from fedaigc.eval.evaluate import evaluate_run
    from fedaigc.simulation.federate import simulate

    flags = {
        "federation": {
            "strategy": args.strategy,
            "num_clients": args.num_clients,
            "rounds": args.rounds,
            "fraction": args.fraction,
            "seed": args.seed,
        },
        "client": {"steps": args.steps, "prompt_mode": args.prompt_mode},
    }
    cfg = _config(args, **flags)
    if args.resume and args.out and args.resume != args.out:
        raise UserError("give the run directory once: --resume RUN (or --out RUN)")
    if args.allow_config_change and not args.resume:
        raise UserError("--allow-config-change goes with --resume RUN")
    out = args.resume or args.out or Path("runs/federate")
    changes = {}  # a resumed run keeps its config but for what --config and the flags set explicitly
    if args.resume:
        if not (args.resume / "config.toml").is_file():
            raise UserError(f"nothing to resume in {args.resume} (no config.toml)")
        file_values = config.read_toml(args.config) if args.config else {}
        changes = {s: {**file_values.get(s, {}), **v} for s, v in _overrides(args, **flags).items()}
        changes |= {s: v for s, v in file_values.items() if s not in changes}
    run, cfg, data, model = simulate(
        cfg, out, args.data, args.model, resume=bool(args.resume), changes=changes, allow_config_change=args.allow_config_change
    )
    metrics = evaluate_run(cfg, run, data, model, progress=not args.quiet)
    mean = metrics["final"]["mean"]
    print(f"run directory: {run.root} (report.md, metrics.json, adapters/, samples/)")
    print(
        f"{cfg.federation.strategy}: {len(metrics['rounds'])} rounds, clustering ARI {metrics['clustering']['ari']:.2f}, "
        f"style acc {mean['style_acc']:.1%}, class acc {mean['class_acc']:.1%}, evaluator-FID {mean['fid']:.1f}"
    )


def cmd_experiment(args) -> None:
    from fedaigc.experiments import run_experiment

    cfg = _config(args, federation={"num_clients": args.num_clients, "rounds": args.rounds})
    out = args.out or Path(f"runs/experiment_{args.name}")
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    modes = [x.strip() for x in args.modes.split(",") if x.strip()] if args.modes else None
    report, summary = run_experiment(
        args.name, cfg, out, args.data, args.model, args.seeds, only, progress=not args.quiet, modes=modes
    )
    print(f"report: {report}; table: {out / 'results.csv'}")
    print(summary)


def cmd_demo(args) -> None:
    from fedaigc.demo import headline, run_demo

    cfg = _config(args)
    summary = run_demo(cfg, args.out, args.data, args.model, progress=not args.quiet)
    print(f"report: {args.out / 'report.md'} ({summary['seconds'] / 60:.1f} min)")
    print(headline(summary))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedaigc").setLevel(logging.WARNING if args.quiet else logging.INFO)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # per-file weight-loading bars say nothing to a user
    try:
        if hasattr(args, "device"):
            from fedaigc.model.base import DEVICE_ENV, pick_device

            pick_device(args.device)  # a bad name (the flag's or $FEDAIGC_DEVICE's) fails here, before any work
            if args.device:
                os.environ[DEVICE_ENV] = args.device  # Ray's client workers and `serve` subprocesses inherit it
        args.func(args)
    except UserError as e:
        print(f"fedaigc: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"fedaigc: run failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
