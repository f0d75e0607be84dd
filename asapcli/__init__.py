"""asap: Attention-Shift-Aware Pruning of visual tokens for transformers LVLMs."""

__version__ = "0.1.0"


def main() -> None:
    """The `asap` command. Its libraries take seconds to import: Ctrl-C meanwhile ends it as it
    does later, with one line and exit status 130, never a traceback."""
    import sys

    if sys.stdout is None:  # started with stdout closed (`asap ... >&-`): nowhere to answer
        if sys.stderr is not None:
            sys.stderr.write(
                "Error: standard output is closed; asap writes its results there (>/dev/null discards them)\n"
            )
        raise SystemExit(1)
    for stream in (sys.stdout, sys.stderr):  # PYTHONIOENCODING=ascii: '±' or '─' as '?', not an error at the end
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        from .cli import app
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(130) from None
    try:
        app()
    except (
        OSError
    ) as error:  # the commands report their own; this is typer's --install-completion writing a shell's file
        where = f"cannot write {error.filename}: " if error.filename else ""
        sys.stderr.write(f"Error: {where}{error.strerror or error}\n")
        raise SystemExit(1) from None
    except (KeyError, ValueError) as error:  # a shell calling completion with COMP_WORDS/COMP_CWORD missing or bad
        import os

        if not any(name.endswith("_COMPLETE") for name in os.environ):
            raise
        sys.stderr.write(f"Error: shell completion needs COMP_WORDS and a whole-number COMP_CWORD ({error})\n")
        raise SystemExit(1) from None


def __getattr__(name: str):
    # `asapcli.pruned`, `load` and `generate` without importing torch and transformers until it is used (the CLI's
    # start-up does not need them).
    if name in ("pruned", "load", "generate", "SequenceCache"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'asapcli' has no attribute {name!r}")
