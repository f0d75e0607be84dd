import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import tiny_models
import torch
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def llava_path(tmp_path_factory):
    return tiny_models.build_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def llava_next_path(tmp_path_factory):
    return tiny_models.build_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def model_paths(llava_path, llava_next_path):
    return {"llava": llava_path, "llava-next": llava_next_path}


@pytest.fixture(scope="session")
def images():
    """Two small images of different sizes and colours, so LLaVA-NeXT tiles them differently."""
    first = Image.new("RGB", (40, 30), (200, 30, 30))
    first.paste((30, 30, 200), (0, 0, 20, 10))
    second = Image.new("RGB", (20, 50), (20, 160, 40))
    return [first, second]


@pytest.fixture
def image_file(tmp_path, images):
    path = tmp_path / "picture.png"
    images[0].save(path)
    return path
