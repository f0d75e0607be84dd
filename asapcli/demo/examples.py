"""The example scenes in `examples/` and a question file about them, written by

    python -m asapcli.demo.examples examples

`car.png` is the README's first command: one red car in the top rows (where a pruning method
biased to the bottom of the image loses it), other shapes lower down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .scenes import Scene, Sprite

EXAMPLES = {
    "car": Scene(
        seed=1,
        background=(120, 140, 160),
        noise=0.0,
        sprites=(
            Sprite("car", "red", 40, 4),
            Sprite("circle", "blue", 8, 60),
            Sprite("square", "green", 44, 64),
            Sprite("triangle", "yellow", 76, 76),
        ),
    ),
    "shapes": Scene(
        seed=2,
        background=(150, 130, 110),
        noise=0.0,
        sprites=(
            Sprite("triangle", "green", 4, 8),
            Sprite("circle", "red", 68, 24),
            Sprite("square", "blue", 28, 72),
        ),
    ),
    "noisy": Scene(
        seed=3,
        background=(110, 150, 120),
        noise=0.2,
        sprites=(
            Sprite("triangle", "red", 64, 0),
            Sprite("car", "yellow", 12, 76),
        ),
    ),
}

QUESTIONS = [
    ("car", "colour", "what colour is the car?", "red"),
    ("car", "position", "is the car at the top or the bottom?", "top"),
    ("car", "shape", "what shape is the blue object?", "circle"),
    ("car", "exists", "is there a yellow triangle?", "yes"),
    ("shapes", "shape", "what shape is the green object?", "triangle"),
    ("shapes", "colour", "what colour is the square?", "blue"),
    ("shapes", "exists", "is there a red car?", "no"),
    ("noisy", "colour", "what colour is the car?", "yellow"),
    ("noisy", "position", "is the triangle at the top or the bottom?", "top"),
    ("noisy", "shape", "what shape is the red object?", "triangle"),
]


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, scene in EXAMPLES.items():
        scene.render().save(folder / f"{name}.png")
    lines = [
        json.dumps({"image": f"{name}.png", "question": question, "answer": answer, "type": kind})
        for name, kind, question, answer in QUESTIONS
    ]
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "examples"))
