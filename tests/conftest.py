import pytest
import torch

# Tiny models run fastest on one thread, and CI's two cores must not be oversubscribed.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
