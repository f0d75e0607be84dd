"""load() -> Loaded: a transformers LVLM and its processor, with the pruned decoder installed."""

from __future__ import annotations

import atexit
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from ..engine import PrunedDecoder, install
from ..errors import AsapError, UsageError, first_line
from ..records import Environment
from .environment import environment
from .presets import Preset, find_preset, model_label, preset_names, resolve_source
from .random_model import build_from_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Loaded:
    model: PreTrainedModel
    processor: ProcessorMixin
    decoder: PrunedDecoder
    name: str
    preset: Preset | None
    warm: bool = False  # a generation has run: later ones no longer pay one-time warm-up costs
    random_weights: bool = False  # built from the preset's [config]: figures of cost only, answers are noise
    full_layers: int | None = None  # the model's own decoder layers, when --layers built fewer

    @property
    def label(self) -> str:
        """The model's name, with what tells its figures from a checkpoint's: random weights, and
        the layers it was cut to."""
        return model_label(self.name, self.random_weights, self.num_layers, self.full_layers)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def text_config(self):
        """The language model's config (layers, hidden size, context length, ...)."""
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def environment(self) -> Environment:
        """What its results are measured with: versions, its device and dtype, threads, now."""
        return environment(str(self.device), str(self.model.dtype).removeprefix("torch."))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AsapError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision is what LVLMs are served in on a GPU; CPU kernels are fastest in float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# accelerate's placement strategies over every visible GPU (then CPU, then disk).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    random_weights: bool = False,
    layers: int | None = None,
) -> Loaded:
    """The model in `dtype`, its weights read straight onto `device` (no float32 copy on the
    host first), or spread by accelerate as `device_map` says: a strategy of DEVICE_MAPS or a
    JSON file mapping module names to "cuda:N", "cpu" or "disk". `random_weights`: a preset's
    architecture built with random weights (see build_random), its language model cut to its
    first `layers` decoder layers when given."""
    source, preset = resolve_source(model)
    placement = resolve_device_map(device_map, device)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    random_weights = random_weights or (preset is not None and preset.random_weights)
    if layers is not None and not random_weights:
        raise UsageError("--layers cuts a model built with --random-weights; a checkpoint loads whole")
    if random_weights:
        if device_map is not None:
            raise UsageError(f"{model!r} is built from numbers on one device; --device-map is for checkpoints")
        return build_random(model, preset, torch_dtype, target, layers)
    if source is None:
        raise AsapError(
            f"preset {model!r} gives architecture numbers only (for asap flops); time its shape with "
            f"--random-weights, or name a transformers-format model folder or hub id to run it ({NAMING})"
        )
    try:
        local_only = Path(source).is_dir() or _from_cache_only(source)
        lvlm, processor = read_checkpoint(
            source, torch_dtype, local_only=local_only, device_map=placement or str(target)
        )
    except ImportError as error:  # a processor that needs a package not installed (torchvision)
        raise _missing_package(model, error) from error
    except (OSError, ValueError, KeyError) as error:
        raise AsapError(f"cannot load model {model!r}: {first_line(error)}") from error
    except SafetensorError as error:  # a weights file cut short (an interrupted download) or overwritten
        raise AsapError(
            f"cannot load model {model!r}: {_damaged_weights(source) or 'a weights file'} is damaged or incomplete "
            f"({first_line(error)}); download or copy it again"
        ) from error
    return prepare(lvlm, processor, model, preset)


def _damaged_weights(source: str) -> str | None:
    """The first .safetensors file of a local folder that does not open, or None."""
    folder = Path(source).expanduser()
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(path, "pt"):
                pass
        except SafetensorError:
            return str(path)
    return None


def read_checkpoint(
    source: str, dtype: torch.dtype, local_only: bool = False, device_map: str | dict = "cpu"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A transformers checkpoint (folder or hub id) as from_pretrained reads it, in `dtype`,
    placed by `device_map`; `local_only`: from a folder or the local cache, never the network."""
    offload = {"offload_folder": _offload_folder()} if isinstance(device_map, dict) or device_map in DEVICE_MAPS else {}
    return (
        AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, local_files_only=local_only, device_map=device_map, **offload
        ),
        AutoProcessor.from_pretrained(source, local_files_only=local_only),
    )


def resolve_device_map(device_map: str | None, device: str) -> str | dict | None:
    if device_map is None:
        return None
    if device != "auto":
        raise UsageError("--device-map places the model itself; leave --device at auto")
    if device_map in DEVICE_MAPS:
        return device_map
    path = Path(device_map).expanduser()
    if not path.is_file():
        raise UsageError(
            f"--device-map takes {', '.join(DEVICE_MAPS)} or a JSON file of module -> device; got {device_map!r}"
        )
    try:
        placement = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--device-map {device_map}: not a JSON object of module -> device ({error})") from None
    if not isinstance(placement, dict) or not all(isinstance(v, str | int) for v in placement.values()):
        raise UsageError(f"--device-map {device_map}: not a JSON object of module -> device")
    if placement and all(value == "disk" for value in placement.values()):
        raise UsageError(
            f"--device-map {device_map} puts every module on disk: at least one must sit on a GPU or the CPU, "
            "where the disk's weights are brought to compute"
        )
    return placement


def _exit_on_sigterm() -> None:
    """SIGTERM (what `timeout`, a job scheduler and CI send) and SIGHUP (a closed terminal) end
    Python without its atexit hooks, leaving an offloaded model's folder (gigabytes) behind; as an
    exit (status 143, 129) they run them.
    Only in the main thread, and only where nobody set a handler of their own."""
    if threading.current_thread() is not threading.main_thread():
        return
    for ending in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal was closed
        if signal.getsignal(ending) == signal.SIG_DFL:
            signal.signal(ending, lambda number, frame: sys.exit(128 + number))


def _offload_folder() -> str:
    """Where accelerate keeps the weights it offloads to disk: removed when the process ends, by
    an exit, Ctrl-C or SIGTERM."""
    folder = tempfile.mkdtemp(prefix="asap-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _exit_on_sigterm()
    return folder


HUB_PROBE_SECONDS = 3.0
NAMING = "-m FOLDER; pretrained=FOLDER under lmms-eval"  # where a user names the model, CLI or plugin


def check_available(model: str) -> None:
    """What load() would refuse about where `model` comes from, told before anything else starts
    (lmms-eval's run): an unknown preset or folder, a hub model neither cached nor reachable."""
    source, _ = resolve_source(model)
    if source is not None and not Path(source).is_dir():
        _from_cache_only(source)


def _from_cache_only(hub_id: str) -> bool:
    """Whether hub model `hub_id` must come from the local cache: the hub is switched off
    (HF_HUB_OFFLINE) or out of reach. Refuses at once, saying what to do, when the model is not
    cached then (the hub client would otherwise retry for minutes before failing)."""
    cached = isinstance(huggingface_hub.try_to_load_from_cache(hub_id, "config.json"), str)
    if huggingface_hub.is_offline_mode():
        if not cached:
            raise AsapError(
                f"model {hub_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"unset it to download the model, or name a local model folder instead ({NAMING})"
            )
        return True
    if _hub_reachable(hub_id):
        return False
    if not cached:
        raise AsapError(
            f"cannot reach {huggingface_hub.constants.ENDPOINT} to download {hub_id!r} (no network?); "
            f"name a local model folder instead ({NAMING}; a model already in the Hugging Face cache loads "
            "without the network, and HF_HUB_OFFLINE=1 says so up front)"
        )
    return True


def _hub_reachable(hub_id: str) -> bool:
    """Whether the hub answers about `hub_id` within HUB_PROBE_SECONDS: huggingface_hub's own
    request (its endpoint, token and proxies), once, where its download would retry for minutes."""
    try:
        huggingface_hub.HfApi(endpoint=huggingface_hub.constants.ENDPOINT).model_info(hub_id, timeout=HUB_PROBE_SECONDS)
    except huggingface_hub.errors.HfHubHTTPError:
        return True  # it answered: a missing or gated model is for the download itself to say
    except (huggingface_hub.utils.httpx.HTTPError, OSError):  # its client's: no network, no name, a timeout
        return False
    return True


def prepare(lvlm: PreTrainedModel, processor, name: str, preset: Preset | None = None) -> Loaded:
    """An LVLM and its processor, checked and with the pruned decoder installed."""
    if getattr(lvlm.config, "image_token_id", None) is None:
        raise AsapError(f"model {name!r} has no image_token_id in its config: asap prunes image tokens only")
    lvlm = lvlm.eval()
    decoder = install(lvlm)
    return Loaded(model=lvlm, processor=processor, decoder=decoder, name=name, preset=preset)


def build_random(
    model: str, preset: Preset | None, dtype: torch.dtype, device: torch.device, layers: int | None = None
) -> Loaded:
    """A preset's architecture (its [config] table) with random weights, made in `dtype` on
    `device`, its language model cut to its first `layers` decoder layers when given: the
    paper's shapes timed with no checkpoint."""
    if preset is None:
        raise UsageError(
            f"--random-weights builds a preset's architecture (see profiles/); {model!r} is a folder or hub id, "
            "whose weights load as they are"
        )
    if preset.config is None:
        buildable = [name for name in preset_names() if find_preset(name).config is not None]
        raise UsageError(
            f"preset {model!r} has no [config] table to build its architecture from; "
            f"--random-weights takes {', '.join(buildable)}"
        )
    full = preset.config["text_config"]["num_hidden_layers"]
    if layers is not None and not 1 <= layers <= full:
        raise UsageError(f"--layers must be in 1..{full} for {model!r} ({full} decoder layers), got {layers}")
    try:
        lvlm, processor = build_from_config(preset.config, preset.processor, dtype=dtype, device=device, layers=layers)
    except ImportError as error:
        raise _missing_package(model, error) from error
    loaded = prepare(lvlm, processor, model, preset)
    loaded.random_weights, loaded.full_layers = True, full
    return loaded


def _missing_package(model: str, error: ImportError) -> AsapError:
    """A processor that needs a package not installed (torchvision), said in one line."""
    package = re.search(r"requires the (\w+) library", str(error))
    name = package.group(1).lower() if package else first_line(error)
    return AsapError(
        f"cannot load model {model!r}: its processor needs {name}, which is not installed; "
        f'pip install {name} (for Qwen2.5-VL and InternVL: pip install "asapcli[torchvision]")'
    )
