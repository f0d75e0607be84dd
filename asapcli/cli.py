"""The `asap` command: a thin Typer app that dispatches to asapcli.commands."""

from __future__ import annotations

import functools
import os
from typing import Annotated

import typer

from .commands import chat, compare, env, eval, flops, models, profile, run
from .errors import UsageError, describe
from .report import display

# Typer vendors click (typer._click): its UsageError is the base of typer.BadParameter.
_ParseError = typer.BadParameter.__bases__[0]


class _Group(typer.core.TyperGroup):
    """The app: a mistake on the command line is one `Error:` line (exit 2), as every other error
    is, without click's usage lines before it (--help shows those)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _ParseError as error:
            error.ctx = None
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _ParseError as error:
            error.ctx = None
            raise


app = typer.Typer(
    cls=_Group,
    name="asap",
    help="Prune the visual tokens of vision-language models with ASAP, and measure what it saves.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    rich_markup_mode=None,  # plain usage errors: one "Error:" line, scriptable
    pretty_exceptions_enable=False,
)


def user_errors(command):
    """Print one `Error:` line and exit non-zero instead of a traceback; ASAP_DEBUG=1 re-raises."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:  # Ctrl-C outside the places that handle it (loading, say)
            display.error("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `asap ... | head`: the reader has what it wanted
            display.end_on_broken_pipe()
        except Exception as error:
            if os.environ.get("ASAP_DEBUG") == "1":
                raise
            display.error(describe(error))
            raise typer.Exit(2 if isinstance(error, UsageError) else 1) from None

    return guarded


class _Command(typer.core.TyperCommand):
    """A command whose help names each argument by its metavar alone: Typer appends the Python
    type (`IMAGE... PROMPT <list[str]>`), which says nothing to a user."""

    def format_options(self, ctx, formatter) -> None:
        records = [(param, param.get_help_record(ctx)) for param in self.get_params(ctx)]
        arguments = [(param.metavar or param.name.upper(), record[1]) for param, record in records
                     if record is not None and param.param_type_name == "argument"]  # fmt: skip
        options = [record for param, record in records if record is not None and param.param_type_name == "option"]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def collect_usage_pieces(self, ctx) -> list[str]:
        arguments = [param for param in self.get_params(ctx) if param.param_type_name == "argument"]
        return ["[OPTIONS]", *(param.metavar if param.required else f"[{param.metavar}]" for param in arguments)]


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        display.write(f"asap {__version__}\n")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Prune the visual tokens of vision-language models with ASAP, and measure what it saves."""


app.command("run", cls=_Command)(user_errors(run.run))
app.command("compare", cls=_Command)(user_errors(compare.compare))
app.command("chat", cls=_Command)(user_errors(chat.chat))
app.command("flops", cls=_Command)(user_errors(flops.flops_command))
app.command("profile", cls=_Command)(user_errors(profile.profile))
app.command("eval", cls=_Command)(user_errors(eval.eval_command))
app.command("env", cls=_Command)(user_errors(env.env_command))
app.command("models", cls=_Command)(user_errors(models.models_command))
