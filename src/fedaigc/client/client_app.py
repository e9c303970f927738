"""The Flower ClientApp: one edge device. Runs unchanged in the simulation engine (`fedaigc
federate`) and on a real SuperNode (`flower-supernode` + `flwr run`).

The device's own state (its base model copy, its private token name, its images) lives in a
per-process cache keyed by client id, so the base model loads once per worker, not once per round.
Node config: `partition-id` and `num-partitions` (Flower's), optional `data-dir` (the device's
own images; default: the preset's generated set, partitioned as the server's config says).
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedaigc import config

if TYPE_CHECKING:  # torch, diffusers and transformers load only when a client trains: the Deployment
    from fedaigc.client.train import LocalClient  # Engine starts a process per message, and a query needs none

log = logging.getLogger(__name__)

_CLIENTS: dict[tuple[str, int], LocalClient] = {}


def derived_seed(*parts) -> int:
    """A stable seed from (seed, round, client id, ...): crc32 of their text."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def client_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def build_client(cfg: config.Config, cid: int, num_clients: int, data_dir=None, model_dir=None, own_folder=False) -> LocalClient:
    """Client `cid` of a federation: its share of the data (or, with `own_folder`, every image in
    `data_dir`: a real device's own pictures), its own model copy and private token. Everything is
    derived from the config's seeds, so the same client comes back after a restart."""
    import torch

    from fedaigc.client.train import LocalClient
    from fedaigc.data.dataset import ClientShare, ImageFolder, ensure_dataset, partition, split
    from fedaigc.model.base import load_model

    fed = cfg.federation
    folder = ImageFolder(ensure_dataset(data_dir or None, cfg), size=cfg.data.size)
    train, _ = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    if own_folder:
        share = ClientShare(cid, max(folder.domains, key=lambda d: sum(s.domain == d for s in train)), train)
    else:
        share = partition(train, num_clients, fed.per_client, fed.purity, fed.dirichlet, seed=fed.seed)[cid]
    model = load_model(model_dir or None)
    torch.manual_seed(fed.seed)  # every client starts from the same LoRA initialisation
    client = LocalClient(
        model,
        folder.stack(share.samples),
        [s.domain for s in share.samples],
        [s.cls for s in share.samples],
        cfg.client,
        seed=derived_seed(fed.seed, "token", cid),
    )
    client.domain = share.domain
    return client


def get_client(context: Context, run: dict) -> LocalClient:
    """This node's client, built once per worker process."""
    cid = client_id(context)
    key = (str(run.get("config", "")) + str(run.get("data", "")) + str(run.get("model", "")), cid)
    if key not in _CLIENTS:
        cfg = config.from_run_config(run)
        num = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
        own = context.node_config.get("data-dir")
        _CLIENTS[key] = build_client(cfg, cid, num, own or run.get("data"), run.get("model"), own_folder=bool(own))
    return _CLIENTS[key]


def make_client_app(extra_run_config: dict | None = None) -> ClientApp:
    """A ClientApp; `extra_run_config` fills in run-config keys (for the simulation engine,
    which passes no run config of its own)."""
    app = ClientApp()

    def run_config(context: Context) -> dict:
        return {**context.run_config, **(extra_run_config or {})}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        client = get_client(context, run_config(context))
        content = msg.content
        cfg_rec = content["config"]
        server_round = int(cfg_rec["server-round"])
        adapter = content["lora"].to_torch_state_dict() if "lora" in content else None
        slot = content["slot"].to_torch_state_dict()["slot"] if "slot" in content else None
        merged = content["merged"].to_torch_state_dict() if "merged" in content else None  # FLoRA's global stack
        seed = derived_seed(cfg_rec["seed"], server_round, client_id(context))
        upload = client.train_round(adapter, slot, int(cfg_rec["steps"]), torch.Generator().manual_seed(seed), merged)
        reply = RecordDict(
            {
                "lora": ArrayRecord(upload.lora),
                "extra": ArrayRecord({"slot": upload.slot, "embedding": upload.embedding}),
                "metrics": MetricRecord(
                    {"client-id": client_id(context), "num-examples": upload.num_examples, "train-loss": upload.train_loss}
                ),
            }
        )
        return Message(content=reply, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Tells the server which client this node is (node ids change when a server restarts)."""
        return Message(content=RecordDict({"info": ConfigRecord({"client-id": client_id(context)})}), reply_to=msg)

    return app


app = make_client_app()
