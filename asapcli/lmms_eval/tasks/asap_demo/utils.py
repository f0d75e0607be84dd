"""The task's document -> model input functions (lmms-eval loads this file by its path)."""

from pathlib import Path

from asapcli.runtime.inputs import load_image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [load_image(HERE / doc["image"])]  # as `asap eval --data` reads it


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    prompts = lmms_eval_specific_kwargs or {}
    return f"{prompts.get('pre_prompt', '')}{doc['question']}{prompts.get('post_prompt', '')}"
