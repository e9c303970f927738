"""One federated round as the two sides exchange it: the server's `RoundPlan` for a client (what it
trains, from what) and the client's `Upload` (what leaves the device), each with its Flower record
form. These two classes are the protocol: the ServerApp writes plans and reads uploads, the
ClientApp reads plans and writes uploads, and code that replays a round (experiments, tests,
benchmarks) builds the same plan.

A plan travels as a TRAIN message: `config` {server-round, seed, steps, timestep-bias,
profile-steps, profile-bias} and the arrays `lora` (the start adapter), `slot` (the start token
slot) and `merged` (FLoRA's global stack, merged into the base weights), each only when there is
one. An upload travels as the reply: `lora`, `extra` {slot, embedding}, `metrics` {client-id,
num-examples, train-loss}, and `profile` / `profile-repeat` after a profiling pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedaigc.protocol.lora import Adapter
from fedaigc.protocol.seeds import derived_seed
from fedaigc.protocol.wire import bytes_of, from_wire, to_wire


@dataclass
class RoundPlan:
    """What the server asks one client to do in round `server_round`."""

    server_round: int
    seed: int  # the federation seed: the client's generator seed is derived from it (`client_seed`)
    steps: int  # local LoRA steps
    timestep_bias: float  # of the round's training (uniform, 1.0, in a profiling round)
    profile_steps: int = 0  # a profiling pass (and its repeat) before the round; 0 = none (docs/method.md)
    profile_bias: float = 1.0  # the profiling pass's timestep bias
    adapter: Adapter | None = None  # the LoRA to start from; None: the initial LoRA every client began with
    slot: torch.Tensor | None = None  # the token slot to start from; None or empty: the neutral slot
    merged: Adapter | None = None  # FLoRA: the global stack, merged into the base weights under a fresh LoRA

    def client_seed(self, client_id: int) -> int:
        """The seed of the client's generator this round: every draw of its round comes from it."""
        return derived_seed(self.seed, self.server_round, client_id)

    def download_bytes(self, wire: torch.dtype) -> int:
        """The bytes of the adapter and the merged stack as they travel in `wire`."""
        return sum(bytes_of(t, wire) for t in (self.adapter, self.merged) if t is not None)

    def to_record_dict(self, wire: torch.dtype) -> RecordDict:
        content = RecordDict(
            {
                "config": ConfigRecord(
                    {
                        "server-round": self.server_round,
                        "steps": self.steps,
                        "seed": self.seed,
                        "timestep-bias": self.timestep_bias,
                        "profile-steps": self.profile_steps,
                        "profile-bias": self.profile_bias,
                    }
                )
            }
        )
        if self.adapter is not None:
            content["lora"] = ArrayRecord(to_wire(self.adapter, wire))
        if self.slot is not None and self.slot.numel():
            content["slot"] = ArrayRecord(to_wire({"slot": self.slot}, wire))
        if self.merged is not None:
            content["merged"] = ArrayRecord(to_wire(self.merged, wire))
        return content

    @classmethod
    def from_record_dict(cls, content: RecordDict) -> RoundPlan:
        """The plan in a TRAIN message, its tensors back in float32."""
        c = content["config"]

        def arrays(name: str) -> Adapter | None:
            return from_wire(content[name].to_torch_state_dict()) if name in content else None

        slot = arrays("slot")
        return cls(
            server_round=int(c["server-round"]),
            seed=int(c["seed"]),
            steps=int(c["steps"]),
            timestep_bias=float(c["timestep-bias"]),
            profile_steps=int(c["profile-steps"]),
            profile_bias=float(c["profile-bias"]),
            adapter=arrays("lora"),
            slot=slot["slot"] if slot is not None else None,
            merged=arrays("merged"),
        )


@dataclass
class Upload:
    """Exactly what leaves the device after a round: tensors and counts, no text, no images."""

    lora: Adapter
    slot: torch.Tensor  # the private token's embedding (its name stays on the device)
    num_examples: int
    embedding: torch.Tensor  # the encoded task: pooled text-encoder output of the rewritten prompts
    train_loss: float
    profile: Adapter | None = None  # UNet LoRA after a profiling pass, when the server asks for one (docs/method.md)
    profile_repeat: Adapter | None = None  # the same pass once more from the same start: the server's noise reference

    def to_record_dict(self, client_id: int, wire: torch.dtype) -> RecordDict:
        reply = RecordDict(
            {
                "lora": ArrayRecord(to_wire(self.lora, wire)),
                "extra": ArrayRecord(to_wire({"slot": self.slot, "embedding": self.embedding}, wire)),
                "metrics": MetricRecord(
                    {"client-id": client_id, "num-examples": self.num_examples, "train-loss": self.train_loss}
                ),
            }
        )
        if self.profile is not None:
            reply["profile"] = ArrayRecord(to_wire(self.profile, wire))
        if self.profile_repeat is not None:
            reply["profile-repeat"] = ArrayRecord(to_wire(self.profile_repeat, wire))
        return reply

    @classmethod
    def from_record_dict(cls, content: RecordDict) -> tuple[int, Upload, int]:
        """(client id, the upload with its tensors in float32, the bytes its arrays took on the wire)."""
        m = content["metrics"]
        names = ("lora", "extra", "profile", "profile-repeat")
        sent = {name: content[name].to_torch_state_dict() for name in names if name in content}
        extra = from_wire(sent["extra"])
        upload = cls(
            from_wire(sent["lora"]),
            extra["slot"],
            int(m["num-examples"]),
            extra["embedding"],
            float(m["train-loss"]),
            from_wire(sent["profile"]) if sent.get("profile") else None,
            from_wire(sent["profile-repeat"]) if sent.get("profile-repeat") else None,
        )
        return int(m["client-id"]), upload, sum(bytes_of(t) for t in sent.values())
