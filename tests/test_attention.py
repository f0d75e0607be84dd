"""The registered attention function's pieces, and FastV's scores against transformers' own
eager attention probabilities."""

import pytest
import torch
from tiny_models import pruned_by
from transformers import AutoModelForImageTextToText

from asapcli.engine import image_spans
from asapcli.engine.attention import additive_mask, score_rows
from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.inputs import build_inputs, user_message
from asapcli.runtime.loading import load


def test_additive_mask_rows_match_the_full_causal_mask():
    query = torch.zeros(2, 4, 5, 8)
    full = additive_mask(None, query, kv_len=7)
    assert full.shape == (2, 1, 5, 7)
    blocked = torch.finfo(torch.float32).min
    # queries are the last 5 of 7 keys: row 0 sees keys 0..2
    assert full[0, 0, 0].tolist() == [0, 0, 0, blocked, blocked, blocked, blocked]
    assert torch.equal(additive_mask(None, query, 7, slice(3, 5)), full[:, :, 3:5])
    boolean = torch.rand(2, 1, 5, 7) > 0.5
    converted = additive_mask(boolean, query, 7)
    assert torch.equal(converted == 0, boolean)


def test_score_rows():
    span = slice(3, 10)
    assert score_rows("last", span, 15) == slice(14, 15)
    assert score_rows("text", span, 15) == slice(10, 15)
    assert score_rows("all", span, 15) == slice(3, 15)
    with pytest.raises(ValueError):
        score_rows("some", span, 15)


def test_fastv_keeps_the_top_k_of_transformers_eager_last_token_attention(llava_path, images):
    lvlm = load(str(llava_path), device="cpu")
    eager = AutoModelForImageTextToText.from_pretrained(llava_path, attn_implementation="eager").eval()
    inputs = build_inputs(lvlm.processor, [user_message("where is the blue patch?", 1)], images[:1])
    ids = inputs["input_ids"][0]
    ((start, end),) = image_spans(ids, lvlm.image_token_id)
    k, layer = 10, 2
    with torch.inference_mode():
        attentions = eager(**inputs, output_attentions=True).attentions
    expected = attentions[layer - 1][0, :, -1, start:end].mean(dim=0).topk(k).indices.sort().values + start
    pruning = plan_for(lvlm, ids, PruneSettings(method="fastv", k=k, layer=layer))
    with torch.inference_mode(), pruned_by(lvlm.model, pruning) as session:
        lvlm.model(**inputs)
    assert session.prefills[0].pruned()[0].kept.tolist() == expected.tolist()
