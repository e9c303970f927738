"""Hybrid inference: the inference edge server (`service`), its cluster mixtures (`mixing`), the
split sampler (`sampler`) and the device (`device`).

`MIX_MODES` lives here, free of torch, so `fedaigc --help` lists the modes without loading a model."""

MIX_MODES = {  # what the inference edge server's steps run with; the device chooses one per request
    "auto": "the cluster adapters weighted by the task embedding the device sends (in effect its own cluster's adapter)",
    "global": "the global LoRA, the DED/SNT stack of every cluster as the training server built it",
    "base": "no adapter, the base model's steps",
    "uniform": "equal weights over the clusters the token may use",
}
