import dataclasses

import pytest
import torch

from fedaigc.data.dataset import ImageFolder, split
from fedaigc.eval import evaluator as evaluator_module
from fedaigc.eval.evaluator import Evaluator, train_evaluator
from fedaigc.eval.metrics import alignment, clustering_ari, confident_accuracy, fid_kid


def test_confident_accuracy_counts_only_confident_right_guesses():
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.99, 0.01]])
    r = confident_accuracy(probs, 0, threshold=0.9)
    assert r == {"confident": 0.5, "top": 0.75}
    r = confident_accuracy(probs, torch.tensor([0, 0, 1, 1]), threshold=0.9)
    assert r == {"confident": 0.5, "top": 0.75}


def test_centred_alignment_tells_the_domains_apart_where_a_shared_part_makes_every_raw_cosine_high():
    common, a, b = 10 * torch.eye(3)[0], torch.eye(3)[1], torch.eye(3)[2]
    real_a, fake_b = torch.stack([common + a] * 4), torch.stack([common + b] * 4)
    origin = torch.stack([common + a, common + b]).mean(0)  # the mean of every domain's real images
    assert alignment(real_a, fake_b) > 0.98  # raw: any image looks aligned
    assert alignment(real_a, fake_b, origin=origin) == pytest.approx(-1.0)
    assert alignment(real_a, real_a, origin=origin) == pytest.approx(1.0)


def test_alignment_identical_is_one_and_opposite_is_minus_one():
    f = torch.randn(10, 8)
    same = f[0:1].repeat(5, 1)
    assert abs(alignment(same, same) - 1) < 1e-6
    assert abs(alignment(same, -same) + 1) < 1e-6


class Pooled(torch.nn.Module):
    """A transparent feature extractor: 4x4 average colours (48 numbers)."""

    num_features = 48

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def test_fid_kid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    torch.manual_seed(0)
    ev = Pooled()
    real = torch.rand(64, 3, 32, 32)
    same = fid_kid(real, real, ev)
    assert abs(same["fid"]) < 1e-2 and abs(same["kid"]) < 1e-3
    other = fid_kid(real, (real * 0.3).clamp(0, 1), ev)
    assert other["fid"] > 10 * max(same["fid"], 1e-3) and other["kid"] > same["kid"]


def test_ari():
    assert clustering_ari(["a", "a", "b", "b"], [1, 1, 0, 0]) == 1.0
    assert clustering_ari(["a", "a", "b", "b"], [0, 1, 0, 1]) < 0.1


def test_evaluator_is_a_torchmetrics_feature_extractor():
    ev = Evaluator(["a", "b"], ["x", "y"]).eval()
    r = fid_kid(torch.rand(16, 3, 32, 32), torch.rand(16, 3, 48, 48), ev)
    assert r["fid"] == r["fid"] and r["kid"] == r["kid"]  # finite numbers, any input size


@pytest.mark.parametrize("train", [train_evaluator, evaluator_module._train_evaluator], ids=["ours", "unpinned"])
def test_evaluator_weights_do_not_depend_on_the_thread_count(train, tiny_data, tiny_cfg):
    """The measuring instrument must be the same on every machine (it was not: 1 and 2 threads
    gave different evaluators); the unpinned training loop shows that the test can tell."""
    data = ImageFolder(tiny_data)
    samples, _ = split(data.samples, tiny_cfg.data.held_out, tiny_cfg.data.seed)
    cfg = dataclasses.replace(tiny_cfg.evaluator, steps=5)
    threads, weights = torch.get_num_threads(), []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            weights.append(train(data, samples, cfg, progress=False).state_dict())
        finally:
            torch.set_num_threads(threads)
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert same == (train is train_evaluator)
