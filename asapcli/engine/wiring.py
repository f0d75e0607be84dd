"""How the pruned decoder is wired into a transformers LVLM: install and uninstall it, check that
the engine can drive a model."""

from __future__ import annotations

from transformers import PreTrainedModel

from ..errors import UnsupportedModel
from . import attention
from .decoder import PrunedDecoder


def install(model: PreTrainedModel) -> PrunedDecoder:
    """Route the language model through `PrunedDecoder` and the registered attention function.
    Only the text model's attention changes; the vision tower keeps its own. Idempotent."""
    decoder = _language_model(model)
    if isinstance(decoder, PrunedDecoder):
        return decoder
    check_supported(model)
    previous = model.config.get_text_config()._attn_implementation
    _set_text_attention(model, attention.register())
    pruned = PrunedDecoder(decoder, replaced_attention=previous)
    model.set_decoder(pruned)
    return pruned


def uninstall(model: PreTrainedModel) -> None:
    """Undo `install`: the model's own decoder and text attention back, as from_pretrained made
    them. Nothing to do on a model without the pruned decoder."""
    decoder = _language_model(model)
    if isinstance(decoder, PrunedDecoder):
        model.set_decoder(decoder.decoder)
        _set_text_attention(model, decoder.replaced_attention)


def _set_text_attention(model: PreTrainedModel, name: str) -> None:
    has_text_config = "text_config" in model.config.sub_configs
    model.set_attn_implementation({"text_config": name} if has_text_config else name)


DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def check_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedModel naming what the engine cannot drive in `model`: a language model
    not built as embeddings, layers, norm and one rotary embedding, or layers that attend
    otherwise than fully and causally (sliding windows, soft-capped or chunked attention).
    Checked before anything is changed."""
    name = type(model).__name__
    decoder = _language_model(model)
    missing = [part for part in DECODER_PARTS if not hasattr(decoder, part)]
    if missing:
        raise UnsupportedModel(
            f"{name}: its language model {type(decoder).__name__} has no {', '.join(missing)}; the engine drives "
            f"decoders made of {', '.join(DECODER_PARTS)} (Llama, Mistral, Qwen style)"
        )
    text = model.config.get_text_config()
    other = sorted(set(getattr(text, "layer_types", None) or ()) - {"full_attention"})
    # Mistral-style configs (Mistral, Mixtral, Phi-3, Starcoder2) slide whenever `sliding_window`
    # is set, with no layer_types; a window that spans the whole context never cuts anything.
    window = getattr(text, "sliding_window", None)
    context = getattr(text, "max_position_embeddings", None)
    windowed = window is not None and not (isinstance(context, int) and window >= context)
    if other or windowed or getattr(text, "use_sliding_window", False):
        raise UnsupportedModel(
            f"{name} has {', '.join(other) or f'sliding-window ({window} tokens)'} layers; the pruning engine "
            "supports full causal attention in every layer only (sliding windows are not supported yet)"
        )
    for option in ("attn_logit_softcapping", "attention_chunk_size"):  # Gemma-2, Llama-4: not in SDPA
        if getattr(text, option, None) is not None:
            raise UnsupportedModel(
                f"{name} sets {option}; the pruning engine computes plain scaled-dot-product attention only"
            )


def _language_model(model: PreTrainedModel):
    try:
        return model.get_decoder()
    except (AttributeError, NotImplementedError) as error:
        raise UnsupportedModel(f"{type(model).__name__} does not expose its language model (get_decoder)") from error
