"""Loading as big models are loaded: weights read in their target dtype straight onto the device,
or spread by accelerate (`--device-map`), whose per-layer hooks the pruned decoder must follow."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import pruned_by

from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.generation import generate
from asapcli.runtime.inputs import build_inputs, load_image, user_message
from asapcli.runtime.loading import load

CAR = Path(__file__).parent.parent / "examples" / "car.png"


@pytest.fixture(scope="module")
def offload_map(tmp_path_factory) -> Path:
    """The demo model with its middle decoder layers offloaded to disk: accelerate loads their
    weights in a hook before each call, as it does for a model larger than the devices."""
    decoder = "model.language_model"
    placement = {
        "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu",
        f"{decoder}.embed_tokens": "cpu", f"{decoder}.layers.0": "cpu", f"{decoder}.layers.1": "disk",
        f"{decoder}.layers.2": "disk", f"{decoder}.layers.3": "cpu", f"{decoder}.norm": "cpu",
        f"{decoder}.rotary_emb": "cpu",
    }  # fmt: skip
    path = tmp_path_factory.mktemp("device-map") / "offload.json"
    path.write_text(json.dumps(placement))
    return path


@pytest.mark.parametrize("method", ["vanilla", "fastv", "asap", "divprune"])
def test_layers_offloaded_by_accelerate_give_the_plain_models_logits_and_tokens(method, offload_map):
    plain, sharded = load("demo", device="cpu"), load("demo", device_map=str(offload_map))
    assert hasattr(sharded.decoder.decoder.layers[1], "_hf_hook")  # accelerate's hook is really there
    inputs = build_inputs(plain.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    logits, answers = [], []
    for lvlm in (plain, sharded):
        plan = plan_for(lvlm, inputs["input_ids"][0], PruneSettings(method, k=128))
        with torch.inference_mode(), pruned_by(lvlm.model, plan):
            logits.append(lvlm.model(**inputs).logits)
        answers.append(generate(lvlm, inputs, PruneSettings(method, k=128)))
    assert torch.equal(logits[0], logits[1])
    assert answers[0].token_ids == answers[1].token_ids and answers[0].kept_positions == answers[1].kept_positions


def test_device_map_through_the_cli(offload_map, asap):
    args = ["run", str(CAR), "what colour is the car?", "--json", "--max-tokens", "3"]
    plain, sharded = asap(*args), asap(*args, "--device-map", offload_map)
    assert plain.exit_code == sharded.exit_code == 0, sharded.output
    assert json.loads(sharded.stdout)["answer"] == json.loads(plain.stdout)["answer"] == "red"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device-map", "everywhere"], "--device-map takes auto, balanced, balanced_low_0, sequential or a JSON"),
        (["--device-map", "auto", "--device", "cpu"], "--device-map places the model itself"),
        (["--device-map", "auto", "-m", "bench"], "is built from numbers on one device"),
    ],
)
def test_device_map_usage_errors(extra, message, asap):
    result = asap("run", CAR, "hi", *extra)
    assert result.exit_code == 2 and message in result.stderr


def test_a_device_map_with_every_module_on_disk_is_refused(tmp_path, asap):
    placement = tmp_path / "disk.json"
    placement.write_text(json.dumps({"": "disk"}))  # accelerate would leave nothing to compute on
    result = asap("run", CAR, "hi", "--device-map", placement)
    assert result.exit_code == 2
    assert f"Error: --device-map {placement} puts every module on disk" in result.stderr


def test_a_truncated_weights_file_is_named(llava_path, tmp_path, asap):
    damaged = tmp_path / "damaged"
    shutil.copytree(llava_path, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    result = asap("run", CAR, "hi", "-m", damaged)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot load model {str(damaged)!r}: {weights} is damaged or incomplete")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_closed_standard_output_is_one_error_line():
    closed = subprocess.run(  # `asap --version >&-`: Python starts with sys.stdout None
        [sys.executable, "-c", "import asapcli; asapcli.main()", "--version"],
        preexec_fn=lambda: os.close(1), capture_output=False, stderr=subprocess.PIPE, check=False,
    )  # fmt: skip
    assert closed.returncode == 1
    assert (
        closed.stderr.decode()
        == "Error: standard output is closed; asap writes its results there (>/dev/null discards them)\n"
    )


PEAK_SCRIPT = """
import resource, torch, transformers
from asapcli.runtime.loading import load
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lvlm = load("bench", device="cpu", dtype="bfloat16")
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
weights = sum(p.numel() * p.element_size() for p in lvlm.model.parameters())
print(grown / weights, {str(p.dtype) for p in lvlm.model.parameters()})
"""


def test_random_weights_are_made_in_the_target_dtype_with_no_float32_copy():
    """bench in bfloat16 (197 MiB of weights): building in float32 and converting peaked at
    about twice the weights in host memory; made in bfloat16 it stays near one weights' worth."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    ratio, dtypes = result.stdout.split(" ", 1)
    assert dtypes.strip() == "{'torch.bfloat16'}"
    assert float(ratio) < 1.5


@pytest.mark.parametrize(("ending", "status"), [("terminate", 143), ("hangup", 129)])
def test_sigterm_and_sighup_remove_the_offload_folder(offload_map, tmp_path, ending, status):
    """What `timeout`, a job scheduler or CI sends, or a closed terminal: the offloaded weights go
    with the process (five folders were left by one interrupted test run)."""
    script = (
        "import sys, time; from asapcli.runtime.loading import load\n"
        f"load('demo', device_map={str(offload_map)!r}); print('loaded', flush=True); time.sleep(60)\n"
    )
    environment = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=environment)
    try:
        assert process.stdout.readline().strip() == "loaded"
        assert [path.name[:13] for path in tmp_path.iterdir()] == ["asap-offload-"]
        process.send_signal(signal.SIGTERM if ending == "terminate" else signal.SIGHUP)
        assert process.wait(timeout=60) == status
    finally:
        process.kill()
    assert list(tmp_path.iterdir()) == []
