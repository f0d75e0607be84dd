"""Train the bundled demo model from scratch on synthetic scenes (seeded, resumable).

    python -m asapcli.demo.train --out runs/demo            # resumes from runs/demo/checkpoint.pt
    python -m asapcli.demo.train --out runs/demo --export asapcli/demo/model

The model is a genuine transformers LLaVA (CLIP-style tower, projector, Llama with RoPE) built
by `random_model`, 96 px images in 4 px patches = 576 visual tokens. Training has two parts:
the first `--vision-steps` steps teach the tower and projector to name the sprite (kind and
colour) under each patch, through a linear head on the projected features; then the question
loss (answer tokens only; every question of an image in one multi-turn sequence) trains
everything, the patch loss kept beside it. From step 10,700 on, a second head asks each
patch's feature for its row: RoPE tells attention where a key sits but the value it passes on
carries no position, so "is the car at the top?" needs the car's features to say where they
are, which naming kind and colour alone never asks of them. The tokenizer has one token per
word of the scenes' world (`word_tokenizer`). The heads are not part of the exported model.

Batches are drawn from a stream seeded by the step number, so a resumed run sees the same data
as an uninterrupted one. A checkpoint (model, heads, optimiser, step) is written atomically
every `--checkpoint-every` steps.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import decoders, normalizers, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from ..runtime.random_model import LlavaShape, build_llava, word_level_tokenizer
from . import scenes

SHAPE = LlavaShape(
    layers=4,
    hidden=128,
    intermediate=384,
    heads=4,
    kv_heads=4,
    image_size=scenes.SIZE,
    patch_size=scenes.PATCH,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=2,
    max_positions=1024,
)


TEMPLATE_WORDS = ("user", "assistant", ":", "?", ".", ",")
GRID = scenes.SIZE // scenes.PATCH  # patches per row and per column


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of the scenes' world, lower-cased, punctuation apart; any other word
    is <unk>. Words as tokens spare a 4-layer model the work of spelling them out of characters,
    and an answer is one token and the end of text."""
    return word_level_tokenizer(
        [*TEMPLATE_WORDS, *scenes.WORDS],
        pre_tokenizers.Whitespace(),  # words and runs of punctuation
        decoders.WordPiece(prefix="##"),  # joins tokens with spaces
        normalizers.Lowercase(),
    )


def conversation(questions: list[scenes.Question], with_answers: bool) -> list[dict]:
    """The image, then the questions in turn; with their answers for training."""
    messages = []
    for index, question in enumerate(questions):
        content = [{"type": "image"}] if index == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question.text}]})
        if with_answers:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": question.answer}]})
    return messages


def batch(processor, scene_questions: list[list[scenes.Question]]) -> dict[str, torch.Tensor]:
    """Token ids, attention mask, pixels, answer-only labels and patch labels: one sequence per
    scene, holding all of its questions and answers."""
    texts = [processor.apply_chat_template(conversation(asked, True)) for asked in scene_questions]
    images = [asked[0].scene.render() for asked in scene_questions]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    ids, tokenizer = inputs["input_ids"], processor.tokenizer
    # Labels: each answer token and the end of text after it, found after every "assistant :".
    assistant, colon = tokenizer.convert_tokens_to_ids(["assistant", ":"])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 2:] = (ids[:, :-2] == assistant) & (ids[:, 1:-1] == colon)
    labels = torch.full_like(ids, -100)
    labels[answer] = ids[answer]
    ends = torch.zeros_like(answer)
    ends[:, 1:] = answer[:, :-1]
    labels[ends] = ids[ends]
    inputs["labels"] = labels
    inputs["patch_labels"] = torch.tensor([asked[0].scene.patch_labels() for asked in scene_questions])
    return inputs


def losses(model, heads: nn.ModuleDict, inputs: dict[str, torch.Tensor], vision_only: bool) -> dict[str, torch.Tensor]:
    features = torch.stack(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    patch = nn.functional.cross_entropy(heads["patch"](features).flatten(0, 1), inputs["patch_labels"].flatten())
    rows = torch.arange(features.shape[1], device=features.device) // GRID  # row-major patches
    row = nn.functional.cross_entropy(heads["row"](features).flatten(0, 1), rows.repeat(features.shape[0]))
    vision = 0.5 * (patch + row)
    if vision_only:
        return {"patch": patch, "row": row, "total": vision}
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    image_positions = inputs["input_ids"] == model.config.image_token_id
    embeds = embeds.masked_scatter(image_positions[..., None], features.to(embeds.dtype))
    answer = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"]).loss
    return {"patch": patch, "row": row, "answer": answer, "total": answer + vision}


@torch.no_grad()
def evaluate(model, processor, count: int) -> dict[str, float]:
    """Greedy answers to `count` held-out questions, exact match, accuracy per type."""
    model.eval()
    hits, totals = defaultdict(int), defaultdict(int)
    for question in scenes.questions(scenes.EVAL_SEED, count):
        text = processor.apply_chat_template(conversation([question], False), add_generation_prompt=True)
        inputs = processor(text=text, images=[question.scene.render()], return_tensors="pt")
        output = model.generate(
            **inputs, max_new_tokens=10, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        totals[question.type] += 1
        hits[question.type] += scenes.normalise(answer) == question.answer
    model.train()
    return {kind: hits[kind] / totals[kind] for kind in totals}


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100, decay_steps: int | None = None) -> float:
    """Linear warm-up, cosine decay to a tenth of the peak at `decay_steps` (default: the last
    step), then a linear cool-down to zero at `steps`."""
    decay_steps = steps if decay_steps is None else decay_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if step > decay_steps:
        return 0.1 * peak * (steps - step) / max(1, steps - decay_steps)
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Run folder: checkpoint and log.")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--decay-steps",
        type=int,
        help="End of the cosine decay; from there a linear cool-down to zero (default: --steps).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-count", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--export", type=Path, help="Save the trained model with save_pretrained here and stop.")
    return parser.parse_args()


@dataclass
class _Run:
    """What training carries from step to step, and resumes from its checkpoint."""

    model: nn.Module
    processor: object
    heads: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    checkpoint: Path
    step: int = 0

    def save(self) -> None:
        """The checkpoint, written whole or not at all (a run killed mid-write keeps the last)."""
        temporary = self.checkpoint.with_suffix(".tmp")
        state = {"model": self.model.state_dict(), "heads": self.heads.state_dict()}
        torch.save(state | {"optimizer": self.optimizer.state_dict(), "step": self.step}, temporary)
        temporary.replace(self.checkpoint)


def _start(args: argparse.Namespace, device: torch.device) -> _Run:
    """The model, its probe heads and optimizer, resumed from the run folder's checkpoint if any."""
    model, processor = build_llava(SHAPE, seed=args.seed, tokenizer=word_tokenizer())
    model = model.to(device).train()
    heads = nn.ModuleDict(
        {"patch": nn.Linear(SHAPE.hidden, scenes.NUM_PATCH_LABELS), "row": nn.Linear(SHAPE.hidden, GRID)}
    ).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads["patch"].parameters()], lr=args.lr, weight_decay=0.01)
    optimizer.add_param_group({"params": list(heads["row"].parameters())})  # its own group: it came later (10,700)
    run = _Run(model, processor, heads, optimizer, args.out / "checkpoint.pt")
    if run.checkpoint.exists():
        state = torch.load(run.checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        run.step = state["step"]
        print(f"resumed at step {run.step}", flush=True)
    return run


def _train_step(run: _Run, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """One optimiser step on a fresh batch of scenes; its losses."""
    asked = scenes.scene_questions(args.seed * 1_000_003 + run.step, args.batch)
    inputs = {key: value.to(device) for key, value in batch(run.processor, asked).items()}
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.step, args.steps, args.lr, decay_steps=args.decay_steps)
    loss = losses(run.model, run.heads, inputs, vision_only=run.step < args.vision_steps)
    run.optimizer.zero_grad(set_to_none=True)
    loss["total"].backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.step += 1
    return {name: value.item() for name, value in loss.items()}


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = _start(args, device)
    if args.export:
        run.model.eval().save_pretrained(args.export)
        run.processor.save_pretrained(args.export)
        print(f"exported step {run.step} to {args.export}", flush=True)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    started, window = time.perf_counter(), defaultdict(float)
    while run.step < args.steps:
        for name, value in _train_step(run, args, device).items():
            window[name] += value
        step = run.step
        if step % 20 == 0:
            elapsed = time.perf_counter() - started
            means = " ".join(f"{name} {total / 20:.3f}" for name, total in window.items())
            lr = run.optimizer.param_groups[0]["lr"]
            print(f"step {step}/{args.steps} {means} lr {lr:.2e} {elapsed / 20:.2f} s/step", flush=True)
            started, window = time.perf_counter(), defaultdict(float)
        if step % args.checkpoint_every == 0 or step == args.steps:
            run.save()
        if step % args.eval_every == 0 and step >= args.vision_steps:
            accuracy = evaluate(run.model, run.processor, args.eval_count)
            print(
                f"eval step {step}: " + " ".join(f"{kind} {value:.1%}" for kind, value in accuracy.items()), flush=True
            )


if __name__ == "__main__":
    main()
