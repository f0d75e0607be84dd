"""The answer streams as it comes, in time linear in its length, and adds up to the whole decode."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from asapcli.runtime.streaming import TextStream


class CountingTokenizer:
    """Decodes id i as chr(i), noting how many ids every call decodes."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return "".join(chr(i) for i in ids)


def stream(tokenizer, ids: list[int]) -> str:
    pieces: list[str] = []
    streamer = TextStream(tokenizer, pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() hands over first
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return "".join(pieces)


def test_streaming_decodes_each_token_a_bounded_number_of_times():
    tokenizer = CountingTokenizer()
    ids = [ord("a") + i % 26 for i in range(2000)]
    assert stream(tokenizer, ids) == "".join(chr(i) for i in ids)
    assert tokenizer.decoded <= 4 * len(ids)  # re-decoding everything each step: about n^2 / 2


def test_streamed_pieces_add_up_to_the_whole_answer():
    # The demo model's tokenizer, and the bench preset's character-level one.
    from pathlib import Path

    import asapcli
    from asapcli.runtime.random_model import char_tokenizer

    demo = AutoTokenizer.from_pretrained(Path(asapcli.__file__).parent / "demo" / "model")
    for tokenizer in (demo, char_tokenizer()):
        text = "A red car, two  blue ones; the sky is grey. Où?"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert stream(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_split_multibyte_character_waits_for_its_last_byte():
    class Bytes(CountingTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", "replace")

    ids = list("é and ü".encode())
    pieces: list[str] = []
    streamer = TextStream(Bytes(), pieces.append)
    streamer.put(torch.tensor([[0]]))
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == "é and ü" and all("\ufffd" not in piece for piece in pieces)
