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
import json
import os
import sys
import time
from pathlib import Path

from ..engine.methods.hyperparameters import in_keywords
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
    started = time.time()
    try:
        cli_evaluate(argparse.Namespace(include_path=_include_path(sys.argv[1:])))
    except SystemExit as end:  # lmms-eval ends some runs with sys.exit(), 0 even after an error
        if end.code not in (None, 0):
            raise
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        return 130
    if not failures:
        failures += _unreadable_results(sys.argv[1:], started)
    for failure in failures:
        sys.stderr.write(f"Error: {failure}\n")
    return 1 if failures else 0


def _unreadable_results(argv: list[str], started: float) -> list[str]:
    """lmms-eval writes its results file unclosed, so a full disk leaves it empty without a word
    (and exit 0): the --output_path's results of this run, read back."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", default=None)
    output = parser.parse_known_args(argv)[0].output_path
    # predictions only: no results file; data parallel: rank 0 alone writes it
    if output is None or "--predict_only" in argv or os.environ.get("RANK", "0") != "0":
        return []
    written = [path for path in Path(output).expanduser().rglob("*_results.json") if path.stat().st_mtime >= started]
    for path in written:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            return [f"lmms-eval's results file {path} is empty or cut (a full disk?); the run's results are lost"]
    return [] if written else [f"lmms-eval wrote no results file under --output_path {output}"]


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


RUN_KEYS = ("model", "model_args", "gen_kwargs")  # what the asap model's checks read of a run


def _check_command_line(argv: list[str]) -> None:
    """What can be told wrong before lmms-eval starts; a UsageError naming it. Each run is checked
    as lmms-eval will make it: a --config's run, with what the command line gives explicitly
    written over it (lmms-eval's rule)."""
    parser = argparse.ArgumentParser(add_help=False)
    for option in ("--model", "--model_args", "--batch_size", "--config", "--output_path", "--gen_kwargs"):
        parser.add_argument(option, default=None)
    given = parser.parse_known_args(argv)[0]
    explicit = {key: getattr(given, key) for key in RUN_KEYS if getattr(given, key) is not None}
    runs = [{}] if given.config is None else _config_runs(given.config)
    for run in runs:
        where = {key: f"--config {given.config}: " for key in run}
        where |= dict.fromkeys(explicit, "")
        run = {**run, **explicit}
        if run.get("model") == "asap":
            _check_asap_run(run, where)
    if given.batch_size is not None and not given.batch_size.startswith("auto"):
        whole_number(given.batch_size, "--batch_size", 1)
    if given.output_path is not None:
        _check_writable_folder(given.output_path)


def _check_asap_run(run: dict, where: dict) -> None:
    """The asap model's model_args and gen_kwargs of one run; `where` says where each came from."""
    for key, check in (("model_args", _check_model_args), ("gen_kwargs", _check_gen_kwargs)):
        value = run.get(key) or ""
        try:
            if not isinstance(value, str):  # lmms-eval 0.7 calls .strip() on it: a traceback mid-run
                raise UsageError(f"{key} must be key=value text (pretrained=demo,k=64), got {type(value).__name__}")
            check(value)
        except AsapError as error:
            raise type(error)(f"{where.get(key, '')}{error}") from None


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
    try:
        args = ModelArgs.parse(simple_parse_args_string(text))
    except UsageError as error:  # the settings' words, named as the model_args they came from
        message = in_keywords(str(error))
        raise UsageError(message if message.startswith("model_args") else f"model_args: {message}") from None
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
    if not isinstance(beams, int) or isinstance(beams, bool) or beams < 1:
        raise UsageError(f"gen_kwargs num_beams needs a whole number of at least 1, got {beams!r}")
    if beams > 1:
        raise UsageError(
            f"gen_kwargs num_beams={beams}: the asap model decodes greedily or by sampling; beam search is not supported"
        )


def _config_runs(path: str) -> list[dict]:
    """The runs of a --config, a YAML file lmms-eval can read: its options of one run, or a list of them."""
    import yaml

    try:
        runs = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path}: not a YAML file lmms-eval can read ({first_line(error)})") from None
    runs = runs if isinstance(runs, list) else [runs]
    return [{key: run[key] for key in RUN_KEYS if key in run} for run in runs if isinstance(run, dict)]


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
