"""What a result was measured on (versions, device, threads, date), for bug reports (`asap env`)
and for the records that carry it, as lmms-eval's results.json does."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform

from ..records import Environment


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str | None = None, dtype: str | None = None) -> Environment:
    """This process's environment; `device` and `dtype` those of the model a result came from (None:
    where none was loaded, as for `asap env`, which names the device a model would load on)."""
    import torch

    from .. import __version__

    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    on_gpu = device.startswith("cuda")
    return Environment(
        asap=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=_version("transformers"),
        lmms_eval=_version("lmms_eval"),
        platform=platform.platform(),
        device=device,
        gpu=torch.cuda.get_device_name(torch.device(device)) if on_gpu and cuda else None,
        cuda=torch.version.cuda if cuda else None,
        dtype=dtype,
        threads=None if on_gpu else torch.get_num_threads(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
