"""asap chat [IMAGE]: a multi-turn conversation on one pruned KV cache.

On a terminal it prompts with '> ' and streams answers; Ctrl-C stops an answer and keeps the
session, Ctrl-D exits. Piped, it reads one user turn (or /command) per line and prints answers
plainly, or one JSON object per turn with --json. Errors inside the chat keep the session; a
piped session that met one exits 1 at the end, so that scripts notice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import UsageError, describe, whole_number
from ..records import ChatStats
from ..report import display
from . import options

if TYPE_CHECKING:
    from ..runtime.chat import ChatSession

HELP = """Commands:
  /image PATH   add an image to your next message (pruned to k tokens in its own prefill)
  /drop         forget the images queued for your next message
  /forget       forget the oldest image and the turns up to it (room in the model's context)
  /k N          visual tokens kept per image, from the next image on
  /stats        tokens cached per layer, KV-cache size, FLOPs saved so far, last speeds
  /reset        forget the conversation, its images and the cache (alias /clear)
  /help         this list
  /exit         leave (alias /quit; Ctrl-D too); Ctrl-C stops an answer and keeps the session"""


COMMANDS = ("/image", "/drop", "/forget", "/k", "/stats", "/reset", "/clear", "/help", "/exit", "/quit")


@options.command
def chat(
    image: Annotated[
        Path | None, typer.Argument(metavar="IMAGE", help="An image for the first message.", show_default=False)
    ] = None,
    *,
    where: options.Where,
    pruning: options.OneMethod,
    sampling: options.Sampling,
    json: options.json_flag("one JSON object per turn instead of text") = False,
) -> None:
    """Chat about images, pruning each image's visual tokens once, in the turn that brings it."""
    settings = pruning.settings(where, sampling.seed)  # made and checked before the long load
    where.check([settings])
    from ..runtime.inputs import load_image  # light: a bad image fails before torch's import and the load

    first_image = load_image(image) if image is not None else None
    from ..runtime.chat import ChatSession  # imports torch and transformers: seconds of CPU

    loaded = where.load()
    session = ChatSession(loaded, settings, **sampling.generation, system=sampling.system)
    if first_image is not None:
        session.add_image(image.name, first_image)

    interactive = sys.stdin.isatty()
    if interactive and not json:
        display.note(banner(where.model, session))
    with line_editing(interactive):
        failed = _converse(session, json, interactive)
    if failed and not interactive:
        raise typer.Exit(1)


def _converse(session: ChatSession, json: bool, interactive: bool) -> bool:
    """Each line a turn or a /command, until /exit or the end of input; whether any failed."""
    failed, hinted = False, False
    for line in _lines(interactive):
        try:
            if line.startswith("/"):
                if not _command(session, line, json):
                    break
                continue
            if not hinted and not session.images and not session.pending:
                display.note("No image in the dialogue yet: /image PATH adds one to your next message.")
                hinted = True
            _turn(session, line, json, interactive)
        except BrokenPipeError:  # `asap chat ... | head -c 5`: the reader is gone, and so is the session
            raise
        except Exception as error:  # no turn, however it fails, ends the session (its state is kept)
            if os.environ.get("ASAP_DEBUG") == "1":
                raise
            display.error(describe(error))
            failed = True
    return failed


def history_path() -> Path:
    """The prompt's history, in the user's cache folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "asap" / "chat_history"


@contextmanager
def line_editing(interactive: bool) -> Iterator[None]:
    """On a terminal: arrow keys, editing and the history of earlier sessions at the prompt
    (readline), the history saved again on the way out."""
    try:
        import readline
    except ImportError:  # a Python without readline: plain input()
        readline = None
    if not interactive or readline is None:
        yield
        return
    path = history_path()
    readline.set_history_length(1000)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def _lines(interactive: bool) -> Iterator[str]:
    """User lines, blank ones skipped: prompted on a terminal (Ctrl-C clears the line), else stdin."""
    if not interactive:
        # Bytes that are not text reach the turn as lone surrogates, refused there with one error
        # line, instead of ending the loop here.
        encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
        raw = getattr(sys.stdin, "buffer", None)
        for line in raw if raw is not None else sys.stdin:
            line = line.decode(encoding, "surrogateescape") if isinstance(line, bytes) else line
            if line.strip():
                yield line.strip()
        return
    while True:
        try:
            line = input("> ")
        except EOFError:
            display.err.print()
            return
        except KeyboardInterrupt:
            display.err.print()
            continue
        except UnicodeDecodeError:
            display.error("the line is not valid text in the terminal's encoding; type it again")
            continue
        if line.strip():
            yield line.strip()


def _turn(session: ChatSession, text: str, json: bool, interactive: bool) -> None:
    thinking = display.status("thinking") if interactive and not json else contextlib.nullcontext()
    with _interruptible() as interrupted, thinking as spinner:

        def show(piece: str) -> None:
            if spinner is not None:
                spinner.stop()  # the first token is out
            display.write(piece)

        turn = session.ask(text, on_text=None if json else show, should_stop=interrupted)
    if json:
        display.print_json(turn.record(session.loaded.environment))
        return
    display.write("\n")
    if turn.result.stopped:
        display.note("(stopped)")
    elif not interactive and turn.result.ended != "end":  # piped: the summary below is not shown
        display.note(f"(answer{display.cut(turn.result).removeprefix('; answer')})")
    if interactive:
        result = turn.result
        line = display.summary(session.settings, result)
        if not result.visual_tokens:  # the turn brought no image: nothing to prune
            line = f"{result.fed_tokens} new tokens; {display.speeds(result)}{display.cut(result)}"
        display.note(f"{line}; the dialogue so far: {turn.cached_tokens} tokens (/stats: what each layer holds)")


def banner(model: str, session: ChatSession) -> str:
    """The line a terminal's chat opens with: the model, the method, k and L as it prunes."""
    settings = session.settings
    compact = ", compact KV cache" if settings.method.compacts else ""
    return (
        f"Chatting with {model} ({settings.method}, k={settings.k}, L={settings.first_layer}{compact}). "
        "/help lists commands."
    )


def _command(session: ChatSession, line: str, json: bool) -> bool:
    """Run a /command; False means leave."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":  # with --json, stdout holds JSON Lines only
        (display.err if json else display.out).print(HELP, markup=False, highlight=False, soft_wrap=True)
    elif name == "/image":
        _add_image(session, argument)
    elif name == "/drop":
        dropped = session.drop_pending()
        display.note(f"Dropped {', '.join(dropped)}." if dropped else "No image was queued.")
    elif name == "/forget":
        forgotten = session.forget_oldest_image()
        display.note(f"Forgot the oldest image and {forgotten} messages." if forgotten else "No image to forget.")
    elif name in ("/reset", "/clear"):
        session.reset()
        display.note("Conversation, images and cache cleared.")
    elif name == "/k":
        session.set_k(whole_number(argument, "/k"))
        display.note(f"k = {session.settings.k} from the next image on.")
    elif name == "/stats":
        _show_stats(session, json)
    else:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"unknown command {name}{hint} (/help lists them)")
    return True


def _add_image(session: ChatSession, argument: str) -> None:
    """/image PATH: the image queued for the next message."""
    if not argument:
        raise UsageError("/image needs a path: /image PATH")
    # A path pasted from a file manager comes quoted when it holds spaces.
    if len(argument) > 1 and argument[0] == argument[-1] and argument[0] in "'\"":
        argument = argument[1:-1]
    path = Path(argument)
    from ..runtime.inputs import load_image

    session.add_image(path.name, load_image(path))
    display.note(f"{path.name} will go with your next message.")


def _show_stats(session: ChatSession, json: bool) -> None:
    stats = session.stats()
    if json:
        display.print_json({"stats": dataclasses.asdict(stats)})
    else:
        display.out.print(_stats_text(stats), markup=False, highlight=False, soft_wrap=True)


@contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """While an answer streams, Ctrl-C asks generation to stop after the current token."""
    pressed = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    except ValueError:  # not the main thread (embedded use): Ctrl-C keeps its default meaning
        yield lambda: False
        return
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stats_text(stats: ChatStats) -> str:
    lengths = stats.cache_tokens_per_layer
    groups, start = [], 0
    for index in range(1, len(lengths) + 1):  # runs of layers holding as many tokens
        if index == len(lengths) or lengths[index] != lengths[start]:
            span = f"{start}" if index - 1 == start else f"{start}-{index - 1}"
            groups.append(f"layers {span}: {lengths[start]}")
            start = index
    saved = stats.tflops_saved * 1e12
    unit, scale = display.flop_unit(saved)
    share = f" ({saved / 1e12 / stats.tflops_vanilla:.1%} of the images' vanilla FLOPs)" if saved else ""
    speeds = "no turn yet"
    if stats.last_prefill_seconds is not None:
        rate = stats.last_decode_tokens_per_second
        decode = "not timed" if rate is None else f"{rate:.1f} tokens/s"
        speeds = f"prefill {stats.last_prefill_seconds:.3f} s, decode {decode} (one sample each, {stats.environment.timed_on})"
    return "\n".join(
        [
            (
                f"turns {stats.turns}, images {stats.images} (+{stats.pending_images} pending); "
                f"{stats.method} k={stats.k} L={stats.layer}"
            ),
            "tokens in cache: " + ("; ".join(groups) if groups else "none"),
            f"KV cache: {stats.kv_cache_bytes / 2**20:.2f} MB",
            f"FLOPs saved so far (Eq. 7, visual tokens): {saved / scale:.3f} {unit}{share}",
            f"last turn: {speeds}",
        ]
    )
