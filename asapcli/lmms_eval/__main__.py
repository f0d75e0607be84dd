"""`python -m asapcli.lmms_eval ...`: lmms-eval's own command line (`python -m lmms_eval`, the same
options) with the model `asap` registered and the task folder of `asap_demo` included. Unlike
lmms-eval, it exits 1 when lmms-eval reports that a run failed or had no task (lmms-eval logs the
error and exits 0), and 2 with one Error line when the command line is wrong in a way that can be
told before lmms-eval starts (it would print its traceback first, or fail after the run): the
model `asap`'s --model_args and --gen_kwargs (each key once, `key=value` pairs, values asap
takes, a device and dtype it can load on, no beam search), the same inside a --config, --batch_size,
a --config that is not YAML, an --output_path that cannot be written. Ctrl-C ends it with one line and status 130."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import AsapError, UsageError, first_line, whole_number
from . import TASKS


def main() -> int:
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from loguru import logger

    from .plugin import MANIFEST

    try:
        _check_command_line(sys.argv[1:])
    except AsapError as error:  # a usage error, or one of the machine's (no CUDA GPU for device=cuda)
        sys.stderr.write(f"Error: {error}\n")
        return 2 if isinstance(error, UsageError) else 1
    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)  # a checkout on PYTHONPATH has no entry point
    failures: list[str] = []
    logger.configure(patcher=lambda record: _note_failure(record, failures))  # survives lmms-eval's logger.remove()
    try:
        cli_evaluate(argparse.Namespace(include_path=_include_path(sys.argv[1:])))
    except SystemExit as end:  # lmms-eval ends some runs with sys.exit(), 0 even after an error
        if end.code not in (None, 0):
            raise
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        return 130
    for failure in failures:
        sys.stderr.write(f"Error: {failure}\n")
    return 1 if failures else 0


# How lmms-eval 0.7's command line logs a run it gave up: an evaluation it caught failing, or no task.
FAILED = "Error during evaluation: "
NO_TASK = "Need to specify task to evaluate."


# lmms-eval's tracker warns, logs the exception's repr at INFO, and goes on to exit 0 (a full disk).
NOT_SAVED, TRACKER = "Could not save ", "lmms_eval.loggers.evaluation_tracker"


def _note_failure(record, failures: list[str]) -> None:
    message, level, name = record["message"], record["level"].name, record["name"]
    if name == TRACKER:
        if level == "WARNING" and message.startswith(NOT_SAVED):
            failures.append(f"lmms-eval could not save the {message.removeprefix(NOT_SAVED)} under --output_path")
        elif level == "INFO" and failures and failures[-1].endswith("under --output_path"):
            failures[-1] += f" ({message})"  # the exception, logged right after
        return
    if level not in ("ERROR", "CRITICAL") or name != "lmms_eval.__main__":
        return
    if message.startswith(FAILED):
        failures.append(message.removeprefix(FAILED).split(". Please set `--verbosity=DEBUG`")[0])
    elif message == NO_TASK:
        failures.append("no task given: --tasks NAME[,NAME...]")


def _check_command_line(argv: list[str]) -> None:
    """What can be told wrong before lmms-eval starts; a UsageError naming it."""
    parser = argparse.ArgumentParser(add_help=False)
    for option in ("--model", "--model_args", "--batch_size", "--config", "--output_path", "--gen_kwargs"):
        parser.add_argument(option, default=None)
    given = parser.parse_known_args(argv)[0]
    if given.model == "asap":
        _check_model_args(given.model_args or "")
        _check_gen_kwargs(given.gen_kwargs or "")
    if given.batch_size is not None and not given.batch_size.startswith("auto"):
        whole_number(given.batch_size, "--batch_size", 1)
    if given.config is not None:
        _check_config(given.config)
    if given.output_path is not None:
        _check_writable_folder(given.output_path)


def _check_model_args(text: str) -> None:
    """The asap model's --model_args, parsed as lmms-eval parses them and checked as the model
    checks them on creation (what needs the model, such as the layer's upper bound, is checked
    then), the device and dtype included."""
    from lmms_eval.utils import simple_parse_args_string

    from ..runtime.loading import check_available, resolve_device, resolve_device_map, resolve_dtype
    from .arguments import ModelArgs

    if text.lstrip().startswith("{"):
        raise UsageError("model_args: write key=value pairs separated by commas (pretrained=demo,k=64), not JSON")
    keys = [item.partition("=")[0].strip() for item in text.split(",") if item.strip()]
    if any(not key for key in keys) or any("=" not in item for item in text.split(",") if item.strip()):
        raise UsageError(f"model_args: {text!r}: each item is key=value (pretrained=demo,k=64)")
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise UsageError(f"model_args: {', '.join(twice)} given more than once; give each once")
    args = ModelArgs.parse(simple_parse_args_string(text))
    try:
        resolve_device_map(args.device_map, args.device)
        resolve_dtype(args.dtype, resolve_device(args.device))
    except AsapError as error:  # worded for asap's options: named here as the model_args they are
        message = str(error).replace("--device-map", "device_map").replace("--device ", "device=")
        raise type(error)(f"model_args: {message}") from None
    check_available(args.pretrained)  # lmms-eval would print its traceback of the load first


def _check_gen_kwargs(text: str) -> None:
    """--gen_kwargs as lmms-eval parses them: what the asap model refuses once the run has begun."""
    from lmms_eval.utils import simple_parse_args_string

    options = simple_parse_args_string(text) if text.strip() else {}
    beams = options.get("num_beams", 1)
    if not isinstance(beams, int) or isinstance(beams, bool) or beams > 1:
        raise UsageError(
            f"--gen_kwargs num_beams={beams}: the asap model decodes greedily or by sampling; beam search is not supported"
        )


def _check_config(path: str) -> None:
    """A YAML file lmms-eval can read, and the asap model's arguments in it, checked as on the command line."""
    import yaml

    try:
        runs = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path}: not a YAML file lmms-eval can read ({first_line(error)})") from None
    for run in runs if isinstance(runs, list) else [runs]:  # lmms-eval takes one run's options, or a list of them
        if isinstance(run, dict) and run.get("model") == "asap":
            model_args = run.get("model_args") or ""
            if isinstance(model_args, dict):
                model_args = ",".join(f"{key}={value}" for key, value in model_args.items())
            try:
                _check_model_args(str(model_args))
                _check_gen_kwargs(str(run.get("gen_kwargs") or ""))
            except AsapError as error:
                raise type(error)(f"--config {path}: {error}") from None


def _check_writable_folder(path: str) -> None:
    """lmms-eval writes its results under --output_path at the end of the run, and exits 0 when it
    cannot: a folder to create or to write into, checked first."""
    folder = Path(path).expanduser()
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise UsageError(f"--output_path {path}: {existing} is not a folder; results are written into a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_path {path}: {existing} is not writable")


def _include_path(argv: list[str]) -> list[str]:
    """The user's --include_path, if any, and the folder of asap's tasks."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--include_path", default=None)
    given = parser.parse_known_args(argv)[0].include_path
    return [*([given] if given else []), str(TASKS)]


if __name__ == "__main__":
    sys.exit(main())
