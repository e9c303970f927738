import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from fedaigc import config
from fedaigc.client import adapter as adapter_module
from fedaigc.client.adapter import attach_lora, get_adapter, load_adapter_file
from fedaigc.client.client_app import build_client
from fedaigc.client.tokens import rewrite
from fedaigc.client.train import LocalClient
from fedaigc.config import ClientConfig
from fedaigc.data.dataset import ImageFolder
from fedaigc.data.render import STYLE_WORDS
from fedaigc.errors import UserError
from fedaigc.model.base import load_model
from fedaigc.model.pretrain import diffusion_loss
from fedaigc.protocol.adapter_files import save_adapter
from fedaigc.protocol.round import Upload


@pytest.fixture
def sketch_client(tiny_model_dir, tiny_data):
    data = ImageFolder(tiny_data)
    own = [s for s in data.samples if s.domain == "sketch"]
    cfg = ClientConfig(steps=3, batch_size=8)
    model = load_model(tiny_model_dir)
    return LocalClient(model, data.stack(own), [s.domain for s in own], [s.cls for s in own], cfg, seed=7)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g).to(unet.device)
    ctx = torch.randn(2, 12, 384, generator=g).to(unet.device)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=ctx).sample.cpu()


def test_rewrite_replaces_only_the_style_word():
    assert rewrite("a Sketch of a sketchbook", "sketch", "<u0001>") == "a <u0001> of a sketchbook"


def test_upload_holds_no_style_word_no_token_name_and_no_image(sketch_client):
    upload = sketch_client.train_round(None, None, steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(upload, Upload) and upload.num_examples == len(sketch_client.images)
    assert all("<u" not in p or sketch_client.token.name in p for p in sketch_client.prompts)
    assert not any("sketch" in p for p in sketch_client.prompts)
    hidden = sketch_client.model.text_encoder.config.hidden_size
    assert upload.embedding.shape == (hidden,) and upload.slot.shape == (hidden,)
    words = set(STYLE_WORDS.values()) | {sketch_client.token.name}
    for key, tensor in upload.lora.items():
        assert not any(w in key for w in words), key
        assert tensor.dim() == 2 and min(tensor.shape) <= sketch_client.spec.rank, key
    for field in vars(upload).values():
        assert not isinstance(field, str)
        if isinstance(field, torch.Tensor):
            assert field.shape[-2:] != sketch_client.images.shape[-2:]


def test_private_embedding_differs_from_the_plain_one(tiny_model_dir, tiny_data):
    data = ImageFolder(tiny_data)
    own = [s for s in data.samples if s.domain == "sketch"]
    embeddings = {}
    for mode in ("private", "plain"):
        client = LocalClient(
            load_model(tiny_model_dir),
            data.stack(own),
            [s.domain for s in own],
            [s.cls for s in own],
            ClientConfig(prompt_mode=mode),
            seed=1,
        )
        embeddings[mode] = client.task_embedding()
    assert torch.nn.functional.cosine_similarity(embeddings["private"], embeddings["plain"], dim=0) < 0.999


def test_fine_tuning_changes_lora_and_slot_but_not_the_base(sketch_client):
    base = {n: p.clone() for n, p in sketch_client.model.unet.named_parameters() if "lora_" not in n}
    slot0 = sketch_client.token.get_slot()
    other_rows = sketch_client.token.embeddings.weight[: sketch_client.token.id].clone()
    upload = sketch_client.train_round(None, None, steps=3, generator=torch.Generator().manual_seed(0))
    assert any(v.abs().sum() > 0 for k, v in upload.lora.items() if "lora_B" in k)
    assert not torch.equal(upload.slot, slot0)
    assert torch.equal(sketch_client.token.embeddings.weight[: sketch_client.token.id], other_rows)
    for n, p in sketch_client.model.unet.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def _own_images_loss(client: LocalClient, seed: int = 123) -> float:
    """The client's denoising loss on its own images at noise and timesteps it never trained with."""
    latents, _ = client.latents()
    context = client.model.encode_prompts(client.unique_prompts)[client.prompt_index]
    losses = []
    with torch.no_grad():
        for repeat in range(4):
            g = torch.Generator().manual_seed(seed + repeat)
            losses.append(diffusion_loss(client.model, latents, context, g).item())
    return sum(losses) / len(losses)


def test_fine_tuning_learns_the_clients_own_images(sketch_client):
    """Fails if the client stops learning: 30 steps of LoRA and slot must lower the loss on its own images
    (paired: the same noise and timesteps before and after)."""
    sketch_client.load(None, None)
    before = _own_images_loss(sketch_client)
    sketch_client.fine_tune(30, torch.Generator().manual_seed(0))
    after = _own_images_loss(sketch_client)
    assert after < 0.97 * before, (before, after)  # measured: 1.000 -> 0.936; no learning leaves it equal


def test_the_rounds_timestep_bias_is_the_one_trained_with(sketch_client, one_thread):  # bit-exact: one thread
    def slot_after(bias):
        return sketch_client.train_round(None, None, 3, torch.Generator().manual_seed(0), timestep_bias=bias).slot

    assert torch.equal(slot_after(None), slot_after(sketch_client.cfg.timestep_bias))  # no word from the server: the config's
    assert not torch.equal(slot_after(1.0), slot_after(3.0))  # the same noise and batches, other timesteps


def test_the_profiling_pass_then_its_repeat_then_the_round_each_from_the_start(sketch_client, one_thread):
    def round_(**kwargs):
        return sketch_client.train_round(None, None, 3, torch.Generator().manual_seed(0), **kwargs)

    profiled = round_(timestep_bias=1.0, profile_steps=3, profile_bias=2.0)
    biased, uniform = round_(timestep_bias=2.0), round_(timestep_bias=1.0)
    unet = {k: v for k, v in biased.lora.items() if k.startswith("unet.")}
    assert profiled.profile.keys() == unet.keys() and all(torch.equal(profiled.profile[k], unet[k]) for k in unet)
    assert biased.profile is None and uniform.profile is None and biased.profile_repeat is None
    # the repeated pass and then the round itself: each from the start again (not on top of the pass
    # before), the generator's next draws, the round uniform
    generator = torch.Generator().manual_seed(0)
    passes = []
    for bias in (2.0, 2.0, 1.0):
        sketch_client.load(None, None)
        sketch_client.fine_tune(3, generator, bias)
        passes.append(get_adapter(sketch_client.model))
    assert all(torch.equal(profiled.profile_repeat[k], passes[1][k]) for k in unet)
    assert not torch.equal(profiled.profile_repeat[next(iter(unet))], profiled.profile[next(iter(unet))])
    assert all(torch.equal(profiled.lora[k], passes[2][k]) for k in passes[2])
    assert not torch.equal(profiled.lora[next(iter(unet))], uniform.lora[next(iter(unet))])


def test_warm_start_sets_exactly_what_the_server_sent(sketch_client):
    sent = {k: torch.randn_like(v) * 0.01 for k, v in get_adapter(sketch_client.model).items()}
    slot = torch.randn(sketch_client.model.text_encoder.config.hidden_size)
    sketch_client.load(sent, slot)
    got = get_adapter(sketch_client.model)
    assert all(torch.equal(got[k], sent[k]) for k in sent)
    assert torch.equal(sketch_client.token.get_slot(), slot)


def test_adapter_file_loads_unchanged_into_plain_diffusers_and_back(sketch_client, tiny_model_dir, tmp_path):
    upload = sketch_client.train_round(None, None, steps=3, generator=torch.Generator().manual_seed(0))
    path = save_adapter(tmp_path / "client.safetensors", upload.lora, sketch_client.spec)
    ours = _unet_out(sketch_client.model.unet)
    plain = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").to(sketch_client.model.device)
    base_out = _unet_out(plain)
    plain.load_lora_adapter(str(path), prefix="unet", adapter_name="client")
    assert torch.allclose(_unet_out(plain), ours, atol=1e-6)
    assert not torch.allclose(base_out, ours, atol=1e-4)
    fresh = attach_lora(load_model(tiny_model_dir), sketch_client.spec)
    load_adapter_file(fresh, path)
    assert torch.allclose(_unet_out(fresh.unet), ours, atol=1e-6)
    tokens = ["a picture of a star"]
    assert torch.allclose(fresh.encode_prompts(tokens), sketch_client.model.encode_prompts(tokens), atol=1e-6)


def test_bad_adapter_files_are_refused_and_nothing_is_half_loaded(sketch_client, tmp_path):
    good = get_adapter(sketch_client.model)
    before = _unet_out(sketch_client.model.unet)
    path = save_adapter(tmp_path / "good.safetensors", {k: v + 0.01 for k, v in good.items()}, sketch_client.spec)
    raw = path.read_bytes()
    cases = {}
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    cases["trunc.safetensors"] = "corrupt or truncated"
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases["junk.safetensors"] = "corrupt or truncated"
    tensors = load_file(str(path))
    first = sorted(tensors)[-1]
    bad = dict(tensors)
    bad[first] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    cases["shape.safetensors"] = f"tensor {first} has shape"
    bad = dict(tensors)
    bad[first] = tensors[first].clone()
    bad[first].view(-1)[0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    cases["nan.safetensors"] = f"tensor {first} contains NaN"
    bad = {k: v for k, v in tensors.items() if k != first}
    save_file(bad, str(tmp_path / "missing.safetensors"))
    cases["missing.safetensors"] = f"lacks tensor {first}"
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            load_adapter_file(sketch_client.model, tmp_path / name)
        assert name in str(err.value)
        assert torch.equal(_unet_out(sketch_client.model.unet), before), f"{name} half-loaded"


def test_a_client_build_that_fails_halfway_leaves_no_half_adapted_model(tiny_cfg, tiny_data, tiny_model_dir, monkeypatch):
    cfg = config.from_run_config({"config": config.to_toml(tiny_cfg)})
    cfg.federation.num_clients = n = 2  # a config of its own: no other test's clients share its model

    def broken(*args, **kwargs):
        raise RuntimeError("the text encoder's LoRA failed")

    monkeypatch.setattr(adapter_module, "inject_adapter_in_model", broken)  # after the UNet got its LoRA
    for _ in range(2):  # the retry meets the real error again, not "adapter already exists"
        with pytest.raises(RuntimeError, match="text encoder's LoRA failed"):
            build_client(cfg, 0, n, tiny_data, tiny_model_dir)
    monkeypatch.undo()
    client = build_client(cfg, 0, n, tiny_data, tiny_model_dir)
    assert any(k.startswith("text_encoder.") for k in client.initial[0])
    assert all(torch.count_nonzero(v) == 0 for k, v in client.initial[0].items() if "lora_B" in k)
