"""DivPrune as its authors define it (github.com/vbdi/divprune, LLaVA/llava/model/llava_arch.py,
`DivPrune`), restated here independently of asap's code and of theirs: the first pick is the token whose
nearest other token is farthest (the second smallest cosine distance of its column, argmax),
each next pick the token whose smallest distance to those picked is largest. asap's divprune
keeps that set, on hand-made features where picking by the smallest first gives another set and
on the image features of a real forward pass through `asapcli.pruned`."""

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

import asapcli
from asapcli.engine import ops
from asapcli.runtime.inputs import build_inputs, user_message
from asapcli.runtime.loading import load


def official_divprune(features: torch.Tensor, k: int) -> list[int]:
    """The authors' selection, restated from its definition (not their code): cosine distances
    between the features; the first pick is the token whose nearest other token is farthest away,
    each later pick the token whose distance to the nearest token picked so far is largest; on a
    tie the lowest index (torch.argmax's first maximum, which their loop uses)."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    others = distance + torch.diag(torch.full((len(features),), math.inf))  # a token is not its own neighbour
    picked = [int(others.min(dim=0).values.argmax())]
    while len(picked) < k:
        picked.append(int(distance[picked].min(dim=0).values.argmax()))
    return sorted(picked)


def on_circle(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d)), 0.0] for d in degrees])


def test_the_first_pick_is_the_token_farthest_from_its_nearest_neighbour():
    # Two tight pairs (0/3 and 100/104 degrees) and a loner at 50: the loner goes first, then
    # the token farthest from it (104, at 54 degrees). Starting from a tight pair's token, as
    # an argmin would, keeps 0 or 3 with 104 instead.
    features = on_circle(0, 3, 50, 100, 104)
    assert official_divprune(features, 2) == [2, 4]
    assert ops.max_min_diverse(features, 2).tolist() == [2, 4]


def test_each_next_pick_is_farthest_from_everything_picked():
    # 0 first (its nearest, 60, is 60 degrees away; every other token has one within 30), then
    # 170 (farthest from 0), then the token whose nearer of 0 and 170 is farthest: 90, not 60
    # or 140 (a greedy that looked at the last pick only would take 60).
    features = on_circle(0, 60, 90, 120, 140, 170)
    assert official_divprune(features, 3) == [0, 2, 5]
    assert ops.max_min_diverse(features, 3).tolist() == [0, 2, 5]


@pytest.mark.parametrize("seed", range(4))
def test_asap_keeps_the_official_set_on_random_features(seed):
    features = torch.randn(40, 16, generator=torch.Generator().manual_seed(seed))
    for k in (1, 5, 17):
        assert ops.max_min_diverse(features, k).tolist() == official_divprune(features, k)


def test_the_block_keeps_what_the_official_divprune_keeps_of_the_images_features(llava_path, images):
    """DivPrune picks among the projected image features the language model receives."""
    lvlm = load(str(llava_path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what is it?", 1)], images[:1])
    model = AutoModelForImageTextToText.from_pretrained(llava_path).eval()
    with torch.inference_mode():
        embeddings = model(**inputs, output_hidden_states=True).hidden_states[0][0]  # the decoder's input
        with asapcli.pruned(model, method="divprune", k=8) as pruning:
            model(**inputs)
    (image,) = pruning.report().images
    expected = official_divprune(embeddings[image.start : image.end].float(), 8)
    assert [position - image.start for position in image.kept] == expected
