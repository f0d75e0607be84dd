"""lmms-eval's model `asap`: a transformers LVLM loaded as the CLI loads it (a preset, a folder or a
hub id), answering every question inside `asapcli.pruned(...)` with the prompt `asap eval` builds
(the model's chat template, the image first, the task's text as the user's words).

    python -m asapcli.lmms_eval --model asap \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=asap,k=128,layer=2 --tasks gqa

Every --model_args value is checked before the model loads: a bad one stops the run with
asap's own message (a UsageError), never a run with some other setting.
"""

from __future__ import annotations

import itertools
import math

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from ..engine import cost
from ..errors import AsapError, UsageError
from ..runtime.generation import GenerationResult, generate_batch
from ..runtime.inputs import build_batch_inputs
from ..runtime.loading import load
from ..runtime.machine import choose_threads
from .arguments import ModelArgs, whole


class Asap(lmms):
    is_simple = True

    def __init__(self, batch_size=1, max_batch_size=None, **model_args):
        super().__init__()
        self.batch_size_per_gpu = whole(batch_size, "batch_size")
        args = ModelArgs.parse(model_args)
        self.accelerator = Accelerator()
        device = args.device
        if self.accelerator.num_processes > 1:
            # lmms-eval's data parallelism: every process a whole model on its own GPU, the
            # questions split between them by rank.
            if args.device_map is not None:
                raise UsageError(
                    "device_map spreads one model over every visible GPU: use it in one process, "
                    "not under accelerate launch with several (each would take every GPU)"
                )
            if device == "auto" and args.device_map is None and torch.cuda.is_available():
                device = f"cuda:{self.accelerator.local_process_index}"
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        torch.set_num_threads(choose_threads(args.threads))  # as the CLI: none that oversubscribe the CPUs
        self.loaded = load(args.pretrained, device=device, dtype=args.dtype, device_map=args.device_map)
        self.prune = args.settings(self.loaded)
        logger.info(f"asap: {args.pretrained} on {self.loaded.device}, {self.prune}")

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's answer, in order: requests with the same generation options are answered
        `batch_size` at a time, as one left-padded batch (each row its own pruning)."""
        answers: list[str] = []
        results: list[GenerationResult] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for _, same_options in itertools.groupby(requests, key=lambda request: repr(request.args[1])):
            same_options = list(same_options)
            for start in range(0, len(same_options), self.batch_size):
                group = same_options[start : start + self.batch_size]
                answered = self._answer(group)
                answers += [_cut(result.text, _until(group[0])) for result in answered]
                results += answered
                progress.update(len(group))
        progress.close()
        visual = sum(result.visual_tokens for result in results)
        if visual:
            kept, merged = sum(r.kept_tokens for r in results), sum(r.merged_tokens for r in results)
            logger.info(
                f"asap: {kept}/{visual} visual tokens kept ({merged} merged), "
                f"FLOPs {100 * cost.eq8(result.flops for result in results):.1f}% of vanilla (Eq. 8)"
            )
        return answers

    def _answer(self, group: list[Instance]) -> list[GenerationResult]:
        """The answers to a group of requests with the same options, as asap eval answers them:
        its prompts, one padded batch, the same generation (seeded as asap run --seed)."""
        options = dict(group[0].args[1])
        samples = []
        for request in group:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                raise AsapError(
                    f"task {task}: question {doc_id} brings {len(visuals)} images; the asap model answers one per question"
                )
            samples.append((context, visuals[0].convert("RGB")))
        inputs = build_batch_inputs(self.loaded.processor, samples)
        max_tokens = whole(options.get("max_new_tokens", 10), "max_new_tokens")
        sampling = _sampling(options)
        return generate_batch(
            self.loaded, inputs, self.prune, max_tokens=max_tokens, seed=self.prune.seed, options=sampling
        )

    def loglikelihood(self, requests):
        raise NotImplementedError("the asap model generates answers; it does not score given continuations")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the asap model answers single-round questions")


def _sampling(options: dict) -> dict:
    """Greedy, as asap eval answers, unless the task asks for sampling with a temperature."""
    if int(options.get("num_beams", 1) or 1) > 1:
        raise UsageError("the asap model decodes greedily or by sampling; beam search (num_beams > 1) is not supported")
    temperature = float(options.get("temperature", 0) or 0)
    if not options.get("do_sample") or temperature <= 0 or math.isnan(temperature):
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": float(options.get("top_p", 1.0) or 1.0)}


def _until(request: Instance) -> list[str]:
    """The task's stop strings for a request."""
    until = request.args[1].get("until")
    return [until] if isinstance(until, str) else list(until or [])


def _cut(text: str, until: list[str]) -> str:
    """The answer up to the first of the task's stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()
