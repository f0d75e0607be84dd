"""Images and question files as the user means them: the file named (never a pattern's other match),
upright as viewers show it, high-bit-depth greyscale scaled rather than clipped; a named pipe refused
rather than waited on, standard input read; question lines that are no question named by line, lists
of accepted answers scored."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asapcli.errors import AsapError
from asapcli.measure.evaluation import correct
from asapcli.measure.questions import read_items
from asapcli.runtime.inputs import expand_images, load_image

RED, BLUE = (200, 30, 30), (30, 30, 200)


def test_an_existing_file_is_that_file_whatever_its_name(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "photo[1].png")
    only_real = expand_images([str(tmp_path / "photo[1].png")])
    assert only_real == [tmp_path / "photo[1].png"]
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "photo1.png")  # what the glob [1] matches
    assert expand_images([str(tmp_path / "photo[1].png")]) == [tmp_path / "photo[1].png"]
    assert load_image(expand_images([str(tmp_path / "photo[1].png")])[0]).getpixel((0, 0)) == RED
    assert expand_images([str(tmp_path / "photo?.png")]) == [tmp_path / "photo1.png"]  # a pattern still expands


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # stored sideways: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    stored.save(tmp_path / "phone.png", exif=exif)
    upright = load_image(tmp_path / "phone.png")
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5)) == RED and upright.getpixel((10, 35)) == BLUE


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png")
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (127, 127, 127), (255, 255, 255)]


@pytest.mark.parametrize(
    "array, message",
    [(np.array([[0, 1 << 20]], dtype=np.int32), "32-bit integer pixels"), (np.ones((2, 2), np.float32), "floating")],
)
def test_pixels_that_cannot_be_shown_in_8_bits_are_refused(tmp_path, array, message):
    Image.fromarray(array).save(tmp_path / "deep.tiff")
    with pytest.raises(AsapError, match=message):
        load_image(Path(tmp_path / "deep.tiff"))


def test_an_image_past_pils_warning_size_reads_quietly(tmp_path, monkeypatch):
    """Up to twice PIL's pixel limit an image opens with a warning: it is read like any other."""
    import warnings

    Image.new("RGB", (60, 50), (200, 0, 0)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3000 pixels: past 1x, under 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "big.png").size == (60, 50)


def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO that nobody writes to blocks forever: it is refused in words before that (in a
    process of its own, so that a regression fails on the timeout instead of hanging the suite)."""
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    script = "import sys; from asapcli.runtime.inputs import load_image; load_image(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", script, str(fifo)], capture_output=True, timeout=120, check=False)
    assert "is not a regular file (a named pipe or a device)" in result.stderr.decode()


def test_standard_input_still_reads_a_piped_image():
    car = Path(__file__).resolve().parents[1] / "examples" / "car.png"
    script = "import sys; from asapcli.runtime.inputs import load_image; print(load_image(sys.argv[1]).size)"
    with open(car, "rb") as stdin:  # a redirect: stdin is the file itself
        redirected = subprocess.run(
            [sys.executable, "-c", script, "/dev/stdin"], stdin=stdin, capture_output=True, check=False
        )
    piped = subprocess.run(  # a pipe: stdin is a FIFO, and the one allowed
        [sys.executable, "-c", script, "/dev/stdin"], input=car.read_bytes(), capture_output=True, check=False
    )
    size = str(Image.open(car).size)
    assert redirected.stdout.decode().strip() == size, redirected.stderr.decode()[-500:]
    assert piped.stdout.decode().strip() == size, piped.stderr.decode()[-500:]


def write_lines(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize(
    "image, message",
    [
        (None, "missing or empty image"),
        ({"path": "car.png"}, 'image must be a non-empty string, got {"path": "car.png"}'),
        ("http://example.com/a.png", "image URLs are not supported (http://example.com/a.png)"),
    ],
)
def test_a_question_line_with_an_image_that_is_no_path_names_its_line(tmp_path, image, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "car.png")
    good = {"image": "car.png", "question": "what colour?", "answer": "red"}
    data = write_lines(tmp_path / "q.jsonl", good, {**good, "image": image})
    with pytest.raises(AsapError) as refused:
        read_items(data)
    assert str(refused.value).startswith(f"{data}:2: {message}")


def test_a_list_of_accepted_answers_scores_any_of_them(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "car.png")
    data = write_lines(
        tmp_path / "q.jsonl", {"image": "car.png", "question": "what colour?", "answer": ["crimson", "Red"]}
    )
    (item,) = read_items(data)
    assert item.answer == ("crimson", "Red")
    assert correct("red", item.answer) and correct("crimson", item.answer) and not correct("blue", item.answer)
    bad = write_lines(tmp_path / "bad.jsonl", {"image": "car.png", "question": "q", "answer": ["red", 3]})
    with pytest.raises(AsapError, match=r'answer must be a string or a list of strings .*got \["red", 3\]'):
        read_items(bad)


def test_questions_piped_into_dev_stdin_name_images_from_the_current_folder(tmp_path):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "car.png")
    line = json.dumps({"image": "car.png", "question": "what colour?", "answer": "red"})
    script = "from asapcli.measure.questions import read_items; print(read_items('/dev/stdin')[0].image)"
    result = subprocess.run(
        [sys.executable, "-c", script], input=line.encode(), capture_output=True, cwd=tmp_path, check=False
    )
    assert result.stdout.decode().strip() == str(tmp_path / "car.png"), result.stderr.decode()[-500:]
