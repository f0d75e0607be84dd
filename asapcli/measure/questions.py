"""The questions `asap eval` asks: the demo model's synthetic held-out ones, or a JSON Lines file
of the user's, every line and image checked before anything runs. Light (PIL, no torch), so that a
bad question file is refused before the model's libraries are imported."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..demo import scenes
from ..errors import AsapError, UsageError
from ..runtime.inputs import check_readable, is_stdin, load_image

ALL = "all"  # the question type of items that name none


@dataclass(frozen=True)
class Item:
    """One question about one image, with the answer exact-match scoring expects."""

    image: Image.Image | Path | scenes.Scene  # a scene is rendered when asked: --n large stays small
    question: str
    answer: str | tuple[str, ...]  # a list of accepted answers where the data gives one
    type: str = ALL
    region: str | None = None  # "top" / "bottom": where the object asked about is

    def picture(self) -> Image.Image:
        if isinstance(self.image, scenes.Scene):
            return self.image.render()
        return self.image if isinstance(self.image, Image.Image) else load_image(self.image)


# Each question is drawn after all the earlier ones (one random stream), about 0.8 KB and 0.1 ms
# apiece before the first answer: 100,000 are 80 MB, and days of answering on a CPU.
MAX_SYNTHETIC = 100_000


def synthetic_items(count: int, seed: int = scenes.EVAL_SEED) -> list[Item]:
    """The demo model's held-out questions (question types in turn, one scene each)."""
    if count > MAX_SYNTHETIC:
        raise UsageError(f"--n is at most {MAX_SYNTHETIC:,} for the synthetic questions, got {count:,}")
    return [Item(q.scene, q.text, q.answer, q.type, q.region) for q in scenes.questions(seed, count)]


def read_items(path: Path, limit: int | None = None) -> list[Item]:
    """A JSONL file of {"image": path, "question": str, "answer": str} (optional "type"); image
    paths are relative to the file's folder (to the current one for /dev/stdin). Every line is checked before anything runs."""
    path = Path(path).expanduser()
    check_readable(path, "question file")
    folder = Path.cwd() if is_stdin(path) else path.parent  # piped questions name images from here
    items = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        item = _read_item(path, number, raw, folder)
        if item is not None:
            items.append(item)
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise AsapError(f"{path} holds no questions")
    return items


def _read_item(path: Path, number: int, raw: bytes, folder: Path) -> Item | None:
    """Line `number` of the question file, checked (its image opened, named from `folder`); None
    for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark (Notepad) is fine
    except UnicodeDecodeError:
        raise AsapError(f"{path}:{number}: not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise AsapError(f"{path}:{number}: not JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise AsapError(f"{path}:{number}: expected an object with image, question and answer")
    problem = _record_problem(record)
    if problem:
        raise AsapError(f"{path}:{number}: {problem}")
    image = folder / Path(record["image"]).expanduser()
    try:
        load_image(image)  # every image opens before the first answer, not at its turn
    except AsapError as error:
        raise AsapError(f"{path}:{number}: {error}") from None
    answer = record["answer"] if isinstance(record["answer"], str) else tuple(record["answer"])
    return Item(image, record["question"], answer, str(record.get("type", ALL)))


def _record_problem(record: dict) -> str | None:
    """What is wrong with one question line, or None: image and question are non-empty strings,
    the answer one too or a list of accepted answers (as VQA data gives them)."""
    missing = [key for key in ("image", "question", "answer") if record.get(key) in (None, "", [])]
    if missing:
        return f"missing or empty {', '.join(missing)}"
    for key in ("image", "question"):
        if not isinstance(record[key], str) or not record[key].strip():
            return f"{key} must be a non-empty string, got {json.dumps(record[key])}"
    if record["image"].startswith(("http://", "https://")):
        return f"image URLs are not supported ({record['image']}): download the image and give its file"
    kind = record.get("type", ALL)
    if not isinstance(kind, str) or not kind.strip() or kind != kind.strip() or "\n" in kind:
        return f"type must be a question type's name (one line, no space around it), got {json.dumps(kind)}"
    answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
    if not all(isinstance(answer, str) and answer.strip() for answer in answers):
        return f"answer must be a string or a list of strings (accepted answers), got {json.dumps(record['answer'])}"
    return None


def in_column_order(kinds) -> list[str]:
    """Question types in the table's order, whatever order a data file brings them in: the demo's
    own (scenes.QUESTION_TYPES), then any other by name."""
    known = list(scenes.QUESTION_TYPES)
    return sorted(kinds, key=lambda kind: (known.index(kind), "") if kind in known else (len(known), kind))
