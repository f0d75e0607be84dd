"""A selection's `order` (engine/methods/base.py): renumbered, the kept tokens reach the language
model in the order the method gives, not the patches' (what VisionZip's and PruMerge+'s authors
feed); with original positions each token stays at its slot; the report lists the kept positions
ascending, each with its own role, whatever the order."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import asapcli
from asapcli.engine import image_spans
from asapcli.engine.methods import METHODS, Selection, SpanView
from asapcli.engine.methods.base import BeforeLLM
from asapcli.runtime.inputs import build_inputs, load_image, user_message
from asapcli.runtime.loading import load

CAR = Path(__file__).resolve().parent.parent / "examples" / "car.png"
KEPT = [3, 10, 17, 40]
ORDER = [2, 0, 3, 1]


@dataclass(frozen=True)
class Shuffled(BeforeLLM):
    """Keeps KEPT, to be fed in ORDER; the first of them is marked as merged."""

    name = "shuffled"

    def select(self, span: SpanView, k: int) -> Selection:
        kept = torch.tensor(KEPT)
        roles = ["merged"] + ["selected"] * (len(KEPT) - 1)
        return Selection(kept=kept, hidden=span.hidden[kept], roles=roles, order=torch.tensor(ORDER))


@pytest.fixture(scope="module")
def demo():
    lvlm = load("demo", device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message("what colour is the car?", 1)], [load_image(CAR)])
    return lvlm, inputs


def by_hand(lvlm, inputs, placed: list[int], renumber: bool) -> torch.Tensor:
    """Last-token logits with the image span replaced by the projected features at `placed`,
    in that order, positions 0..M-1 (renumber) or each token's own."""
    model, ids = lvlm.model, inputs["input_ids"][0]
    ((start, end),) = image_spans(ids, model.config.image_token_id)
    with torch.inference_mode():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        features = torch.cat(list(features.pooler_output if hasattr(features, "pooler_output") else features))
        embed = model.get_input_embeddings()
        embeds = torch.cat([embed(ids[:start]), features[placed], embed(ids[end:])])[None]
        own = torch.cat([torch.arange(start), torch.tensor(placed) + start, torch.arange(end, len(ids))])
        positions = torch.arange(embeds.shape[1]) if renumber else own
        return model(inputs_embeds=embeds, position_ids=positions[None]).logits[0, -1]


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_the_order_is_the_sequences_when_renumbered(positions, demo, monkeypatch):
    monkeypatch.setitem(METHODS, Shuffled.name, Shuffled)
    lvlm, inputs = demo
    placed = [KEPT[i] for i in ORDER] if positions == "renumber" else KEPT
    expected = by_hand(lvlm, inputs, placed, positions == "renumber")
    with torch.inference_mode(), asapcli.pruned(lvlm.model, method="shuffled", k=4, positions=positions) as pruning:
        logits = lvlm.model(**inputs).logits[0, -1]
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)
    (image,) = pruning.report().images
    start = image.start
    assert [p - start for p in image.kept] == KEPT
    assert image.roles == ["merged"] + ["selected"] * 3
