"""The engine against an independent reference of ASAP (paper Section 4, DESIGN.md section 3).

tests/reference_asap.py is a from-scratch, float64, eager (full N x N mask and softmax) decoder
forward with SG-BiMask, top-k scoring, Eq. 6 consolidation and refill; it was written from the
paper and the design notes only and shares no code with asapcli/engine (only the vision tower,
through `get_image_features`, is the model's own). It is first checked against transformers'
own forward, then the engine's kept positions, merge count, hidden states entering layer L and
pruned logits are checked against it, on the bundled demo model and on the tiny GQA LLaVA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reference_asap import ReferenceLM
from tiny_models import pruned_by
from transformers import AutoModelForImageTextToText

from asapcli.engine.plans import plan_for
from asapcli.engine.settings import PruneSettings
from asapcli.runtime.inputs import build_inputs, load_image, user_message
from asapcli.runtime.loading import load
from asapcli.runtime.presets import find_preset

QUESTION = "what colour is the car?"
CAR = Path(__file__).resolve().parent.parent / "examples" / "car.png"
# Engine and transformers compute in float32; the reference in float64. The demo model's
# residual stream reaches ~140 in magnitude, where float32 rounding alone is ~1e-5 per step.
HIDDEN_TOL = {"atol": 1e-4, "rtol": 1e-5}
LOGITS_TOL = {"atol": 1e-4, "rtol": 0.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matrices are small: one thread is as fast, and far faster on a busy machine (no
    OpenMP threads spinning against each other). The previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Setup:
    lvlm: object  # asapcli Loaded, engine installed
    reference: ReferenceLM  # over a separate, untouched transformers copy
    inputs: object
    embedded: tuple[torch.Tensor, torch.Tensor]
    span: int  # visual tokens per image span
    spans: int  # image spans in the prompt


def _setup(path, images) -> Setup:
    lvlm = load(str(path), device="cpu")
    inputs = build_inputs(lvlm.processor, [user_message(QUESTION, len(images))], images)
    model = AutoModelForImageTextToText.from_pretrained(str(path)).eval()
    reference = ReferenceLM(model)
    embedded = reference.embed(inputs)
    ids = inputs["input_ids"][0]
    span = int((ids == model.config.image_token_id).sum()) // len(images)
    return Setup(lvlm, reference, inputs, embedded, span, len(images))


@pytest.fixture(scope="module")
def demo() -> Setup:
    return _setup(find_preset("demo").bundled_path(), [load_image(CAR)])


@pytest.fixture(scope="module")
def tiny(llava_path, images) -> Setup:
    return _setup(llava_path, list(images))


def _engine(setup: Setup, method, k, layer, lambda_max, threshold, queries, score):
    settings = PruneSettings(
        method=method,
        k=k,
        layer=layer,
        lambda_max=None if method == "fastv" else lambda_max,
        merge_threshold=threshold if method == "asap" else None,
        score_queries=queries,
        score=score,
    )
    pruning = plan_for(setup.lvlm, setup.inputs["input_ids"][0], settings)
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = setup.lvlm.decoder.decoder.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode(), pruned_by(setup.lvlm.model, pruning) as session:
            logits = setup.lvlm.model(**setup.inputs).logits
    finally:
        handle.remove()
    return session.prefills[0], seen["hidden"][0], logits[0]


def _check(setup: Setup, method, k, layer, lambda_max=1.0, threshold=0.9, queries="last", score="attention"):
    done, hidden, logits = _engine(setup, method, k, layer, lambda_max, threshold, queries, score)
    expected = setup.reference.pruned(
        setup.inputs, method, k, layer, lambda_max, threshold, queries, score, embedded=setup.embedded
    )
    pruned_spans = setup.spans if k < setup.span else 0
    assert len(expected.kept) == pruned_spans
    got_kept = [record.kept.cpu().tolist() for record in done.pruned()]
    want_kept = [positions.tolist() for positions in expected.kept]
    assert got_kept == want_kept, _kept_diff(got_kept, want_kept)
    assert done.prompt().merged_tokens == expected.merged
    assert hidden.shape == expected.entering.shape
    assert logits.shape == expected.logits.shape
    torch.testing.assert_close(hidden.double(), expected.entering, **HIDDEN_TOL)
    torch.testing.assert_close(logits.double(), expected.logits, **LOGITS_TOL)
    return expected


def _kept_diff(got, want) -> str:
    lines = []
    for index, (g, w) in enumerate(zip(got, want)):
        lines.append(f"span {index}: engine only {sorted(set(g) - set(w))}, reference only {sorted(set(w) - set(g))}")
    return "; ".join(lines) or f"engine {len(got)} spans, reference {len(want)}"


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_reference_vanilla_matches_transformers(which, request):
    setup: Setup = request.getfixturevalue(which)
    model = setup.reference.model
    with torch.no_grad():
        expected = model(**setup.inputs).logits[0]
    got = setup.reference.vanilla(setup.inputs)
    torch.testing.assert_close(got, expected.double(), atol=1e-4, rtol=0.0)


# --------------------------------------------------------------------------- engine vs reference

METHODS = ["asap", "asap-bimask-only", "fastv"]

# (method, k, L, lambda_max, merge threshold, score queries, score); k is named per model (K
# below): "small", "mid", "big" (past half the span: the merge budget binds at t = -1) and
# "almost" (span - 1). Each runs on the demo model (trained: attention and similarities far from
# uniform) and on the tiny GQA model (random weights, two image spans).
CASES = [
    ("asap", "mid", 1, 1.0, 0.9, "last", "attention"),
    ("asap", "mid", 2, 1.0, 0.9, "last", "attention"),
    ("asap", "mid", 3, 1.0, 0.9, "last", "attention"),
    ("asap-bimask-only", "mid", 1, 1.0, 0.9, "last", "attention"),
    ("asap-bimask-only", "mid", 2, 1.0, 0.9, "last", "attention"),
    ("asap-bimask-only", "mid", 3, 1.0, 0.9, "last", "attention"),
    ("fastv", "mid", 1, 1.0, 0.9, "last", "attention"),
    ("fastv", "mid", 2, 1.0, 0.9, "last", "attention"),
    ("fastv", "mid", 3, 1.0, 0.9, "last", "attention"),
    ("asap", "small", 2, 1.0, 0.9, "last", "attention"),
    ("asap", "almost", 2, 1.0, 0.9, "last", "attention"),
    ("asap-bimask-only", "small", 2, 1.0, 0.9, "last", "attention"),
    ("asap-bimask-only", "almost", 2, 1.0, 0.9, "last", "attention"),
    ("fastv", "small", 2, 1.0, 0.9, "last", "attention"),
    ("fastv", "almost", 2, 1.0, 0.9, "last", "attention"),
    ("asap", "mid", 2, 0.3, 0.9, "last", "attention"),
    ("asap", "mid", 2, 1.0, 0.5, "last", "attention"),
    ("asap", "mid", 2, 1.0, -1.0, "last", "attention"),
    ("asap", "big", 3, 0.3, 0.5, "all", "attention"),
    ("asap", "mid", 2, 1.0, 0.9, "text", "attention"),
    ("asap", "mid", 1, 1.0, 0.9, "all", "attention"),
    ("asap", "mid", 2, 1.0, 0.9, "all", "attention"),
    ("asap", "mid", 2, 1.0, 0.9, "last", "contribution"),
    ("asap", "small", 3, 0.3, 0.5, "text", "contribution"),
    ("asap", "mid", 2, 0.3, -1.0, "all", "contribution"),
    ("asap-bimask-only", "mid", 2, 0.3, 0.9, "last", "attention"),
    ("asap-bimask-only", "mid", 2, 1.0, 0.9, "text", "attention"),
    ("asap-bimask-only", "mid", 1, 0.3, 0.9, "all", "attention"),
    ("asap-bimask-only", "mid", 2, 1.0, 0.9, "all", "contribution"),
    ("fastv", "mid", 2, 1.0, 0.9, "text", "attention"),
    ("fastv", "mid", 2, 1.0, 0.9, "all", "attention"),
    ("fastv", "mid", 2, 1.0, 0.9, "last", "contribution"),
    ("fastv", "small", 3, 1.0, 0.9, "text", "contribution"),
]

K = {
    "demo": {"small": 64, "mid": 128, "big": 400, "almost": 575},  # one span of 576
    "tiny": {"small": 8, "mid": 24, "big": 48, "almost": 63},  # two spans of 64
}


def _case_id(case) -> str:
    method, k, layer, lambda_max, threshold, queries, score = case
    return f"{method}-k{k}-L{layer}-lam{lambda_max}-t{threshold}-{queries}-{score}"


RUNS = [pytest.param(which, case, id=f"{which}-{_case_id(case)}") for case in CASES for which in ("demo", "tiny")]


@pytest.mark.parametrize(("which", "case"), RUNS)
def test_engine_matches_reference(which, case, request):
    setup: Setup = request.getfixturevalue(which)
    method, k, layer, lambda_max, threshold, queries, score = case
    _check(setup, method, K[which][k], layer, lambda_max, threshold, queries, score)


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_budget_limit_binds(which, request):
    """t = -1 absorbs everything it may: exactly span - k per span when k is past half the span."""
    setup: Setup = request.getfixturevalue(which)
    k = K[which]["big"]
    expected = _check(setup, "asap", k, 2, 1.0, -1.0)
    assert expected.merged == setup.spans * (setup.span - k)


@pytest.mark.parametrize("which", ["demo", "tiny"])
@pytest.mark.parametrize("method", METHODS)
def test_unpruned_span_runs_as_vanilla(which, method, request):
    """k >= the span: nothing kept or merged, no SG-BiMask: the logits are vanilla's."""
    setup: Setup = request.getfixturevalue(which)
    expected = _check(setup, method, setup.span, 2)
    assert expected.merged == 0 and expected.kept == []
    torch.testing.assert_close(expected.logits, setup.reference.vanilla(setup.inputs), atol=1e-9, rtol=0.0)
