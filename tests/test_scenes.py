"""The demo model's synthetic world: deterministic, answerable, covering the top rows."""

import random
from collections import Counter

from asapcli.demo import scenes


def test_a_seed_names_the_same_questions_and_pixels():
    first, again = scenes.questions(7, 40), scenes.questions(7, 40)
    assert first == again
    assert all(a.scene.render().tobytes() == b.scene.render().tobytes() for a, b in zip(first, again))
    assert scenes.questions(8, 40) != first


def test_every_answer_follows_from_the_scene():
    for question in scenes.questions(1, 400):
        sprites = question.scene.sprites
        if question.type == "colour":
            (sprite,) = [s for s in sprites if question.text == f"what colour is the {s.kind}?"]
            assert question.answer == sprite.colour
        elif question.type == "shape":
            (sprite,) = [s for s in sprites if question.text == f"what shape is the {s.colour} object?"]
            assert question.answer == sprite.kind
        elif question.type == "position":
            (sprite,) = [s for s in sprites if question.text == f"is the {s.kind} at the top or the bottom?"]
            assert question.answer == ("top" if sprite.y + 8 < 48 else "bottom")
        else:
            named = {f"is there a {s.colour} {s.kind}?" for s in sprites}
            assert question.answer == ("yes" if question.text in named else "no")


def test_types_answers_and_places_are_balanced_enough():
    questions = scenes.questions(2, 800)
    assert Counter(q.type for q in questions) == {t: 200 for t in scenes.QUESTION_TYPES}
    answers = Counter((q.type, q.answer) for q in questions)
    assert 60 <= answers["exists", "yes"] <= 140 and 60 <= answers["position", "top"] <= 140
    assert {answers["colour", c] > 20 for c in scenes.COLOURS} == {True}
    top_row_sprites = [s for q in questions for s in q.scene.sprites if s.y < scenes.SPRITE]
    assert len(top_row_sprites) > 200  # the rows a bottom-biased pruner drops are well covered


def test_patch_labels_mark_each_sprite_on_the_24_by_24_grid():
    scene = next(q.scene for q in scenes.questions(3, 50) if len(q.scene.sprites) >= 3)
    labels = scene.patch_labels()
    assert len(labels) == 24 * 24
    assert sum(label != 0 for label in labels) == 16 * len(scene.sprites)  # 4 x 4 patches each
    sprite = scene.sprites[0]
    label = 1 + scenes.KINDS.index(sprite.kind) * len(scenes.COLOURS) + list(scenes.COLOURS).index(sprite.colour)
    assert labels[(sprite.y // 4) * 24 + sprite.x // 4] == label
    assert max(labels) < scenes.NUM_PATCH_LABELS
    assert scene.render().size == (96, 96)


def test_normalise():
    assert scenes.normalise("  Red.\n") == "red"
    assert scenes.normalise("YES!") == "yes"


def test_scene_questions_ask_distinct_questions_of_every_answerable_type():
    asked = scenes.scene_questions(4, 50)
    assert asked == scenes.scene_questions(4, 50) and len(asked) == 50
    for questions in asked:
        assert len({q.scene for q in questions}) == 1
        assert len({q.text for q in questions}) == len(questions) >= 1
        types = Counter(q.type for q in questions)
        extra = {"exists": 1, "position": 1}  # the near miss; the sprite an outnumbered scene asks about
        assert all(types[kind] <= times + extra.get(kind, 0) for kind, times in scenes.TRAINING_MIX.items())
        rng = random.Random(0)
        answerable = {kind for kind in scenes.QUESTION_TYPES if scenes.ask(questions[0].scene, kind, rng)}
        assert set(types) == answerable
    assert Counter(q.type for questions in asked for q in questions)["exists"] > 100  # up to 4 a scene


def test_a_near_miss_is_absent_but_shares_colour_and_kind_with_the_scene():
    rng = random.Random(3)
    for _ in range(200):
        scene = scenes.make_scene(rng, min_sprites=1)
        question = scenes.near_miss(scene, rng)
        if question is None:  # every colour and kind in the scene is taken by one object
            continue
        colour, kind = question.text.removeprefix("is there a ").removesuffix("?").split()
        assert question.answer == "no" and (colour, kind) not in {(s.colour, s.kind) for s in scene.sprites}
        colours, kinds = {s.colour for s in scene.sprites}, {s.kind for s in scene.sprites}
        assert colour in colours or kind in kinds
        if any(
            c in colours and k in kinds
            for c in scenes.COLOURS
            for k in scenes.KINDS
            if (c, k) not in {(s.colour, s.kind) for s in scene.sprites}
        ):
            assert colour in colours and kind in kinds  # both, where the scene allows it


def test_region_is_where_the_object_asked_about_is():
    for question in scenes.questions(5, 200):
        if question.type in ("colour", "shape", "position"):
            assert question.region == ("top" if question.sprite.top else "bottom")
        if question.type == "exists" and question.answer == "no":
            assert question.region is None


def test_an_outnumbered_sprite_is_the_only_one_of_its_kind_in_the_smaller_half():
    rng = random.Random(5)
    for _ in range(200):
        scene, asked = scenes.outnumbered(rng)
        others = [sprite for sprite in scene.sprites if sprite is not asked]
        beside = [sprite for sprite in others if sprite.top == asked.top]
        assert asked in scene.sprites and 1 <= len(others) <= scenes.MAX_SPRITES - 1
        assert all(sprite.kind != asked.kind for sprite in others)
        assert 1 + len(beside) <= len(others) - len(beside)
        assert all(  # placed apart, like make_scene's sprites
            abs(a.x - b.x) >= scenes.SPRITE or abs(a.y - b.y) >= scenes.SPRITE
            for i, a in enumerate(scene.sprites)
            for b in scene.sprites[i + 1 :]
        )

    def asks_an_outnumbered_sprite(questions):
        sprites = questions[0].scene.sprites
        for question in questions:
            if question.type == "position" and len(sprites) > 1:
                own_half = sum(sprite.top == question.sprite.top for sprite in sprites)
                if own_half <= len(sprites) - own_half:
                    return True
        return False

    # Training asks about such a sprite in 57% of these scenes; uniform placement alone: 37%.
    assert sum(map(asks_an_outnumbered_sprite, scenes.scene_questions(6, 400))) > 0.5 * 400
