"""The Flower ServerApp: the training edge server. A Message-API `Strategy` that sends each node
its own cluster's LoRA and token slot, and hands the replies to the `ServerStrategy` (server/strategies.py).

Runs unchanged in the simulation engine (`fedaigc federate`) and under the Deployment Engine
(`flwr run`); run config keys: `preset`, `config` (TOML overrides), `run-dir`, `data`, `model`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedaigc import config
from fedaigc.errors import RunFailed, UserError
from fedaigc.protocol.lora import LoraSpec
from fedaigc.protocol.round import Upload
from fedaigc.protocol.wire import wire_dtype
from fedaigc.server import participation
from fedaigc.server.rundir import RunDir
from fedaigc.server.strategies import RoundReport, ServerStrategy, make_strategy

log = logging.getLogger(__name__)


class ClusterStrategy(Strategy):
    """Sends per-node arrays (its cluster's adapter), aggregates with a `ServerStrategy`."""

    def __init__(self, cfg: config.Config, aggregator: ServerStrategy, timeout: float = 3600):
        config.validate(cfg)
        self.cfg, self.aggregator, self.timeout = cfg, aggregator, timeout
        self.wire = wire_dtype(cfg.client.transfer_dtype)  # what the arrays travel in, both ways
        self.node_client: dict[int, int] = {}
        self.sent_bytes: dict[int, int] = {}  # per client, this round's download
        self.up_bytes = 0  # mean upload per client, this round
        self.last_report: RoundReport | None = None
        self.missing: list[int] = []
        self.sampled: list[int] = []  # the clients asked to train this round
        self.sim_seconds = 0.0  # this round's simulated wall time on the configured network

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Wait until the configured number of clients is connected (as Flower's own strategies do)."""
        wanted, t0 = self.cfg.federation.num_clients, time.monotonic()
        while len(nodes := list(grid.get_node_ids())) < wanted:
            if time.monotonic() - t0 > self.timeout:
                raise RunFailed(f"only {len(nodes)} of {wanted} clients connected within {self.timeout:.0f} s")
            log.info("waiting for clients: %d of %d connected", len(nodes), wanted)
            time.sleep(1.0)
        return nodes

    def identify(self, grid: Grid) -> None:
        """Ask nodes we do not know yet which client they are (node ids change across restarts)."""
        unknown = [n for n in self.wait_for_nodes(grid) if n not in self.node_client]
        if not unknown:
            return
        queries = [
            Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n)
            for n in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            if not reply.has_error():
                self.node_client[reply.metadata.src_node_id] = int(reply.content["info"]["client-id"])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.identify(grid)
        messages, self.sent_bytes = [], {}
        chosen = set(participation.participants(self.cfg, list(self.node_client.values()), server_round))
        self.sampled = sorted(chosen)
        for node, cid in sorted(self.node_client.items(), key=lambda x: x[1]):
            if cid not in chosen:
                continue
            plan = self.aggregator.plan_for(server_round, cid, self.cfg.client)
            if plan.adapter is not None or plan.merged is not None:  # a client sent no arrays counts out of the mean
                self.sent_bytes[cid] = plan.download_bytes(self.wire)
            messages.append(Message(content=plan.to_record_dict(self.wire), message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        uploads: dict[int, Upload] = {}
        up_bytes: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: a node failed: %s", server_round, reply.error.reason)
                continue
            cid, upload, travelled = Upload.from_record_dict(reply.content)  # float32: the server's math and state
            uploads[cid], up_bytes[cid] = upload, travelled
        if not uploads:
            raise RunFailed(f"round {server_round}: no client returned an update (see the client errors above)")
        expected = set(self.sampled)
        self.missing = sorted(expected - set(uploads))
        if self.missing:
            log.warning("round %d: no update from client(s) %s; aggregating the others", server_round, self.missing)
        weights = participation.weights(self.cfg, list(self.node_client.values()), server_round)
        self.last_report = self.aggregator.aggregate(server_round, uploads, weights)
        for cid, reason in self.last_report.rejected.items():
            log.warning("round %d: rejected the update of client %d: %s", server_round, cid, reason)
        accepted = [u for c, u in uploads.items() if c not in self.last_report.rejected]
        loss = sum(u.train_loss * u.num_examples for u in accepted) / max(1, sum(u.num_examples for u in accepted))
        self.up_bytes = int(sum(up_bytes.values()) / max(1, len(up_bytes)))
        self.sim_seconds = participation.round_seconds(self.cfg.network, self.cfg.client.steps, self.sent_bytes, up_bytes)
        return None, MetricRecord({"train-loss": float(loss), "clients": len(accepted)})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation happens after the run, on the personalized adapters (fedaigc/eval/evaluate.py)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        f = self.cfg.federation
        log.info(
            "strategy %s, %d clients, %d rounds, %d local steps, intra-cluster mode %s",
            f.strategy,
            f.num_clients,
            f.rounds,
            self.cfg.client.steps,
            f.intra,
        )

    def run(self, grid: Grid, run: RunDir, first_round: int, num_rounds: int) -> None:
        """The round loop (Strategy.start always begins at round 1; this one resumes)."""
        spec = LoraSpec.of(self.cfg.client)
        self.summary()
        for server_round in range(first_round, num_rounds + 1):
            t0 = time.perf_counter()
            replies = grid.send_and_receive(
                self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid), timeout=self.timeout
            )
            _, metrics = self.aggregate_train(server_round, replies)
            report = self.last_report
            entry = {
                "round": server_round,
                "train_loss": metrics["train-loss"],
                "clusters": {str(c): k for c, k in report.clusters.items()},
                "bytes_up": self.up_bytes,
                "bytes_down": int(sum(self.sent_bytes.values()) / max(1, len(self.sent_bytes))),
                "seconds": round(time.perf_counter() - t0, 2),
                "sim_seconds": round(self.sim_seconds, 3),
                "sampled": self.sampled,
                "missing": self.missing,
                "rejected": {str(c): r for c, r in report.rejected.items()},
                "fedit_error": report.fedit_error,
                "coefficients": {str(k): v for k, v in report.coefficients.items()},
                "ded": {str(k): v for k, v in report.ded.items()},
                "placed": {str(c): v for c, v in report.placed.items()},
            }
            run.save_round(self.aggregator, entry, spec, self.cfg)
            log.info(
                "round %d/%d done in %.1f s: loss %.4f, clusters %s",
                server_round,
                num_rounds,
                entry["seconds"],
                entry["train_loss"],
                entry["clusters"],
            )


def make_server_app(extra_run_config: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**context.run_config, **(extra_run_config or {})}
        cfg = config.from_run_config(run_config)
        if cfg.federation.strategy == "central":
            raise UserError("the central baseline pools the clients' data, it needs no federation: use `fedaigc federate`")
        run = RunDir(run_config.get("run-dir") or "runs/federate")
        run.check_config(cfg, bool(run_config.get("allow-config-change", False)))
        aggregator = make_strategy(cfg)
        done = run.start(cfg, aggregator)
        ClusterStrategy(cfg, aggregator).run(grid, run, done + 1, cfg.federation.rounds)

    return app


app = make_server_app()
