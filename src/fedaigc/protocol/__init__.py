"""The federated protocol: what the training edge server and an edge client say to each other,
the one definition both sides import (neither imports the other).

- `lora`: the LoRA tensors (`Adapter`, a flat dict in diffusers' file format), their `LoraSpec`,
  flatten / unflatten. torch only.
- `wire`: how tensors travel in Flower's arrays (`client.transfer_dtype`). torch only.
- `seeds`: `derived_seed`, the one stable hash every seed and cache name is derived with.
- `round`: a round's `RoundPlan` (server -> client) and `Upload` (client -> server), and their
  Flower records.
- `adapter_files`: the diffusers-format safetensors files adapters are saved as and read from.
"""
