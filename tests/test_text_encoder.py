"""The "clip" text-encoder option: a small CLIP text model trained jointly with the base UNet."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextModel

from fedaigc.errors import UserError
from fedaigc.model.base import build_model, load_model
from fedaigc.model.pretrain import pretrain
from fedaigc.model.sampling import generate


@pytest.fixture(scope="module")
def clip_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, text_encoder="clip"))


def test_clip_text_encoder_trains_with_the_base_and_round_trips(tmp_path, clip_cfg, tiny_data):
    torch.manual_seed(clip_cfg.pretrain.seed)  # what pretrain does before building: same initial weights
    initial = build_model(clip_cfg.model, clip_cfg.data.size).text_encoder.state_dict()
    out = pretrain(clip_cfg, tiny_data, tmp_path / "m", progress=False)

    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    CLIPTextModel.from_pretrained(out / "text_encoder")  # loads outside fedaigc
    AutoTokenizer.from_pretrained(out / "tokenizer")

    model = load_model(out)
    assert isinstance(model.text_encoder, CLIPTextModel) and not model.use_attention_mask
    trained = model.text_encoder.state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], trained[k].cpu())]
    assert "encoder.layers.0.self_attn.q_proj.weight" in changed
    assert "embeddings.token_embedding.weight" in changed
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    images = generate(model, ["a picture of a star", "a picture of a fish"], [1, 2], num_steps=3, progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert json.loads((out / "pretrain.json").read_text())["text_encoder"]["trained"] is True


def test_unknown_text_encoder_is_a_user_error(tiny_cfg):
    with pytest.raises(UserError, match="text encoder"):
        build_model(dataclasses.replace(tiny_cfg.model, text_encoder="t5"), 32)
