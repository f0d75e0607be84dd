"""`python -m asapcli.lmms_eval ...`: lmms-eval's own command line (`python -m lmms_eval`, the same
options) with the model `asap` registered and the task folder of `asap_demo` included. Unlike
lmms-eval, it exits 1 when lmms-eval reports that a run failed or had no task (lmms-eval logs the
error and exits 0), and 2 with one Error line when the model `asap`'s --model_args are wrong,
checked before lmms-eval starts (it would print its traceback first)."""

from __future__ import annotations

import argparse
import sys

from . import TASKS


def main() -> int:
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from loguru import logger

    from ..errors import UsageError
    from .plugin import MANIFEST

    try:
        _check_model_args(sys.argv[1:])
    except UsageError as error:
        sys.stderr.write(f"Error: {error}\n")
        return 2
    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)  # a checkout on PYTHONPATH has no entry point
    failures: list[str] = []
    logger.configure(patcher=lambda record: _note_failure(record, failures))  # survives lmms-eval's logger.remove()
    try:
        cli_evaluate(argparse.Namespace(include_path=_include_path(sys.argv[1:])))
    except SystemExit as end:  # lmms-eval ends some runs with sys.exit(), 0 even after an error
        if end.code not in (None, 0):
            raise
    for failure in failures:
        sys.stderr.write(f"Error: {failure}\n")
    return 1 if failures else 0


# How lmms-eval 0.7's command line logs a run it gave up: an evaluation it caught failing, or no task.
FAILED = "Error during evaluation: "
NO_TASK = "Need to specify task to evaluate."


def _note_failure(record, failures: list[str]) -> None:
    message = record["message"]
    if record["level"].name not in ("ERROR", "CRITICAL") or record["name"] != "lmms_eval.__main__":
        return
    if message.startswith(FAILED):
        failures.append(message.removeprefix(FAILED).split(". Please set `--verbosity=DEBUG`")[0])
    elif message == NO_TASK:
        failures.append("no task given: --tasks NAME[,NAME...]")


def _check_model_args(argv: list[str]) -> None:
    """The asap model's --model_args, parsed as lmms-eval parses them and checked as the model
    checks them on creation (what needs the model, such as the layer's upper bound, is checked
    then)."""
    from lmms_eval.utils import simple_parse_args_string

    from .arguments import ModelArgs

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--model_args", default="")
    given = parser.parse_known_args(argv)[0]
    if given.model == "asap":
        ModelArgs.parse(simple_parse_args_string(given.model_args or ""))


def _include_path(argv: list[str]) -> list[str]:
    """The user's --include_path, if any, and the folder of asap's tasks."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--include_path", default=None)
    given = parser.parse_known_args(argv)[0].include_path
    return [*([given] if given else []), str(TASKS)]


if __name__ == "__main__":
    sys.exit(main())
