"""The question file of lmms-eval's task `asap_demo`: the demo model's first held-out questions
(those `asap eval` asks without --data) with their scenes as PNG files, in the JSON Lines that
`asap eval --data` reads too, so both ask the same questions about the same pixels. Written by

    python -m asapcli.lmms_eval.demo_task asapcli/lmms_eval/tasks/asap_demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..measure.questions import synthetic_items

QUESTIONS = 100  # 25 of each question type, about 0.9 MB of pictures
QUESTION_FILE = "questions.jsonl"


def write(folder: Path, count: int = QUESTIONS) -> None:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, item in enumerate(synthetic_items(count)):
        name = f"images/{index:04d}.png"
        item.picture().save(folder / name, optimize=True)
        record = {"image": name, "question": item.question, "answer": item.answer, "type": item.type}
        lines.append(json.dumps(record))
    (folder / QUESTION_FILE).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
