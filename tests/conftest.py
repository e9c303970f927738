import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# one fresh cache (generated data, trained evaluators) for the whole session, never the user's
os.environ["FEDAIGC_CACHE"] = tempfile.mkdtemp(prefix="fedaigc-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# On a GPU, compare at float32 precision: cuDNN convolutions use TF32 by default (~1e-3 off)
torch.backends.cudnn.allow_tf32 = False

from fedaigc.config import preset  # noqa: E402
from fedaigc.data.dataset import write_dataset  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_ray_for_the_session():
    """The simulated federations of the session share one Ray instance. flwr's RayBackend.terminate
    stops the run's actors and then shuts Ray down, so every `run_simulation` pays Ray's start-up
    again (docs/benchmarks.md, "Test suite"); here it stops the actors only, and Ray goes at the end."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    terminate = RayBackend.terminate

    def stop_actors(self: RayBackend) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    RayBackend.terminate = stop_actors
    yield
    RayBackend.terminate = terminate
    import ray

    ray.shutdown()


@pytest.fixture
def one_thread():
    """Bit-exact comparisons: with several threads, float sums may differ in the last bit between
    two runs, and AdamW's first step (lr x the gradient's sign) can turn that into lr."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cfg():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_cfg):
    d = tiny_cfg.data
    return write_dataset(tmp_path_factory.mktemp("data") / "set", d.per_class, d.size, d.seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_cfg, tiny_data):
    from fedaigc.model.pretrain import pretrain

    return pretrain(tiny_cfg, tiny_data, tmp_path_factory.mktemp("model") / "m", progress=False)
