"""Synthetic scenes and one-word questions about them: the demo model's world.

A scene is a 96 x 96 picture (24 x 24 patches of 4 px: 576 visual tokens, as LLaVA-1.5 makes)
with a plain or noisy background and 0-5 sprites of 16 px: cars, circles, squares and
triangles in a few colours, anywhere, the top rows included (a pruning method with a bias to
the bottom of the image drops them: the paper's Fig. 2). Everything is drawn from a seeded
generator, so a seed names a dataset.

Questions ask about one object at a time and have one-word answers:
- colour:   "what colour is the car?"           (the scene has exactly one car)
- shape:    "what shape is the red object?"     (exactly one red object)
- exists:   "is there a blue circle?"           (yes / no, half of each)
- position: "is the car at the top or the bottom?"  (one car, centre above or below the middle)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 96
PATCH = 4
SPRITE = 16
KINDS = ("car", "circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 200, 40),
}
QUESTION_TYPES = ("colour", "shape", "exists", "position")
EVAL_SEED = 1_000_000  # the held-out questions: a stream no training step draws from
MAX_SPRITES = 5
CORNERS = range(0, SIZE - SPRITE + 1, PATCH)  # where a sprite's top-left corner may sit, on either axis


@dataclass(frozen=True)
class Sprite:
    kind: str
    colour: str
    x: int  # top-left corner, pixels
    y: int

    @property
    def top(self) -> bool:
        return in_top_half(self.y)

    @property
    def half(self) -> str:
        """ "top" or "bottom": the half of the image its centre is in."""
        return "top" if self.top else "bottom"


def in_top_half(y: int) -> bool:
    """Whether a sprite whose top edge is at row y has its centre in the upper half of the image."""
    return y + SPRITE / 2 < SIZE / 2


@dataclass(frozen=True)
class Scene:
    seed: int
    background: tuple[int, int, int]
    noise: float  # weight of per-pixel random colour blended into the background; 0 is plain
    sprites: tuple[Sprite, ...]

    def render(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), self.background)
        if self.noise:
            noise = Image.frombytes("RGB", (SIZE, SIZE), random.Random(self.seed).randbytes(SIZE * SIZE * 3))
            image = Image.blend(image, noise, self.noise)
        draw = ImageDraw.Draw(image)
        for sprite in self.sprites:
            _draw(draw, sprite)
        return image

    def patch_labels(self) -> list[int]:
        """Per patch (row-major, 24 x 24): 0 for background, else 1 + the index of
        (kind, colour) of the sprite covering it, for pretraining the vision tower."""
        grid = SIZE // PATCH
        labels = [0] * grid * grid
        for sprite in self.sprites:
            label = 1 + KINDS.index(sprite.kind) * len(COLOURS) + list(COLOURS).index(sprite.colour)
            for row in range(sprite.y // PATCH, (sprite.y + SPRITE) // PATCH):
                for col in range(sprite.x // PATCH, (sprite.x + SPRITE) // PATCH):
                    labels[row * grid + col] = label
        return labels


NUM_PATCH_LABELS = 1 + len(KINDS) * len(COLOURS)


@dataclass(frozen=True)
class Question:
    scene: Scene
    type: str
    text: str
    answer: str
    sprite: Sprite | None = None  # the object asked about; None for "is there ...?" answered no

    @property
    def region(self) -> str | None:
        """ "top" or "bottom": the half of the image the object asked about is in."""
        return None if self.sprite is None else self.sprite.half


def _draw(draw: ImageDraw.ImageDraw, sprite: Sprite) -> None:
    x, y, s, fill = sprite.x, sprite.y, SPRITE, COLOURS[sprite.colour]
    if sprite.kind == "circle":
        draw.ellipse((x + 1, y + 1, x + s - 2, y + s - 2), fill=fill)
    elif sprite.kind == "square":
        draw.rectangle((x + 2, y + 2, x + s - 3, y + s - 3), fill=fill)
    elif sprite.kind == "triangle":
        draw.polygon([(x + s // 2, y + 1), (x + 1, y + s - 2), (x + s - 2, y + s - 2)], fill=fill)
    else:  # a car: body, cabin, two dark wheels
        draw.rectangle((x + 1, y + 6, x + s - 2, y + 11), fill=fill)
        draw.rectangle((x + 4, y + 2, x + 11, y + 6), fill=fill)
        draw.ellipse((x + 2, y + 10, x + 6, y + 14), fill=(20, 20, 20))
        draw.ellipse((x + 9, y + 10, x + 13, y + 14), fill=(20, 20, 20))


def make_scene(rng: random.Random, min_sprites: int = 0) -> Scene:
    """A scene with min_sprites..5 non-overlapping sprites on the 4 px patch grid."""
    background, noise = _backdrop(rng)
    sprites = _place(rng, [], rng.randint(min_sprites, MAX_SPRITES), CORNERS, KINDS)
    return Scene(seed=rng.getrandbits(32), background=background, noise=noise, sprites=tuple(sprites))


def _backdrop(rng: random.Random) -> tuple[tuple[int, int, int], float]:
    """A background colour and noise weight."""
    return tuple(rng.randint(90, 170) for _ in range(3)), rng.choice((0.0, 0.0, 0.1, 0.2))


def _place(
    rng: random.Random, sprites: list[Sprite], count: int, rows: Sequence[int], kinds: Sequence[str]
) -> list[Sprite]:
    """`sprites` with sprites of `kinds` added until there are `count`, each apart from the
    others with its top edge in `rows` (rejection sampling: 20 tries a sprite, then fewer)."""
    for _ in range(count * 20):
        if len(sprites) == count:
            break
        x, y = rng.choice(CORNERS), rng.choice(rows)
        if all(abs(x - other.x) >= SPRITE or abs(y - other.y) >= SPRITE for other in sprites):
            sprites.append(Sprite(rng.choice(kinds), rng.choice(list(COLOURS)), x, y))
    return sprites


def ask(scene: Scene, question_type: str, rng: random.Random) -> Question | None:
    """A question of that type the scene can answer, or None when it has no suitable object."""
    if question_type in ("colour", "shape", "position"):
        # The object must be the only one of its kind (asked by kind) or colour (asked by colour).
        key = (lambda s: s.colour) if question_type == "shape" else (lambda s: s.kind)
        keys = [key(sprite) for sprite in scene.sprites]
        unique = [sprite for sprite in scene.sprites if keys.count(key(sprite)) == 1]
        if not unique:
            return None
        sprite = rng.choice(unique)
        if question_type == "colour":
            return Question(scene, "colour", f"what colour is the {sprite.kind}?", sprite.colour, sprite)
        if question_type == "shape":
            return Question(scene, "shape", f"what shape is the {sprite.colour} object?", sprite.kind, sprite)
        return position_question(scene, sprite)
    if question_type == "exists":
        present = {(s.colour, s.kind) for s in scene.sprites}
        if present and rng.random() < 0.5:
            colour, kind = rng.choice(sorted(present))
            matches = [s for s in scene.sprites if (s.colour, s.kind) == (colour, kind)]
            sprite = matches[0] if len(matches) == 1 else None  # two of them: no one place
            return Question(scene, "exists", f"is there a {colour} {kind}?", "yes", sprite)
        absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present]
        colour, kind = rng.choice(absent)
        return Question(scene, "exists", f"is there a {colour} {kind}?", "no")
    raise ValueError(f"unknown question type {question_type!r}")


def position_question(scene: Scene, sprite: Sprite) -> Question:
    return Question(scene, "position", f"is the {sprite.kind} at the top or the bottom?", sprite.half, sprite)


def questions(seed: int, count: int, types: tuple[str, ...] = QUESTION_TYPES) -> list[Question]:
    """`count` questions, the types in turn, each on its own scene; a seed names the set."""
    rng = random.Random(seed)
    result: list[Question] = []
    while len(result) < count:
        question_type = types[len(result) % len(types)]
        question = ask(make_scene(rng, min_sprites=1), question_type, rng)
        if question is not None:
            result.append(question)
    return result


TRAINING_MIX = {"colour": 1, "shape": 1, "exists": 4, "position": 3}
# Questions of each type asked per training scene (distinct ones, as far as the scene has them):
# the two types the model learned slowest are asked more often; extra questions cost a few
# tokens beside the image's 576. Training also asks one near miss per scene (from step 12,600).


def near_miss(scene: Scene, rng: random.Random) -> Question | None:
    """ "is there a red car?" answered no where the scene has a red object and a car, apart
    (or, failing that, one of the two): the exists questions the model gets wrong, since they
    need colour bound to kind. The held-out set has them as often as chance makes them."""
    present = {(sprite.colour, sprite.kind) for sprite in scene.sprites}
    colours, kinds = {colour for colour, _ in present}, {kind for _, kind in present}
    absent = [(colour, kind) for colour in COLOURS for kind in KINDS if (colour, kind) not in present]
    both = [(colour, kind) for colour, kind in absent if colour in colours and kind in kinds]
    either = [(colour, kind) for colour, kind in absent if colour in colours or kind in kinds]
    if not either:  # holds `both` too
        return None
    colour, kind = rng.choice(both or either)
    return Question(scene, "exists", f"is there a {colour} {kind}?", "no")


OUTNUMBERED = 0.4
# Share of training scenes built by `outnumbered`: from step 20,800 on. Steps 17,500-20,800 had
# a quarter of them, all with the asked sprite alone in its half.
ROWS_IN_HALF = {top: [y for y in CORNERS if in_top_half(y) == top] for top in (True, False)}
# Where a sprite's top edge may sit for it to be in the top (True) or the bottom half.


def outnumbered(rng: random.Random) -> tuple[Scene, Sprite]:
    """A scene where one sprite, the only one of its kind, shares its half of the image with no
    more sprites than fill the other half (most often with none), and that sprite. The model
    learned to answer "is the car at the top?" with the half most objects are in (at step
    17,500: 63% right on such held-out scenes, 100% where all objects share a half), and
    uniform placement makes these scenes rare."""
    background, noise = _backdrop(rng)
    on_top = rng.random() < 0.5
    asked = Sprite(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(CORNERS), rng.choice(ROWS_IN_HALF[on_top]))
    other_kinds = [kind for kind in KINDS if kind != asked.kind]
    others = rng.randint(1, MAX_SPRITES - 1)
    beside = rng.randint(0, (others - 1) // 2)  # so that its half, itself counted, is never the larger
    sprites = _place(rng, [asked], 1 + beside, ROWS_IN_HALF[on_top], other_kinds)
    sprites = _place(rng, sprites, 1 + others, ROWS_IN_HALF[not on_top], other_kinds)
    rng.shuffle(sprites)
    return Scene(seed=rng.getrandbits(32), background=background, noise=noise, sprites=tuple(sprites)), asked


def scene_questions(seed: int, count: int) -> list[list[Question]]:
    """`count` scenes, each with distinct questions of every type it can answer (up to
    TRAINING_MIX of each, a near miss, and in an outnumbered scene the outnumbered sprite's
    position) in a shuffled order: several answers per image for the price of one image."""
    rng = random.Random(seed)
    result = []
    while len(result) < count:
        asked: dict[str, Question] = {}
        if rng.random() < OUTNUMBERED:
            scene, sprite = outnumbered(rng)
            question = position_question(scene, sprite)
            asked[question.text] = question
        else:
            scene = make_scene(rng, min_sprites=1)
        for question_type, times in TRAINING_MIX.items():
            for _ in range(times):
                question = ask(scene, question_type, rng)
                if question is not None:
                    asked.setdefault(question.text, question)
        question = near_miss(scene, rng)
        if question is not None:
            asked.setdefault(question.text, question)
        if asked:
            questions = list(asked.values())
            rng.shuffle(questions)
            result.append(questions)
    return result


WORDS = (
    *("what", "colour", "is", "the", "shape", "object", "there", "a", "at", "top", "or", "bottom", "yes", "no"),
    *KINDS,
    *COLOURS,
)  # every word of every question and answer: the demo model's vocabulary


def normalise(answer: str) -> str:
    """Exact-match scoring ignores case, surrounding space and final punctuation."""
    return answer.strip().lower().rstrip(".!?").strip()
