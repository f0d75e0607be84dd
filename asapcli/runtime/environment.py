"""What a result was measured on (versions, device, threads, date), for bug reports (`asap env`)
and for the records that carry it, as lmms-eval's results.json does."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import platform

from .. import __version__
from ..records import Environment
from . import machine


@functools.cache  # asked for each answer of a long eval: the packages do not change meanwhile
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_device() -> str:
    """The device a model loads on unless told (--device auto)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def environment(device: str | None = None, dtype: str | None = None) -> Environment:
    """This process's environment; `device` and `dtype` those of the model a result came from.
    None: no model ran (asap flops counts numbers): then neither is PyTorch imported, nor its
    threads or GPU reported."""
    on_gpu = device is not None and device.startswith("cuda")
    if device is not None:
        import torch
    return Environment(
        asap=__version__,
        python=platform.python_version(),
        torch=_version("torch"),
        transformers=_version("transformers"),
        lmms_eval=_version("lmms_eval"),
        platform=platform.platform(),
        device=device,
        gpu=torch.cuda.get_device_name(torch.device(device)) if on_gpu else None,
        cuda=torch.version.cuda if on_gpu else None,
        dtype=dtype,
        threads=torch.get_num_threads() if device is not None and not on_gpu else None,
        cpus_available=machine.available_cpus(),
        cpu_model=machine.cpu_model(),
        load_average=_rounded(machine.load_average()),
        gpu_driver=machine.gpu_driver() if on_gpu else None,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def _rounded(load: float | None) -> float | None:
    return None if load is None else round(load, 2)
