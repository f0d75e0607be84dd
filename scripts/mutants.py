"""Mutation check of the tests: apply one small wrong change to asapcli at a time, in a scratch
copy of the working tree, run the tests there, and report whether a test failed (the mutant is
killed) or the suite stayed green (it survived: a hole in the tests).

    python scripts/mutants.py                 # every mutant; a killed one takes seconds to minutes
    python scripts/mutants.py --only capa     # mutants whose name contains "capa"
    python scripts/mutants.py --own-tests     # each mutant against the tests it names only (quick)
    python scripts/mutants.py --list

Each mutant's text must occur exactly once in its file: every pattern is checked before any test
runs, and one that no longer matches (a refactor moved or reworded the line) stops the run with
exit status 2, so the mutant is updated rather than silently lost. A mutant may name the tests
expected to kill it: they run first, then the rest of TESTS (pytest -x stops at the first
failure). A development tool, not part of the test run. Exit status 1 when a mutant survives.
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
    # Issue 27: the user-level behaviours around the engine (API block, chat, run, eval, lmms-eval).
    "tests/test_api.py",
    "tests/test_survivors.py",
    "tests/test_api_block_calls.py",
    "tests/test_divprune_official.py",
    "tests/test_vispruner.py",
    "tests/test_visionzip.py",
    "tests/test_prumerge_plus.py",
    "tests/test_tower_tiles.py",
    "tests/test_next_tower_methods.py",
    "tests/test_chat_stats.py",
    "tests/test_streaming.py",
    "tests/test_inputs.py",
    "tests/test_run_glob_and_stream.py",
    "tests/test_eval_budgets_and_partial.py",
    "tests/test_lmms_eval.py",
    "tests/test_pdrop.py",
    "tests/test_sparsevlm.py",
    # Issue 33: timings with their spread and verdict, threads for the machine.
    "tests/test_stability.py",
]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (exact text, replacement); each text occurs once
    tests: tuple[str, ...] = ()  # the tests expected to kill it, run first


VISPRUNER, VISION = "asapcli/engine/methods/vispruner.py", "asapcli/engine/vision.py"
VISIONZIP, PRUMERGE = "asapcli/engine/methods/visionzip.py", "asapcli/engine/methods/prumerge_plus.py"
TOWER = "asapcli/engine/methods/tower.py"
EVALUATION, PATCH_LAYOUT, FIGURES = (
    "asapcli/measure/evaluation.py",
    "asapcli/runtime/patch_layout.py",
    "asapcli/report/figures.py",
)
ATTENTION, ASAP, OPS, DECODER = (
    "asapcli/engine/attention.py",
    "asapcli/engine/methods/asap.py",
    "asapcli/engine/ops.py",
    "asapcli/engine/decoder.py",
)
RANDOM, SESSION, INPUTS, CHAT, STREAMING, EVAL_RUN, OPTIONS, HYPERPARAMETERS_FILE = (
    "asapcli/engine/methods/random.py",
    "asapcli/engine/session.py",
    "asapcli/runtime/inputs.py",
    "asapcli/runtime/chat.py",
    "asapcli/runtime/streaming.py",
    "asapcli/commands/eval_run.py",
    "asapcli/commands/options.py",
    "asapcli/engine/methods/hyperparameters.py",
)
PDROP, PRUNE_PASS, CACHE_STATE, SPARSEVLM = (
    "asapcli/engine/methods/pdrop.py",
    "asapcli/engine/prune_pass.py",
    "asapcli/engine/cache_state.py",
    "asapcli/engine/methods/sparsevlm.py",
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
    Mutant("a span the budget does not shrink gets SG-BiMask", PRUNE_PASS, (
        ("else dict(plan.steps(start, end))", "else dict(plan.steps(start, end) or [(plan.layer, None)])"),
        ("        if self.plans[item.row].score_only:\n            return item.now.start",
         "        if self.plans[item.row].score_only or item.steps[layer] is None:\n            return item.now.start"),
        ("        if self.plans[item.row].score_only:\n            return SpanRecord(",
         "        if self.plans[item.row].score_only or not item.stages:\n            return SpanRecord("),
    )),
    Mutant("kept tokens renumbered after layer L", DECODER, (
        ("        call.rope_positions = _gather_positions(call.rope_positions, keep)\n",
         ("        call.rope_positions = _gather_positions(call.rope_positions, keep)\n"
          "        call.rope_positions = call.rope_positions.sort(dim=-1).indices\n")),
    )),
    Mutant("renumbered decoding steps not shifted", CACHE_STATE, (
        ("return position_ids if shift is None else position_ids - shift[:, None]", "return position_ids"),
    )),
    # Issue 27: twelve that survived an independent pass, each changing what a user gets.
    Mutant("pruning state kept into the next sequence of a block", CACHE_STATE, (
        ("    state = getattr(cache, ATTRIBUTE, None)\n    if state is None or", "    state = getattr(type(cache), ATTRIBUTE, None)\n    if state is None or"),
        ("    if state is None or held(cache, 0) == 0:", "    if getattr(type(cache), ATTRIBUTE, None) is None:"),
        ("        setattr(cache, ATTRIBUTE, state)", "        setattr(type(cache), ATTRIBUTE, state)"),
    ), ("tests/test_api_block_calls.py::test_a_padded_batch_then_a_single_prompt_in_one_block_answer_as_apart",)),
    Mutant("DivPrune's first pick the least isolated token", OPS, (
        ("picked = [int(nearest_other.amin(dim=1).argmax())]", "picked = [int(nearest_other.amin(dim=1).argmin())]"),
    ), ("tests/test_divprune_official.py",)),
    Mutant("random's seed ignores the span start", RANDOM, (
        ("manual_seed(self.seed * 1_000_003 + span.start)", "manual_seed(self.seed * 1_000_003)"),
    ), ("tests/test_api_block_calls.py::test_random_pruning_draws_each_image_of_a_prompt_afresh_and_repeats_itself",)),
    Mutant("the model config's output_hidden_states/attentions not refused", SESSION, (
        ("if kwargs.get(output) or getattr(self.model.config, output, False):", "if kwargs.get(output):"),
    ), ("tests/test_api_block_calls.py::test_the_models_own_config_asking_for_hidden_states_or_attentions_is_refused",)),
    Mutant("a continuation refused on a cache no method shortened", CACHE_STATE, (
        ("    if state is not None and state.shortened_by is not None and tokens > 1 and", "    if tokens > 1 and"),
    ), ("tests/test_api_block_calls.py::test_a_cache_filled_outside_the_block_is_continued_inside_it",)),
    Mutant("a cache shortened before the LLM continued after its block", DECODER, (
        ("            call.state.shortened(\n", "            (lambda *_: None)(\n"),
    ), ("tests/test_hostile_fourth.py::test_a_cache_shortened_before_the_llm_is_not_continued_after_its_block",)),
    Mutant("a staged method's --layer ignored", "asapcli/engine/settings.py", (
        ("    if not method.reads_layer and method.prunes and not method.before_llm:", "    if False:"),
    ), ("tests/test_hostile_fourth.py::test_a_layer_given_to_a_method_in_stages_is_refused_not_ignored",)),
    Mutant("--top-k not handed to generate()", "asapcli/runtime/sampling.py", (
        ('"top_k": top_k, "top_p": top_p}', '"top_k": None, "top_p": top_p}'),
    ), ("tests/test_sampling_options.py",)),
    Mutant("/forget drops the system prompt", CHAT, (
        ("self.messages[:start] + self.messages[cut:]", "self.messages[cut:]"),
    ), ("tests/test_sampling_options.py::test_forget_keeps_the_system_prompt",)),
    Mutant("a compact cache counted as an exact one", "asapcli/engine/cost.py", (
        ('    if cache == "compact" and len(stages) > 1 and stages[0].tokens == arch.visual_tokens:', "    if False:"),
    ), ("tests/test_flops.py::test_flops_gives_table_4s_kv_storage_without_weights",)),
    Mutant("KV storage without the text tokens", "asapcli/engine/cost.py", (
        ("    return sum((text_tokens + tokens) * width * value_bytes for tokens in held)", "    return sum(tokens * width * value_bytes for tokens in held)"),
    ), ("tests/test_flops.py::test_flops_gives_table_4s_kv_storage_without_weights",)),
    Mutant("--flops takes the smallest k within the share", "asapcli/engine/cost.py", (
        ("    return max(fitting)", "    return min(fitting)"),
    ), ("tests/test_flops_targets.py",)),
    Mutant("--flops gives every method of a grid the first method's k", "asapcli/engine/settings.py", (
        ("pairs.append((cls, budget_for(method, layer, budget) if targets else budget))",
         "pairs.append((cls, budget_for(_configured(classes[-1], seed, {}), layer, budget) if targets else budget))"),
    ), ("tests/test_flops_targets.py::test_eval_at_equal_flops_gives_each_method_its_own_k",)),
    Mutant("a step by hand on a shortened cache placed at layer 0's length", DECODER, (
        ("        chunk_start = cache_state.held(cache, 0) + state.dropped", "        chunk_start = cache_state.held(cache, 0)"),
    ), ("tests/test_hostile_fourth.py::test_a_decoding_step_by_hand_on_a_shortened_cache_is_generates_step",
        "tests/test_compact_cache.py::test_a_chat_continues_a_compact_cache")),
    Mutant("a suggestion for a method in capitals", "asapcli/errors.py", (
        ("close = [lowered[text.lower()]] if text.lower() in lowered else", "close ="),
    ), ("tests/test_hostile_fourth.py::test_more_of_the_fourth_passs_cases_are_refused_in_one_line",)),
    # The fourth pass's mutation review: its four survivors.
    Mutant("R05 k unmet against k, not the image's tokens", SESSION, (
        ("    if kept == sum(min(plan.k, end - start) for start, end in plan.spans):", "    if kept == sum(plan.k for start, end in plan.spans):"),
    ), ("tests/test_hostile_fourth.py::test_a_budget_at_or_over_the_image_is_met_not_unmet",)),
    Mutant("R09 a two-token continuation of a shortened cache let through", CACHE_STATE, (
        ("state.shortened_by is not None and tokens > 1 and", "state.shortened_by is not None and tokens > 2 and"),
    ), ("tests/test_hostile_fourth.py::test_a_cache_shortened_before_the_llm_is_not_continued_after_its_block",)),
    Mutant("R11 Eq. 8 over prompts the mean of their ratios", "asapcli/engine/cost.py", (
        ("    return sum(count.pruned for count in counts) / full if full else 1.0",
         "    return sum(count.ratio for count in counts) / len(counts) if full else 1.0"),
    ), ("tests/test_hostile_fourth.py::test_eq_8_over_prompts_is_the_ratio_of_the_sums",)),
    Mutant("R19 vanilla refused a layer", "asapcli/engine/settings.py", (
        ("    if not method.reads_layer and method.prunes and not method.before_llm:", "    if not method.reads_layer and not method.before_llm:"),
    ), ("tests/test_hostile_fourth.py::test_vanilla_takes_a_layer_it_ignores",)),
    Mutant("--flops tries budgets a method cannot run at", "asapcli/engine/cost.py", (
        ("for k in range(1, tokens + 1) if method.budget_problem(k) is None}", "for k in range(1, tokens + 1)}"),
    ), ("tests/test_flops_targets.py::test_the_second_passs_flops_cases",)),
    Mutant("--flops takes an adaptive count", "asapcli/engine/cost.py", (
        ("    if method.counts_per_image:\n", "    if False:\n"),
    ), ("tests/test_flops_targets.py::test_the_second_passs_flops_cases",)),
    Mutant("a system prompt longer than the context taken", "asapcli/runtime/inputs.py", (
        ("    if tokens >= limit:", "    if tokens > 10 * limit:"),
    ), ("tests/test_sampling_options.py::test_a_system_prompt_is_checked_before_the_first_turn",)),
    Mutant("a blank question type taken", "asapcli/measure/questions.py", (
        ("    if not isinstance(kind, str) or not kind.strip() or kind != kind.strip() or \"\\n\" in kind:",
         "    if not isinstance(kind, str):"),
    ), ("tests/test_hostile_fourth.py::test_a_question_type_is_a_name",)),
    # The second mutation review of the fourth pass: its twelve survivors.
    Mutant("Q02 --flops never keeps every token", "asapcli/engine/cost.py", (
        ("for k in range(1, tokens + 1) if method.budget_problem(k) is None}", "for k in range(1, tokens) if method.budget_problem(k) is None}"),
    ), ("tests/test_mutation_fourth.py::test_a_flops_share_of_100_percent_keeps_every_token",)),
    Mutant("Q03 the suggested share rounded, not rounded up", "asapcli/engine/cost.py", (
        ("math.ceil(least * 10000) / 100", "round(least * 10000) / 100"),
    ), ("tests/test_mutation_fourth.py::test_the_share_a_refusal_suggests_is_one_that_runs",)),
    Mutant("Q04 a share of 100% refused", "asapcli/engine/cost.py", (
        ("        if not 0 < value <= 1 or not math.isfinite(value):", "        if not 0 < value < 1 or not math.isfinite(value):"),
    ), ("tests/test_mutation_fourth.py::test_a_flops_share_of_100_percent_keeps_every_token",)),
    Mutant("Q07 a compact cache before the first stage holds the last", "asapcli/engine/cost.py", (
        ("[stages[1].tokens] * stages[0].layers", "[stages[-1].tokens] * stages[0].layers"),
    ), ("tests/test_mutation_fourth.py::test_a_compact_cache_of_a_method_in_stages_holds_its_first_stage_before_it",)),
    Mutant("Q09 --top-p 1 refused", "asapcli/runtime/sampling.py", (
        ("not 0 < top_p <= 1):", "not 0 < top_p < 1):"),
    ), ("tests/test_mutation_fourth.py::test_the_command_lines_sampling_options_reach_the_sampler",)),
    Mutant("Q11 the command line drops --top-k", OPTIONS, (
        ('"top_k": self.top_k, "seed": self.seed}', '"top_k": None, "seed": self.seed}'),
    ), ("tests/test_mutation_fourth.py::test_the_command_lines_sampling_options_reach_the_sampler",)),
    Mutant("Q14 a comparison refuses L when one method ignores it", OPTIONS, (
        ("and not any(cls.reads_layer for cls in pruners):", "and not all(cls.reads_layer for cls in pruners):"),
    ), ("tests/test_mutation_fourth.py::test_layer_in_a_comparison_and_at_a_flops_share",)),
    Mutant("Q15 a grid at a share chooses k for L = 2", "asapcli/engine/settings.py", (
        ("budget_for(method, layer, budget) if targets else budget", "budget_for(method, DEFAULT_LAYER, budget) if targets else budget"),
    ), ("tests/test_mutation_fourth.py::test_layer_in_a_comparison_and_at_a_flops_share",)),
    Mutant("Q16 flops chooses k ignoring --visual-tokens", "asapcli/commands/flops.py", (
        ("load_architecture(where.model, visual_tokens) if visual_tokens", "load_architecture(where.model) if visual_tokens"),
    ), ("tests/test_mutation_fourth.py::test_flops_chooses_k_for_the_visual_tokens_it_is_told",)),
    Mutant("Q20 a batch drops --system", "asapcli/runtime/inputs.py", (
        ("    start = opening(system)", "    start = opening(None)"),
    ), ("tests/test_mutation_fourth.py::test_a_batchs_rows_each_get_the_system_prompt",)),
    Mutant("Q22 one's own question types in hash order", "asapcli/measure/questions.py", (
        ('else (len(known), kind))', 'else (len(known), ""))'),
    ), ("tests/test_mutation_fourth.py::test_question_types_of_ones_own_come_in_one_order",)),
    Mutant("Q23 lmms-eval drops k beside flops", "asapcli/lmms_eval/arguments.py", (
        ("    if k is not None:\n        raise UsageError(\"model_args: give k or flops", "    if False:\n        raise UsageError(\"model_args: give k or flops"),
    ), ("tests/test_mutation_fourth.py::test_lmms_evals_model_args_refuse_k_beside_flops",)),
    Mutant("methods at one share labelled by budgets alone", FIGURES, (
        ("        if len(budgets) == 1 or len(methods) == 1:", "        if True:"),
    ), ("tests/test_figures.py::test_methods_at_one_flops_share_label_each_its_own_k",)),
    Mutant("eval's columns in the data file's order", EVALUATION, (
        ("for kind in questions.in_column_order(self.totals)}", "for kind in self.totals}"),
    ), ("tests/test_hostile_fourth.py::test_evals_columns_keep_one_order_whatever_the_data_files_order",)),
    Mutant("a second thread's block told blocks do not nest", SESSION, (
        ("        if _OPEN[model] != threading.get_ident():", "        if False:"),
    ), ("tests/test_hostile_fourth.py::test_a_second_threads_block_on_the_same_model_says_so",)),
    Mutant("glob matches not sorted", INPUTS, (
        ("matches = sorted(glob.glob(os.path.expanduser(text)))", "matches = glob.glob(os.path.expanduser(text))"),
    ), ("tests/test_run_glob_and_stream.py::test_a_glob_pairs_its_files_in_sorted_order_with_the_prompts",)),
    Mutant("chat's pruned TFLOPs replaced, not added, each image turn", CHAT, (
        ("pruned = sum(turn.result.flops.pruned for turn in self.turns)", "pruned = sum(turn.result.flops.pruned for turn in self.turns[-1:])"),
    ), ("tests/test_chat_stats.py::test_stats_add_up_the_flops_of_every_image_turn",)),
    Mutant("chat's /reset keeps the queued images", CHAT, (
        ("        self.pending: list[tuple[str, Image.Image]] = []\n",
         "        self.pending: list[tuple[str, Image.Image]] = getattr(self, \"pending\", [])\n"),
    ), ("tests/test_chat_stats.py::test_reset_forgets_the_queued_images_too",)),
    Mutant("a trailing partial character never streamed, even at the end", STREAMING, (
        ('if not text.startswith(shown) or (text.endswith("\\ufffd") and not final):',
         'if not text.startswith(shown) or text.endswith("\\ufffd"):'),
    ), ("tests/test_run_glob_and_stream.py::test_an_answer_cut_inside_a_character_streams_all_of_its_text",)),
    Mutant("eval without -k ignores the preset's budgets", OPTIONS, (
        ("budgets = budget_list(self.budgets) or (list(preset.budgets) if preset and preset.budgets else None)",
         "budgets = budget_list(self.budgets)"),
    ), ("tests/test_eval_budgets_and_partial.py::test_eval_without_k_runs_every_budget_of_the_preset",)),
    Mutant("a stopped eval keeps rows with no answers", EVAL_RUN, (
        ("        scores = [score for score in scores if score.totals]\n", ""),
    ), ("tests/test_eval_budgets_and_partial.py::test_a_stopped_eval_has_no_row_for_a_run_that_gave_no_answer",)),
    Mutant("lmms-eval's true/false taken as numbers", HYPERPARAMETERS_FILE, (
        ("if self.type is float and (isinstance(value, bool) or not isinstance(value, int | float)):",
         "if self.type is float and not isinstance(value, int | float):"),
    ), ("tests/test_eval_budgets_and_partial.py",)),
    Mutant("VisPruner's [CLS] ranking ties broken by a stable sort", OPS, (
        ("ranked = scores[None].argsort(dim=-1, descending=True)[0]",
         "ranked = scores.sort(descending=True, stable=True).indices"),
    ), ("tests/test_vispruner.py",)),
    Mutant("VisPruner's important share rounded up", VISPRUNER, (
        ("int(image.budget * self.important_ratio)", "math.ceil(image.budget * self.important_ratio)"),
        ("from dataclasses import dataclass, replace", "import math\nfrom dataclasses import dataclass, replace"),
    ), ("tests/test_vispruner.py",)),
    Mutant("VisPruner's duplicates matched by dot product, not cosine", OPS, (
        ("unit = features / features.norm(dim=-1, keepdim=True)\n    while count", "unit = features\n    while count"),
    ), ("tests/test_vispruner.py",)),
    Mutant("VisPruner drops the least similar evens", OPS, (
        ("distinct = best_match.argsort(dim=-1, descending=True)[0, drop:]",
         "distinct = best_match.argsort(dim=-1)[0, drop:]"),
    ), ("tests/test_vispruner.py",)),
    Mutant("the tap reads the [CLS] row without layer_norm1", VISION, (
        ("normed = layer.layer_norm1(hidden)", "normed = hidden"),
    ), ("tests/test_vispruner.py",)),
    Mutant("VisionZip's dominant ties broken by a stable sort", OPS, (
        ("chosen[torch.topk(scores[None], count, dim=-1).indices[0]] = True",
         "chosen[torch.sort(scores, descending=True, stable=True).indices[:count]] = True"),
    ), ("tests/test_visionzip.py",)),
    Mutant("VisionZip's contextual token the mean of its group, target included", OPS, (
        ("return features[targets] + total / members[:, None]",
         "return (features[targets] + total) / (members[:, None] + 1)"),
    ), ("tests/test_visionzip.py",)),
    Mutant("VisionZip's keys read one token off ([CLS] not skipped)", VISIONZIP, (
        ("cues.keys[1:][rest]", "cues.keys[:-1][rest]"),
    ), ("tests/test_visionzip.py",)),
    Mutant("VisionZip's target step one too long", OPS, (
        ("torch.arange(0, m, max(1, m // count), device=keys.device)[:count]",
         "torch.arange(0, m, max(1, m // count + 1), device=keys.device)[:count]"),
    ), ("tests/test_visionzip.py",)),
    Mutant("VisionZip's [CLS] token fed after the patches", VISIONZIP, (
        ("fed = [first.cls, first.dominant, first.contextual]", "fed = [first.dominant, first.cls, first.contextual]"),
    ), ("tests/test_visionzip.py",)),
    Mutant("PruMerge+'s neighbours ranked by a stable sort, not torch.topk", OPS, (
        ("near = candidates[torch.topk(cosine, min(32, candidates.numel()), dim=-1).indices[0]]",
         "near = candidates[torch.sort(cosine[0], descending=True, stable=True).indices[: min(32, candidates.numel())]]"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant("PruMerge+'s neighbours weighted by the kept token's attention, not their own", OPS, (
        ("merged[i] = features[picked[i]] + (features[near] * scores[near, None]).sum(dim=0)",
         "merged[i] = features[picked[i]] + (features[near] * scores[picked[i]]).sum(dim=0)"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant("PruMerge+'s samples start one patch early", OPS, (
        ("samples = torch.arange(step // 2, n - 1, step, device=scores.device)[:count]",
         "samples = torch.arange(step // 2 - 1, n - 1, step, device=scores.device)[:count]"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant("PruMerge+'s complement keeps the patches its repeats displaced", OPS, (
        ("return (~taken).nonzero().flatten()[repeats:]", "return (~taken).nonzero().flatten()"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant("PruMerge+'s attention scaled by the head width, not the full width", OPS, (
        ("scores = (query[:1] @ key.transpose(0, 1)) * query.shape[-1] ** -0.5",
         "scores = (query[:1] @ key.transpose(0, 1)) * (query.shape[-1] // 2) ** -0.5"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant("PruMerge+'s adaptive top count rounded up", OPS, (
        ("top = torch.topk(scores[None], int(n * share), dim=-1).indices[0]",
         "top = torch.topk(scores[None], int(n * share) + 1, dim=-1).indices[0]"),
    ), ("tests/test_prumerge_plus.py",)),
    # Issue 26: the [CLS] methods on LLaVA-NeXT (each tower item alone, the model's own packing).
    Mutant("VisPruner on LLaVA-NeXT drops the newline slots", VISPRUNER, (
        ("kept, roles = [image.newlines], [KEPT] * image.newlines.numel()", "kept, roles = [image.newlines[:0]], []"),
    ), ("tests/test_next_tower_methods.py",)),
    Mutant("a tile's budget split over the image's own items, not the model's most", TOWER, (
        ("min(k // cues.most_items, patches)", "min(k // len(cues.items), patches)"),
    ), ("tests/test_next_tower_methods.py",)),
    Mutant("the most items per image counted without the base image", VISION, (
        ("self.most_items = 1 + tiles", "self.most_items = tiles"),
    ), ("tests/test_next_tower_methods.py", "tests/test_vispruner.py")),
    Mutant("VisionZip's tiles' dominant patches fed tile by tile, not across the canvas", VISIONZIP, (
        ("fed += [dominant.sorted_by(torch.cat([tile.canvas for tile in tiles]))]", "fed += [dominant]"),
    ), ("tests/test_next_tower_methods.py",)),
    Mutant("PruMerge+ feeds the tiles before the base image", PRUMERGE, (
        ("items = [self._item(item, image.budget, span) for item in image.items]",
         "items = [self._item(item, image.budget, span) for item in image.items[::-1]]"),
    ), ("tests/test_next_tower_methods.py",)),
    Mutant("every image of a call read with the last image's size", VISION, (
        ("self.tiling.image(items, self.sizes[number])", "self.tiling.image(items, self.sizes[-1])"),
    ), ("tests/test_tower_tiles.py",)),
    Mutant("a call whose spans outnumber the images encoded read anyway", VISION, (
        ("        if images != self.encoded:", "        if False:"),
    ), ("tests/test_tower_tiles.py",)),
    Mutant("a tile's share not capped at its patches", TOWER, (
        ("min(k // cues.most_items, patches)", "k // cues.most_items"),
    ), ("tests/test_tower_tiles.py",)),
    Mutant("a token takes a slot an earlier token took", TOWER, (
        ("own = claim >= 0 and claim not in taken", "own = claim >= 0"),
    ), ("tests/test_tower_tiles.py",)),
    # Issue 26's hostile pass: what a careless user of the tiled [CLS] methods found.
    Mutant("eval's FLOPs ratio the last question's, not all of theirs", EVALUATION, (
        ("        self.flops.append(flops)", "        self.flops = [flops]"),
    ), ("tests/test_tower_tiles.py", "tests/test_eval.py")),
    Mutant("a step that kept its whole span counted as pruning", SESSION, (
        ("if positions.numel() < left:", "if True:"),
    ), ("tests/test_tower_tiles.py",)),
    Mutant("a figure's text read as mathtext", FIGURES, (
        ('with matplotlib.rc_context({"text.parse_math": False}):', "with matplotlib.rc_context({}):"),
    ), ("tests/test_figures.py",)),
    Mutant("an image thinner than a tile row given an empty tile grid", PATCH_LAYOUT, (
        ("    if rows and cols:  # an image thinner", "    if True:  # an image thinner"),
    ), ("tests/test_figures.py",)),
    # Issue 26: PyramidDrop and the multi-stage engine.
    Mutant("pdrop's stage layers one layer late", PDROP, (
        ("layers = [max(1, stage * depth // STAGES) for stage in range(1, STAGES)]",
         "layers = [max(1, stage * depth // STAGES + 1) for stage in range(1, STAGES)]"),
    ), ("tests/test_pdrop.py",)),
    Mutant("pdrop's ties broken by the lower index, not as torch.topk", PDROP, (
        ("kept = ops.top_k(span.importance, k)", "kept = ops.visit_order(span.importance)[:k].sort().values"),
    ), ("tests/test_pdrop.py",)),
    Mutant("a stage ranked by the last but one token's query", ATTENTION, (
        ("torch.matmul(query[:, :, -1:], keys.transpose(2, 3))", "torch.matmul(query[:, :, -2:-1], keys.transpose(2, 3))"),
    ), ("tests/test_pdrop.py",)),
    Mutant("a stage ranked without the layer's input norm", ATTENTION, (
        ("    normed = layer.input_layernorm(hidden)\n", "    normed = hidden\n"),
    ), ("tests/test_pdrop.py",)),
    Mutant("pdrop's stage s keeps lambda^(s+1)", PDROP, (
        ("count = max(1, int(tokens * ratio**stage))", "count = max(1, int(tokens * ratio ** (stage + 1)))"),
    ), ("tests/test_pdrop.py",)),
    Mutant("pdrop's budget averaged over one layer too few", PDROP, (
        ("for s in range(len(bounds) - 1)) / depth", "for s in range(len(bounds) - 1)) / (depth - 1)"),
    ), ("tests/test_pdrop.py",)),
    Mutant("later stages' decoding steps not renumbered", DECODER, (
        ("elif index and index in call.shifts:", "elif False:"),
    ), ("tests/test_pdrop.py",)),
    Mutant("Eq. 7 counts the first step of a schedule only", SESSION, (
        ("for start, end, taken in spans)) for layer in layers)", "for start, end, taken in spans)) for layer in layers[:1])"),
    ), ("tests/test_pdrop.py",)),
    # Issue 26: SparseVLM v1.5.
    Mutant("sparsevlm's ties broken by the lower index, not as torch.topk", SPARSEVLM, (
        ("chosen = torch.topk(relation[None], keep_for(tokens, k), dim=-1).indices[0]",
         "chosen = torch.sort(relation, descending=True, stable=True).indices[: keep_for(tokens, k)]"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant("sparsevlm's rating layers one layer late", SPARSEVLM, (
        ("at = max(int(layer * depth / DEPTH + 0.5),", "at = max(int(layer * depth / DEPTH + 0.5) + 1,"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant("sparsevlm's cluster weights swapped between clusters", OPS, (
        ("points * weight[cluster, None]", "points * weight.flip(0)[cluster, None]"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant("sparsevlm's clusters placed before the kept tokens", SPARSEVLM, (
        ("places = ascending.argsort()", "places = ascending.argsort().roll(-kept.numel())"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant("sparsevlm's raters: every text token", OPS, (
        ("raters = torch.nonzero(relevance > relevance.mean()).flatten()",
         "raters = torch.nonzero(relevance >= relevance.min()).flatten()"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant("sparsevlm recycles the worst rated deleted tokens", SPARSEVLM, (
        ("best = torch.topk(relation[deleted][None], recycled_count(deleted.numel()), dim=-1).indices[0]",
         "best = torch.topk(relation[deleted][None], recycled_count(deleted.numel()), dim=-1, largest=False).indices[0]"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant("sparsevlm's density without its noise", OPS, (
        ("+ noise.to(dist.dtype) * 1e-6", "+ noise.to(dist.dtype) * 0"),
    ), ("tests/test_sparsevlm.py",)),
    # Session 12: what a fresh, independent pass of 45 mutations found surviving (tests/test_survivors.py).
    Mutant("a later stage's report forgets what earlier stages merged", PRUNE_PASS, (
        ('item.absorbed = _absorbed(item, selection) if item.stages else selection.token_absorbed()', 'item.absorbed = selection.token_absorbed()'),
    ), ("tests/test_survivors.py",)),
    Mutant('the API takes a seed of 2**32', 'asapcli/engine/settings.py', (
        ('if "seed" in numbers and not 0 <= numbers["seed"] < SEEDS:', 'if "seed" in numbers and not 0 <= numbers["seed"] <= SEEDS:'),
    ), ("tests/test_survivors.py",)),
    Mutant('-n on a question file takes one more', 'asapcli/measure/questions.py', (
        ('if limit is not None and len(items) == limit:', 'if limit is not None and len(items) > limit:'),
    ), ("tests/test_survivors.py",)),
    Mutant("a batch row's end token not counted", 'asapcli/runtime/generation.py', (
        ('new_ids = new_ids[: ends[0] + 1] if ends else new_ids', 'new_ids = new_ids[: ends[0]] if ends else new_ids'),
    ), ("tests/test_survivors.py",)),
    Mutant('a decode rate from 7 decoding steps', 'asapcli/runtime/generation.py', (
        ('decoded = n_new - 1  # the first token came with the prefill', 'decoded = n_new  # the first token came with the prefill'),
    ), ("tests/test_survivors.py",)),
    Mutant("/forget leaves the oldest image's answer", 'asapcli/runtime/chat.py', (
        ("start, cut = len(opening(self.system)), first + 2", "start, cut = len(opening(self.system)), first + 1"),
    ), ("tests/test_survivors.py",)),
    Mutant('FLOPs shown in a unit a thousand times too small', 'asapcli/report/display.py', (
        ('if flop_count >= 0.1 * scale:', 'if flop_count >= scale:'),
    ), ("tests/test_survivors.py",)),
    Mutant('the summary drops the merged count', 'asapcli/report/display.py', (
        ('others merged into them" if result.merged_tokens else ""', 'others merged into them" if not result.merged_tokens else ""'),
    ), ("tests/test_survivors.py",)),
    Mutant('a figure written world-writable', 'asapcli/report/figures.py', (
        ('os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())', 'os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666)'),
    ), ("tests/test_survivors.py",)),
    Mutant('a batch of one prompt labels answers with the prompt', 'asapcli/commands/run.py', (
        ('several_prompts = len({answered.prompt for answered in answers}) > 1', 'several_prompts = len({answered.prompt for answered in answers}) >= 1'),
    ), ("tests/test_survivors.py",)),
    Mutant('flops stage ranges one layer too long', 'asapcli/commands/flops.py', (
        ('f"{start}..{start + stage.layers - 1}",', 'f"{start}..{start + stage.layers}",'),
    ), ("tests/test_survivors.py",)),
    # Issue 33: the statistics, the verdict and the thread count.
    Mutant('the median interval one rank too narrow', 'asapcli/measure/stability.py', (
        ("        if 1 - 2 * after < confidence:", "        if 1 - 2 * after < confidence - 0.1:"),
    ), ("tests/test_stability.py",)),
    Mutant('the FLOPs bound judged on the median, not the interval', 'asapcli/measure/stability.py', (
        ("    if ratio is not None and ratio.high < prompt_flops_ratio:", "    if ratio is not None and ratio.median < prompt_flops_ratio:"),
    ), ("tests/test_stability.py",)),
    Mutant('a machine at its CPUs counted oversubscribed', 'asapcli/measure/stability.py', (
        ("    return demand is not None and demand > cpus + SLACK", "    return demand is not None and demand >= cpus + SLACK"),
    ), ("tests/test_stability.py",)),
    Mutant('time ratio of medians, not paired rounds', 'asapcli/measure/profiling.py', (
        ("stability.median_interval(stability.paired_ratios(result.prefill_seconds, vanilla.prefill_seconds))",
         "stability.median_interval([result.prefill.median / vanilla.prefill.median] * len(result.prefill_seconds))"),
    ), ("tests/test_stability.py",)),
    Mutant('the work runnable during the rounds ignored', 'asapcli/measure/profiling.py', (
        ("        busy=results[0].busy_cpus,", "        busy=None,"),
    ), ("tests/test_stability.py",)),
    Mutant('threads rounded, not floored past the slack', 'asapcli/runtime/machine.py', (
        ("    return max(1, min(cpus, math.floor(cpus - busy + SLACK)))", "    return max(1, min(cpus, round(cpus - busy)))"),
    ), ("tests/test_stability.py",)),
    Mutant('the reader counted as other work', 'asapcli/runtime/machine.py', (
        ("    return max(0, running - _own_runnable())", "    return max(0, running)"),
    ), ("tests/test_stability.py",)),
    Mutant('the default threads not set', 'asapcli/commands/options.py', (
        ("torch.set_num_threads(choose_threads(self.threads))", "torch.set_num_threads(self.threads or torch.get_num_threads())"),
    ), ("tests/test_stability.py",)),
    Mutant('an unstable cell not marked', 'asapcli/commands/profile.py', (
        ('    return text + "!" if Verdict(row.unstable).marks(cell) else text', '    return text'),
    ), ("tests/test_stability.py",)),
    Mutant('a decode rate from the mean step', 'asapcli/measure/profiling.py', (
        ("        return self.batch / self.decode.median", "        return self.batch * len(self.decode_step_seconds) / sum(self.decode_step_seconds)"),
    ), ("tests/test_stability.py",)),
    # Issue 36: the mutation pass's survivors, each with a test that fails on it.
    Mutant('P08 the merged count of patches unpadding cut', PRUMERGE, (
        ("item.in_span(rest).numel()", "rest.numel()"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant('T06 an adaptive count equal to the span laid out by slots', TOWER, (
        ("        if len(self.claims) >= tokens:", "        if len(self.claims) > tokens:"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant('U1 a selection written from a view of its own tensor', PRUNE_PASS, (
        ("        hidden[item.row, slots] = selection.hidden.clone()", "        hidden[item.row, slots] = selection.hidden"),
    ), ("tests/test_prumerge_plus.py",)),
    Mutant('D01 a stage counted from the stage before', PDROP, (
        ("            count = max(1, int(tokens * ratio**stage))", "            count = max(1, int(left * ratio))"),
    ), ("tests/test_pdrop.py",)),
    Mutant('S05 a table tie goes to the larger budget', SPARSEVLM, (
        ("key=lambda budget: (abs(budget - k * TABLE_TOKENS / tokens), budget))", "key=lambda budget: (abs(budget - k * TABLE_TOKENS / tokens), -budget))"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant('S06 a cluster absorbs its centre', SPARSEVLM, (
        ("for j in torch.nonzero(cluster == c).flatten() if j != centre]", "for j in torch.nonzero(cluster == c).flatten()]"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant('M01 a later stage absorbed lists left in its own numbering', PRUNE_PASS, (
        ("        item.absorbed = _absorbed(item, selection) if item.stages else selection.token_absorbed()", "        item.absorbed = selection.token_absorbed()"),
    ), ("tests/test_sparsevlm.py",)),
    Mutant('D05 stage scores read without the cached offset', DECODER, (
        ("                scores = importance[row : row + 1, cached + span.start : cached + span.stop]", "                scores = importance[row : row + 1, span.start : span.stop]"),
    ), ("tests/test_pdrop.py",)),
    Mutant('F01 a budget JSON layer from its last step', 'asapcli/measure/flops.py', (
        ("            layer=self.steps[0][0] if single else None,", "            layer=self.steps[-1][0] if single else None,"),
    ), ("tests/test_survivors_third.py",)),
    Mutant('F02 a block report keeps its last call only', "asapcli/engine/cost.py", (
        ("    return sum(count.pruned for count in counts) / full if full else 1.0", "    return counts[-1].pruned / full if full else 1.0"),
    ), ("tests/test_survivors_third.py",)),
    Mutant('H01 latex parses numbers', 'asapcli/report/display.py', (
        ('tablefmt="latex_booktabs", colalign=align, disable_numparse=True)', 'tablefmt="latex_booktabs", colalign=align)'),
    ), ("tests/test_survivors_third.py",)),
    Mutant('C01 a device pattern matched at the start only', OPTIONS, (
        ("re.fullmatch(pattern, text)", "re.match(pattern, text)"),
    ), ("tests/test_survivors_third.py",)),
    Mutant('L02 generate drops the seed', 'asapcli/api.py', (
        ("settings = PruneSettings(method, *budget_and_layer(model.preset, k, layer), seed, **options)",
         "settings = PruneSettings(method, *budget_and_layer(model.preset, k, layer), 0, **options)"),
    ), ("tests/test_survivors_third.py",)),
    Mutant('K01 forget counts turns with images, not images', CHAT, (
        ("        forgotten = sum(_images_in(message) for message in self.messages[start:cut])", "        forgotten = sum(1 for message in self.messages[start:cut] if _images_in(message))"),
    ), ("tests/test_survivors_third.py",)),
    Mutant('N12 the state after pruning kept on a cache emptied for a new sequence', CACHE_STATE, (
        ("    if state is None or held(cache, 0) == 0:", "    if state is None:"),
    ), ("tests/test_engine.py::test_a_cache_emptied_for_a_new_sequence_carries_no_pruning_state",)),
    # Issue 34: the session, the cache's own state, the seam to the attention function.
    Mutant('S01 the pruning state shared by every cache', CACHE_STATE, (
        ("        setattr(cache, ATTRIBUTE, state)", "        setattr(type(cache), ATTRIBUTE, state)"),
        ("    state = getattr(cache, ATTRIBUTE, None)\n    if state is None or", "    state = getattr(type(cache), ATTRIBUTE, None)\n    if state is None or"),
    ), ("tests/test_engine.py::test_the_pruning_state_travels_with_its_cache",)),
    Mutant('S02 a pass the attention function never saw goes unnoticed', DECODER, (
        ("            if measures and index not in prune_pass.measured:", "            if False:"),
    ), ("tests/test_engine.py::test_a_layer_that_does_not_hand_on_the_pass_fails_loudly",)),
    Mutant("S03 a hand-made batch's disagreeing plans taken", SESSION, (
        ("        if plans and any(not plan.agrees_with(plans[0]) for plan in plans):", "        if False:"),
    ), ("tests/test_batches.py::test_plans_of_one_batch_must_agree",)),
    Mutant('N17 one random pattern for every image of a prompt', RANDOM, (
        ("manual_seed(self.seed * 1_000_003 + span.start)", "manual_seed(self.seed * 1_000_003)"),
    ), ("tests/test_survivors_third.py",)),
    Mutant('N19 hidden states from the config not refused', SESSION, (
        ("            if kwargs.get(output) or getattr(self.model.config, output, False):", "            if kwargs.get(output):"),
    ), ("tests/test_survivors_third.py",)),
    Mutant('N45 an answer cut at the last stop string', 'asapcli/lmms_eval/model.py', (
        ("            text = text.split(stop, 1)[0]", "            text = text.rsplit(stop, 1)[0]"),
    ), ("-m", "lmms_eval or not lmms_eval", "tests/test_lmms_eval.py::test_an_answer_is_cut_at_the_first_stop_string")),
    # Issue 37: the compact KV cache.
    Mutant("KV01 a compact cache never cut", CACHE_STATE, (
        ("            setattr(layer, name, torch.cat([states[:, :, :before], taken], dim=2))", "            pass"),
    ), ("tests/test_compact_cache.py::test_each_layer_holds_what_each_mode_claims",)),
    Mutant("KV02 a compact cache cut in the first pruned layer too", CACHE_STATE, (
        ("    for layer in cache.layers[start:stop]:", "    for layer in cache.layers[start : stop + 1]:"),
    ), ("tests/test_compact_cache.py::test_each_layer_holds_what_each_mode_claims",)),
    Mutant("KV03 a compact cache cut to the last stage's tokens", PRUNE_PASS, (
        ("item.stages[0][0], item.stages[0][1] - chunk_start", "item.stages[0][0], item.stages[-1][1] - chunk_start"),
    ), ("tests/test_compact_cache.py::test_each_layer_holds_what_each_mode_claims",)),
    Mutant("KV04 a compact batch's padding forgotten in the cut layers", CACHE_STATE, (
        ("    state.note_padding(start, real.gather(1, order) & filled, before)", "    pass"),
    ), ("tests/test_compact_cache.py::test_a_padded_batch_with_a_compact_cache_equals_its_samples_one_by_one",)),
    Mutant("KV05 a SequenceCache reports what layer 0 holds", CACHE_STATE, (
        ("        return held + state.dropped if layer_idx == 0 and held and state is not None else held", "        return held"),
    ), ("tests/test_compact_cache.py::test_a_chat_continues_a_compact_cache",)),
    Mutant("KV06 a SequenceCache's queries placed at the sequence's length", CACHE_STATE, (
        ("        return super().get_seq_length(layer_idx)  # a query follows", "        return self.get_seq_length(layer_idx)  # a query follows"),
    ), ("tests/test_compact_cache.py::test_a_plain_cache_compacted_is_not_continued_but_a_sequence_cache_is",)),
    Mutant("KV07 chat on a plain DynamicCache", CHAT, (
        ("        return SequenceCache(config=", "        return __import__(\"transformers\").DynamicCache(config="),
    ), ("tests/test_compact_cache.py::test_a_chat_continues_a_compact_cache",)),
    Mutant("KV08 every image cut at the first step of the call's first", CACHE_STATE, (
        ("        index, real, start = index.gather(1, keep), kept_real, layer", "        break"),
    ), ("tests/test_compact_cache.py::test_spans_first_pruned_at_different_layers_are_each_cut_before_their_own",)),
    # The second mutation review of the compact cache: its survivors (M01-M25), each killed by a test now.
    Mutant("KM01 a cut after cached tokens takes the earliest ones", CACHE_STATE, (
        ("        index = (order + before)[:, None, :, None]", "        index = order[:, None, :, None]"),
    ), ("tests/test_compact_cache.py::test_a_cut_after_tokens_cached_before_keeps_those_and_what_the_call_kept",)),
    Mutant("KM08 a SequenceCache emptied reports the tokens cut before", CACHE_STATE, (
        ("if layer_idx == 0 and held and state is not None else held", "if layer_idx == 0 and state is not None else held"),
    ), ("tests/test_compact_cache.py::test_a_sequence_cache_emptied_starts_afresh",)),
    Mutant("KM10 an emptied cut cache refused a new prompt", CACHE_STATE, (
        ("    state = getattr(cache, ATTRIBUTE, None) if held(cache, 0) else None", "    state = getattr(cache, ATTRIBUTE, None)"),
    ), ("tests/test_compact_cache.py::test_a_sequence_cache_emptied_starts_afresh",)),
    Mutant("KM11 compact without a cache cuts a cache", DECODER, (
        ("        if prune_pass.method.compacts and call.use_cache:", "        if prune_pass.method.compacts:"),
    ), ("tests/test_compact_cache.py::test_compact_without_a_cache_or_with_a_bare_one",)),
    Mutant("KM16 profile's vanilla said exact", "asapcli/measure/profiling.py", (
        ('kv_cache=settings.method.options().get("kv_cache"),', 'kv_cache=settings.method.options().get("kv_cache", "exact"),'),
    ), ("tests/test_compact_cache.py::test_profile_says_which_runs_were_compact",)),
    Mutant("KM18 profile's title says compact only when every row is", "asapcli/commands/profile.py", (
        ('    if any(row.kv_cache == "compact" for row in rows):', '    if all(row.kv_cache == "compact" for row in rows):'),
    ), ("tests/test_compact_cache.py::test_profile_says_which_runs_were_compact",)),
    Mutant("KM20 /forget starts a plain cache", CHAT, (
        ("        self.cache = self._new_cache()\n        self.seen = []\n        return cut - start",
         "        self.cache = __import__(\"transformers\").DynamicCache(config=self.loaded.model.config.get_text_config())\n        self.seen = []\n        return cut - start"),
    ), ("tests/test_compact_cache.py::test_chat_keeps_a_sequence_cache_when_it_starts_over",)),
    Mutant("KM22 sparsevlm compact by default", SPARSEVLM, (
        ('    kv_cache: str = "exact"', '    kv_cache: str = "compact"'),
    ), ("tests/test_compact_cache.py::test_every_method_that_takes_it_defaults_to_exact",)),
    Mutant("KM24 a padded batch's sequence counted by its real tokens", CACHE_STATE, (
        ("                state.shortened(why, chunk - width)", "                state.shortened(why, chunk - int(real.sum()))"),
    ), ("tests/test_compact_cache.py::test_a_padded_batch_on_a_sequence_cache_reports_the_sequences_length",)),
    Mutant("KM25 a bare cache's layers read past their end", CACHE_STATE, (
        ("    if cache is None or layer >= len(cache.layers):", "    if cache is None or layer > len(cache.layers):"),
    ), ("tests/test_compact_cache.py::test_compact_without_a_cache_or_with_a_bare_one",)),
    # The hostile pass of chat with every method (session 16).
    Mutant("KH1 after /forget the images left go without their pixels", CHAT, (
        ("                _with_images_from(features, cached_images),", "                _with_images_from(features, len(images) - len(new_images)),"),
    ), ("tests/test_chat.py::test_after_forget_the_images_left_are_read_again_with_their_pixels",)),
    Mutant("KH2 /k not checked against the model's tiles", CHAT, (
        ("        check_tiles(self.loaded.name, [settings])", "        pass"),
    ), ("tests/test_chat.py::test_k_set_in_chat_is_checked_as_minus_k_is",)),
    Mutant("KH3 chat's banner says the L asked for", "asapcli/commands/chat.py", (
        ("L={settings.first_layer}{compact}", "L={settings.layer}{compact}"),
    ), ("tests/test_chat.py::test_k_set_in_chat_is_checked_as_minus_k_is",)),
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


class NoLongerMatches(Exception):
    """A mutant's text does not occur exactly once in its file."""


def mutated(text: str, mutant: Mutant) -> str:
    """`text` (the file's) with the mutant's edits made, in turn; NoLongerMatches names the first
    edit whose text does not occur exactly once."""
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise NoLongerMatches(f"mutant {mutant.name!r}: {old!r} occurs {count} times in {mutant.file}")
        text = text.replace(old, new)
    return text


def broken_patterns(mutants: list[Mutant]) -> list[str]:
    """Why each mutant that no longer applies to the working tree does not."""
    problems = []
    for mutant in mutants:
        path = REPO / mutant.file
        if not path.is_file():
            problems.append(f"mutant {mutant.name!r}: {mutant.file} does not exist")
            continue
        try:
            mutated(path.read_text(), mutant)
        except NoLongerMatches as error:
            problems.append(str(error))
    return problems


def apply(copy: Path, mutant: Mutant) -> None:
    path = copy / mutant.file
    path.write_text(mutated(path.read_text(), mutant))


def run_tests(copy: Path, tests: list[str]) -> tuple[bool, str]:
    """Run `tests` in `copy` (its asapcli imported first), stopping at the first failure;
    (passed, the failing test or the last line)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(copy))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=copy, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failed = next((line for line in lines if line.startswith("FAILED")), lines[-1] if lines else "")
    return result.returncode == 0, failed


def tests_for(mutant: Mutant, own_only: bool) -> list[str]:
    """The mutant's own tests first, then the rest of TESTS (or its own only, where it names some)."""
    if own_only and mutant.tests:
        return list(mutant.tests)
    own_files = {test.split("::")[0] for test in mutant.tests if "::" not in test}
    return [*mutant.tests, *(test for test in TESTS if test not in own_files)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutants whose name contains this text")
    parser.add_argument(
        "--own-tests", action="store_true", help="run each mutant's own tests only, where it names some"
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or args.only.lower() in m.name.lower()]
    if args.list:
        print("\n".join(m.name for m in mutants))
        return 0
    if not mutants:
        print(f"no mutant's name contains {args.only!r}")
        return 2
    problems = broken_patterns(mutants)
    if problems:
        print("\n".join(problems))
        print("these mutants no longer match the code: update their text to the code's (each must occur once)")
        return 2
    started = time.perf_counter()
    baseline = scratch_copy()
    try:
        tests = TESTS if not args.own_tests else sorted({t for m in mutants for t in tests_for(m, True)})
        passed, line = run_tests(baseline, tests)
        if not passed:
            print(f"the unmutated tests fail, fix them first: {line}")
            return 2
    finally:
        shutil.rmtree(baseline)
    survivors = []
    for mutant in mutants:
        copy = scratch_copy()
        began = time.perf_counter()
        try:
            apply(copy, mutant)
            passed, line = run_tests(copy, tests_for(mutant, args.own_tests))
        finally:
            shutil.rmtree(copy)
        verdict = "SURVIVED" if passed else "killed  "
        print(f"{verdict} {mutant.name} ({time.perf_counter() - began:.0f} s){'' if passed else ': ' + line}")
        sys.stdout.flush()
        if passed:
            survivors.append(mutant.name)
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(mutants) - len(survivors)} of {len(mutants)} mutants killed in {minutes:.1f} min")
    if survivors:
        print("survived (no test failed):\n" + "\n".join(f"  {name}" for name in survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
