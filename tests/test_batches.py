"""A left-padded batch through the engine: each row its own image spans, its own k tokens, its
own mask and positions; equal to the same samples run one by one."""

import pytest
import torch
from tiny_models import pruned_by

from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.generation import to_device
from asapcli.runtime.inputs import user_message
from asapcli.runtime.loading import load

PROMPTS = ["what is it?", "where is the blue thing in this picture?"]  # different lengths: padding
STEPS = 6


@pytest.fixture(scope="module")
def loaded(model_paths):
    return {name: load(str(path), device="cpu") for name, path in model_paths.items()}


def greedy(lvlm, inputs, plans):
    """Greedy decoding pruned by `plans` made by hand, and what its prefill did."""
    with torch.inference_mode(), pruned_by(lvlm.model, plans) as session:
        out = lvlm.model.generate(
            **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out, session.prefills[0]


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@pytest.mark.parametrize(
    "method, positions",
    [("vanilla", "original"), ("fastv", "original"), ("random", "original"), ("asap", "original"),
     ("divprune", "original"), ("divprune", "renumber")],
)  # fmt: skip
def test_a_padded_batch_equals_its_samples_one_by_one(family, method, positions, loaded, images):
    """LLaVA-NeXT tiles the two images differently, so the rows keep different numbers of
    tokens before padding: the shorter row is left-filled with masked slots."""
    lvlm = loaded[family]
    processor = lvlm.processor
    texts = [processor.apply_chat_template([user_message(p, 1)], add_generation_prompt=True) for p in PROMPTS]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    batch = to_device(lvlm, batch)  # the model's device and dtype: tests/test_cuda.py runs this on a GPU
    settings = PruneSettings(method=method, k=8, layer=2, positions=positions)
    plans = [plan_for(lvlm, row, settings) for row in batch["input_ids"]]
    batched, done = greedy(lvlm, batch, plans)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        single = to_device(lvlm, processor(text=text, images=[image], return_tensors="pt"))
        single_plan = plan_for(lvlm, single["input_ids"][0], settings)
        alone, done_alone = greedy(lvlm, single, single_plan)
        length = single["input_ids"].shape[1]
        assert torch.equal(batched.sequences[row, -STEPS:], alone.sequences[0, length:])
        for step in range(STEPS):
            assert torch.allclose(batched.logits[step][row], alone.logits[step][0], atol=1e-5)
        padding = batch["input_ids"].shape[1] - length
        assert [r.kept.tolist() for r in done_alone.pruned()] == [(r.kept - padding).tolist() for r in done.pruned(row)]


def test_plans_of_one_batch_must_agree(loaded, images):
    lvlm = loaded["llava"]
    ids = torch.tensor([1, 2, 3])
    plans = [
        plan_for(lvlm, ids, PruneSettings(method="fastv", k=8)),
        plan_for(lvlm, ids, PruneSettings(method="fastv", k=4)),
    ]
    with pytest.raises(ValueError, match="share method, k and layer"), pruned_by(lvlm.model, plans):
        pass
