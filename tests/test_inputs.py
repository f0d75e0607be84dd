"""Images as the user means them: the file named (never a pattern's other match), upright as
viewers show it, high-bit-depth greyscale scaled rather than clipped."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asapcli.errors import AsapError
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
