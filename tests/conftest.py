"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread: the tiny networks gain nothing from threads, and on busy shared cores
    each op's thread hand-off costs more. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_models(tmp_path_factory):
    """Paths of a tiny random AutoencoderKL (factor 2, 4 latent channels) and CLIP text encoder (D = 32, L = 16),
    written once per session by train_sd.py (about 10 s: its tokenizer's vocabulary is built merge by merge)."""
    import train_sd

    vae_dir, text_dir = train_sd.make_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))
    return {"vae": vae_dir, "text_encoder": text_dir}
