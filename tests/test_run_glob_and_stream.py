"""What `asap run` reads and writes in the user's order: a quoted glob expands to its files in
sorted order (so each image meets the prompt given for it, whatever order the filesystem lists
them in), and the streamed text adds up to the answer even when it ends inside a character."""

import json

import torch
from PIL import Image

from asapcli.runtime.streaming import TextStream

# Made in neither sorted nor reverse order, so neither a filesystem that lists by creation
# nor one that lists by hash is likely to list them sorted.
NAMES = ["c", "a", "e", "b", "d"]


def test_a_glob_pairs_its_files_in_sorted_order_with_the_prompts(asap, llava_path, tmp_path):
    for index, name in enumerate(NAMES):
        Image.new("RGB", (24 + 4 * index, 24), (40 * index, 200 - 30 * index, 90)).save(tmp_path / f"{name}.png")
    prompts = [f"what is in {name}?" for name in sorted(NAMES)]
    arguments = [tmp_path / "*.png", "-m", llava_path, "-k", 8, "--max-tokens", 1, "--json"]
    result = asap("run", *arguments[:1], *[part for prompt in prompts for part in ("-p", prompt)], *arguments[1:])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["image"], row["prompt"]) for row in rows] == [
        (str(tmp_path / f"{name}.png"), f"what is in {name}?") for name in sorted(NAMES)
    ]


class Bytes:
    """A byte-level tokenizer: id i is byte i."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", "replace")


def test_an_answer_cut_inside_a_character_streams_all_of_its_text():
    """max_tokens can end an answer on the first byte of a two-byte character: the answer's
    text ends in U+FFFD, and so must what was streamed."""
    ids = list("café".encode())[:-1]  # 'caf' and the first byte of 'é'
    pieces: list[str] = []
    streamer = TextStream(Bytes(), pieces.append)
    streamer.put(torch.tensor([[0]]))  # the prompt, which generate() hands over first
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == Bytes().decode(ids) == "caf\ufffd"
