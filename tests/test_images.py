import re
from pathlib import Path

import numpy as np
import pytest

from embeddings.images import ImageError, decode_image, load_image, read_header, read_image_bytes
from tests import corpus


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    corpus.build(root)
    return root / "img"


@pytest.mark.parametrize("name", ["ok_rgb.png", "cmyk.jpg", "gray16.png", "palette_alpha.png",
                                  "rgba.png", "exif_rotated.jpg", "animated.gif"])
def test_awkward_modes_become_8bit_rgb(img: Path, name: str) -> None:
    im = load_image(img / name)
    assert im.mode == "RGB"
    assert np.asarray(im).dtype == np.uint8


def test_exif_rotation_is_applied(img: Path) -> None:
    assert load_image(img / "ok_rgb.png").size == (48, 32)
    assert load_image(img / "exif_rotated.jpg").size == (32, 48)


def test_alpha_is_composited_on_white(img: Path) -> None:
    px = np.asarray(load_image(img / "rgba.png")).astype(int)
    src = np.asarray(load_image(img / "ok_rgb.png")).astype(int)
    # 50% alpha over white: halfway between the colour and 255.
    assert np.abs(px - (src + 255) / 2).max() <= 2


def test_sixteen_bit_is_scaled_not_clipped(img: Path) -> None:
    px = np.asarray(load_image(img / "gray16.png"))[..., 0]
    assert px.max() > 200 and len(np.unique(px)) > 50  # not saturated to 255 everywhere


def test_animated_gif_gives_first_frame(img: Path) -> None:
    assert tuple(np.asarray(load_image(img / "animated.gif"))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("name,reason", [
    ("nope.png", "missing file"), ("zero_byte.png", "empty file"),
    ("truncated.png", "corrupt or truncated image"), ("not_image.jpg", "not an image"),
])
def test_bad_files_raise_with_reason(img: Path, name: str, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        load_image(img / name)


def test_pixel_budget_refuses_before_decoding(img: Path) -> None:
    with pytest.raises(ImageError, match="image too large: 2000x2000"):
        load_image(img / "bomb.png", max_pixels=corpus.BOMB_PIXELS_LIMIT)
    assert load_image(img / "bomb.png").size == (2000, 2000)  # fine under the default


def test_bytes_decode_exactly_like_the_path(img: Path) -> None:
    for p in sorted(img.iterdir()):
        try:
            want = np.asarray(load_image(p))
        except ImageError as e:
            with pytest.raises(ImageError, match=re.escape(str(e).split(":")[0])):
                decode_image(read_image_bytes(p))
            continue
        assert np.array_equal(np.asarray(decode_image(read_image_bytes(p))), want), p.name


def test_header_says_what_the_fast_path_needs(img: Path) -> None:
    head = read_header(read_image_bytes(img / "exif_rotated.jpg"))
    assert (head.format, head.width, head.height, head.orientation) == ("JPEG", 48, 32, 6)
    assert read_header(read_image_bytes(img / "cmyk.jpg")).mode == "CMYK"
    assert read_header(read_image_bytes(img / "ok_rgb.png")).format == "PNG"


@pytest.mark.parametrize("name,reason", [
    ("nope.png", "missing file"), ("zero_byte.png", "empty file"),
    ("not_image.jpg", "not an image"),
])
def test_header_checks_give_the_same_reasons(img: Path, name: str, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        read_header(read_image_bytes(img / name))


def test_header_applies_the_pixel_budget(img: Path) -> None:
    with pytest.raises(ImageError, match="image too large: 2000x2000"):
        read_header(read_image_bytes(img / "bomb.png"), max_pixels=corpus.BOMB_PIXELS_LIMIT)
