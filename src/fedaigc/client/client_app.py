"""The Flower ClientApp: one edge device. Runs unchanged in the simulation engine (`fedaigc
federate`) and on a real SuperNode (`flower-supernode` + `flwr run`).

The device's own state (its private token, its images) lives in a per-process cache keyed by
client id; the clients of one process share one base model (`build_client`), loaded once per
worker, not once per client or per round.
Node config: `partition-id` and `num-partitions` (Flower's), optional `data-dir` (the device's
own images; default: the preset's generated set, partitioned as the server's config says).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedaigc import config
from fedaigc.protocol.seeds import derived_seed

if TYPE_CHECKING:  # torch, diffusers and transformers load only when a client trains: the Deployment
    from fedaigc.client.train import LocalClient  # Engine starts a process per message, and a query needs none
    from fedaigc.model.base import DiffusionModel

log = logging.getLogger(__name__)

# (config, model dir) -> the base model its clients share and those clients, by their build arguments;
# one entry at most: the run this process serves now
_SHARED: dict[tuple[str, str], tuple[DiffusionModel, dict[tuple, LocalClient]]] = {}


def client_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def build_client(cfg: config.Config, cid: int, num_clients: int, data_dir=None, model_dir=None, own_folder=False) -> LocalClient:
    """Client `cid` of a federation: its share of the data (or, with `own_folder`, every image in
    `data_dir`: a real device's own pictures) and private token. Everything is derived from the
    config's seeds, so the same client comes back after a restart.

    The clients of one process share one base model per (config, model dir), and the same
    arguments give back the same client: a client holds only its images, prompts and token, and
    `LocalClient.load` puts its LoRA and slot into the shared model before each use. So a Ray
    worker serving 50 simulated clients holds one model, not 50."""
    from fedaigc.model.base import load_model

    key = (config.to_toml(cfg), str(model_dir or ""))
    if key not in _SHARED:
        _SHARED.clear()  # another run: its model replaces the last one's
        _SHARED[key] = (load_model(model_dir or None, dtype=cfg.model.dtype, resolution=cfg.model.resolution), {})
    model, clients = _SHARED[key]
    build_key = (cid, num_clients, str(data_dir or ""), own_folder)
    if build_key not in clients:
        try:
            clients[build_key] = _new_client(model, cfg, cid, num_clients, data_dir, own_folder)
        except Exception:
            # the first client attaches the LoRA: a failure halfway would leave a half-adapted model,
            # and the retry's "adapter already exists" would hide this error, so the model goes too
            if not clients:
                del _SHARED[key]
            raise
    return clients[build_key]


def _new_client(model: DiffusionModel, cfg: config.Config, cid: int, num_clients: int, data_dir, own_folder: bool) -> LocalClient:
    import numpy as np
    import torch

    from fedaigc.client.attacks import assigned, backdoor_samples, backdoor_target
    from fedaigc.client.train import LocalClient
    from fedaigc.data.dataset import ClientShare, ImageFolder, ensure_dataset, partition, split

    fed = cfg.federation
    folder = ImageFolder(ensure_dataset(data_dir or None, cfg), size=model.image_size)  # the model's resolution
    train, _ = split(folder.samples, cfg.data.held_out, cfg.data.seed)
    if own_folder:
        share = ClientShare(cid, max(folder.domains, key=lambda d: sum(s.domain == d for s in train)), train)
    else:
        share = partition(train, num_clients, fed.per_client, fed.purity, fed.dirichlet, seed=fed.seed)[cid]
    samples, attack = share.samples, assigned(fed).get(cid)
    if attack is not None and attack[0] == "backdoor":  # a poisoning experiment's attacker: trigger-captioned images
        rng = np.random.default_rng(derived_seed(fed.seed, "backdoor", cid))
        samples = backdoor_samples(samples, train, backdoor_target(share.domain, folder.domains), rng)
    torch.manual_seed(fed.seed)  # every client starts from the same LoRA initialisation
    client = LocalClient(
        model,
        folder.stack(samples),
        [s.domain for s in samples],
        [s.cls for s in samples],
        cfg.client,
        seed=derived_seed(fed.seed, "token", cid),
    )
    client.domain, client.attack = share.domain, attack
    return client


def get_client(context: Context, run: dict) -> LocalClient:
    """This node's client, built once per worker process (`build_client` keeps it)."""
    cfg = config.from_run_config(run)
    num = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    own = context.node_config.get("data-dir")
    return build_client(cfg, client_id(context), num, own or run.get("data"), run.get("model"), own_folder=bool(own))


def make_client_app(extra_run_config: dict | None = None) -> ClientApp:
    """A ClientApp; `extra_run_config` fills in run-config keys (for the simulation engine,
    which passes no run config of its own)."""
    app = ClientApp()

    def run_config(context: Context) -> dict:
        return {**context.run_config, **(extra_run_config or {})}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from fedaigc.protocol.round import RoundPlan
        from fedaigc.protocol.wire import wire_dtype

        client = get_client(context, run_config(context))
        plan = RoundPlan.from_record_dict(msg.content)
        seed = plan.client_seed(client_id(context))
        upload = client.follow(plan, seed)
        if client.attack is not None:  # a poisoning experiment's attacker: its update is transformed
            from fedaigc.client.attacks import attack_upload

            received = plan.adapter if plan.adapter is not None else client.initial[0]
            upload = attack_upload(upload, received, *client.attack, torch.Generator().manual_seed(derived_seed(seed, "attack")))
        return Message(content=upload.to_record_dict(client_id(context), wire_dtype(client.cfg.transfer_dtype)), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Tells the server which client this node is (node ids change when a server restarts)."""
        return Message(content=RecordDict({"info": ConfigRecord({"client-id": client_id(context)})}), reply_to=msg)

    return app


app = make_client_app()
