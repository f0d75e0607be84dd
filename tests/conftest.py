"""Shared fixtures: the tiny models (built from configs, saved and loaded through the real path),
small images, the `asap` fixture that runs the CLI in-process, and the CUDA marker's skip."""

import importlib.util
import os
import signal
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import tiny_models
import torch
from PIL import Image
from typer.testing import CliRunner

from asapcli.runtime import loading

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where PyTorch sees no CUDA GPU. A run that asks for the lmms-eval
    tests (`-m lmms_eval`) where lmms-eval is missing fails instead of passing on skipped tests."""
    if config.option.markexpr == "lmms_eval" and importlib.util.find_spec("lmms_eval") is None:
        raise pytest.UsageError('-m lmms_eval runs lmms-eval\'s CLI: pip install -e ".[test,eval]" first')
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def asap():
    """Run the CLI in-process: `asap("run", image, "what?", "--json")` -> click's Result (exit_code,
    stdout and stderr apart); arguments are turned into strings, `input` feeds stdin, other keywords
    (env) go to click's runner."""
    from asapcli.cli import app

    runner = CliRunner()

    def invoke(*args, input: str | None = None, **options):
        handler = signal.getsignal(signal.SIGINT)
        try:
            return runner.invoke(app, [str(arg) for arg in args], input=input, **options)
        finally:  # an interrupted eval ignores Ctrl-C until its process ends; this one goes on
            signal.signal(signal.SIGINT, handler)

    return invoke


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


@pytest.fixture(scope="session", autouse=True)
def checkpoints_read_once():
    """The CLI tests load their models through loading.load, the real path; the checkpoints of
    one unchanged folder are read from disk once per session and the model shared (load() still
    checks it and installs the engine each time); hub ids, placements other than the CPU and
    changed folders are read afresh. transformers' own from_pretrained, which the tests'
    reference models use, reads afresh too."""
    read, cache = loading.read_checkpoint, {}

    def read_once(source, dtype, local_only=False, device_map="cpu"):
        folder = Path(source)
        if device_map != "cpu" or not folder.is_dir():
            return read(source, dtype, local_only, device_map)
        files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file())
        key = (str(folder.resolve()), dtype, files)
        if key not in cache:
            cache[key] = read(source, dtype, local_only, device_map)
        return cache[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(loading, "read_checkpoint", read_once)
    yield
    patch.undo()
