"""Mutation check of the engine's tests: apply one small wrong change to the engine at a time, in
a scratch copy of the working tree, run the engine's tests there, and report whether a test
failed (the mutant is killed) or the suite stayed green (it survived: a hole in the tests).

    python scripts/mutants.py                 # every mutant, about 1-2 minutes each on 2 cores
    python scripts/mutants.py --only capa     # mutants whose name contains "capa"
    python scripts/mutants.py --list

A development tool, not part of the test run. Exit status 1 when a mutant survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_ops.py",
    "tests/test_reference.py",
    "tests/test_engine.py",
    "tests/test_chat.py",
    "tests/test_batches.py",
    "tests/test_families.py",
    "tests/test_attention.py",
]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (exact text, replacement); each text occurs once


ATTENTION, ASAP, OPS, DECODER = (
    "asapcli/engine/attention.py",
    "asapcli/engine/methods/asap.py",
    "asapcli/engine/ops.py",
    "asapcli/engine/decoder.py",
)
MUTANTS = [
    # The six that survived the review of issue 16.
    Mutant("saliency inverted in the mask", ATTENTION, (
        ("ops.sg_bimask(saliency, method.lambda_max)", "ops.sg_bimask(1 - saliency, method.lambda_max)"),
    )),
    Mutant("saliency inverted in the merge weights", ASAP, (
        ("ops.merge_states(hidden, span.saliency[selected], anchor)",
         "ops.merge_states(hidden, 1 - span.saliency[selected], anchor)"),
    )),
    Mutant("saliency inverted in the visiting order", ASAP, (
        ("ops.consolidation_groups(hidden, span.saliency[selected],",
         "ops.consolidation_groups(hidden, 1 - span.saliency[selected],"),
    )),
    Mutant("Eq. 2 mass over visual and text queries", ATTENTION, (
        ("ops.attention_mass(query[rows_of, :, span],", "ops.attention_mass(query[rows_of, :, span.start :],"),
    )),
    Mutant("Eq. 2 mass as a row sum (what a token gives)", ATTENTION, (
        ("ops.attention_mass(query[rows_of, :, span], keys[rows_of, :, key_span], scaling)",
         "ops.attention_mass(keys[rows_of, :, key_span], query[rows_of, :, span], scaling)"),
    )),
    Mutant("SG-BiMask in layer L-1 only", ATTENTION, (
        ("if method.sg_bimask else None", "if method.sg_bimask and is_scoring_layer else None"),
        ("        if method.sg_bimask:\n", "        if method.sg_bimask and is_scoring_layer:\n"),
        ("return mask if method.sg_bimask else", "return mask if method.sg_bimask and is_scoring_layer else"),
    )),
    Mutant("consolidation visits by importance, not s_hat", ASAP, (
        ("ops.consolidation_groups(hidden, span.saliency[selected],",
         "ops.consolidation_groups(hidden, span.importance[selected],"),
    )),
    Mutant("CAPA weighted by the key norm, not the value norm", ATTENTION, (
        ("values = repeat_kv(value[rows_of, :, key_span],", "values = repeat_kv(key[rows_of, :, key_span],"),
    )),
    # More of our own.
    Mutant("refill ranked by importance, not raw mass", ASAP, (
        ("torch.topk(span.mass[pool_index], absorbed)", "torch.topk(span.importance[pool_index], absorbed)"),
    )),
    Mutant("no merge budget (more merged than the pool refills)", ASAP, (
        ("limit=pool_size)", "limit=None)"),
    )),
    Mutant("lambda_max ignored", OPS, (
        ("torch.clamp(lambda_max * saliency.float(), min=EPS)", "torch.clamp(saliency.float(), min=EPS)"),
    )),
    Mutant("Eq. 4 floor at 1e-3 instead of eps", OPS, (
        ("torch.clamp(lambda_max * saliency.float(), min=EPS)", "torch.clamp(lambda_max * saliency.float(), min=1e-3)"),
    )),
    Mutant("min-max without the minimum", OPS, (
        ("return (scores - low) / (high - low + EPS)", "return scores / (high - low + EPS)"),
    )),
    Mutant("merge weights ignored (plain mean)", OPS, (
        ("    weights = saliency.float()\n", "    weights = torch.ones_like(saliency.float())\n"),
    )),
    Mutant("importance softmax over the image keys only", OPS, (
        ("probs = torch.softmax(logits, dim=-1)[..., key_span]", "probs = torch.softmax(logits[..., key_span], dim=-1)"),
    )),
    Mutant("'text' score rows start one token late", ATTENTION, (
        ("return slice(span.stop, q_len) if span.stop < q_len", "return slice(span.stop + 1, q_len) if span.stop < q_len"),
    )),
    Mutant("mask cache keyed without the query count", DECODER, (
        ("if self.key != key:", "if self.key is None or self.key[::2] != key[::2]:"),
    )),
    Mutant("a span the budget does not shrink gets SG-BiMask", DECODER, (
        ("and (plan.score_only or plan.shrinks(start, end))", ""),
        ("        if self.plans[row].score_only:\n",
         "        if self.plans[row].score_only or self.k >= span.stop - span.start:\n"),
    )),
    Mutant("kept tokens renumbered after layer L", DECODER, (
        ("        call.rope_positions = _gather_positions(call.rope_positions, keep)\n",
         ("        call.rope_positions = _gather_positions(call.rope_positions, keep)\n"
          "        call.rope_positions = call.rope_positions.sort(dim=-1).indices\n")),
    )),
    Mutant("renumbered decoding steps not shifted", DECODER, (
        ("return position_ids - self.position_shift[:, None]", "return position_ids"),
    )),
]  # fmt: skip


def scratch_copy() -> Path:
    """The working tree as it is (tracked and untracked, not ignored files) in a temporary folder."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    target = Path(tempfile.mkdtemp(prefix="asap-mutants-"))
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def apply(copy: Path, mutant: Mutant) -> None:
    path = copy / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            raise SystemExit(f"mutant {mutant.name!r}: {old!r} occurs {text.count(old)} times in {mutant.file}")
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(copy: Path) -> tuple[bool, str]:
    """Run the engine's tests in `copy` (its asapcli imported first); (passed, last line)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(copy))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=copy, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failed = next((line for line in lines if line.startswith("FAILED")), lines[-1] if lines else "")
    return result.returncode == 0, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or args.only.lower() in m.name.lower()]
    if args.list:
        print("\n".join(m.name for m in mutants))
        return 0
    baseline = scratch_copy()
    try:
        passed, line = run_tests(baseline)
        if not passed:
            print(f"the unmutated tests fail, fix them first: {line}")
            return 2
    finally:
        shutil.rmtree(baseline)
    survivors = []
    for mutant in mutants:
        copy = scratch_copy()
        started = time.perf_counter()
        try:
            apply(copy, mutant)
            passed, line = run_tests(copy)
        finally:
            shutil.rmtree(copy)
        verdict = "SURVIVED" if passed else "killed  "
        print(f"{verdict} {mutant.name} ({time.perf_counter() - started:.0f} s){'' if passed else ': ' + line}")
        sys.stdout.flush()
        if passed:
            survivors.append(mutant.name)
    print(f"{len(mutants) - len(survivors)} of {len(mutants)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
