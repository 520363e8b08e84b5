"""The fast decode path against the exact one (the oracle: PIL + open_clip preprocess).

Photos are scikit-image's sample photographs saved as 640x480 JPEGs; agreement is
measured as PSNR of the preprocessed tensors (in pixel units, [0, 1]) and cosine of the
embeddings from the ViT-B-32 architecture (random weights: no download).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from PIL import Image

from embeddings.decode import DECODERS, decode_provenance, iter_pixels, resolve_decode
from embeddings.decode_fast import FastCollate, JpegFiles, Preprocess, _decode_gpu, pixel_dtype
from embeddings.encode import iter_image_embeddings
from embeddings.encoders import EncoderSpec, load_encoder, write_tiny_open_clip
from embeddings.errors import InputError
from tests import corpus

CPU = torch.device("cpu")
PHOTOS = ("astronaut", "coffee", "chelsea")


def save_photo(name: str, path: Path, size: tuple[int, int] = (640, 480), **kw: object) -> Path:
    im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    im.resize(size, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90, **kw)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        save_photo(name, root / f"{name}.jpg")
    save_photo("astronaut", root / "portrait.jpg", (480, 640))
    save_photo("coffee", root / "small.jpg", (300, 200))  # below 2x: no draft mode
    save_photo("chelsea", root / "progressive.jpg", progressive=True)
    Image.open(root / "coffee.jpg").convert("L").save(root / "grey.jpg", quality=90)
    Image.open(root / "coffee.jpg").save(root / "coffee.png")
    Image.open(root / "chelsea.jpg").convert("CMYK").save(root / "cmyk.jpg", quality=90)
    data = (root / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    broken = bytearray(data)
    broken[2000:2400] = bytes(b ^ 0x5A for b in broken[2000:2400])
    (root / "corrupt.jpg").write_bytes(bytes(broken))
    return root


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny_open_clip(tmp_path_factory.mktemp("vit") / "vit",
                                model_cfg=open_clip.get_model_config("ViT-B-32"))
    return load_encoder(EncoderSpec("clip", "open_clip", f"local-dir:{path}"))


@pytest.fixture(scope="module")
def tiny(tiny_clip: str):
    return load_encoder(EncoderSpec("clip", "open_clip", tiny_clip))


def pixels(root: Path, paths: list[str], enc, decode: str, **kw: object):
    batches = list(iter_pixels(root, paths, [enc], decode=decode, device=CPU, **kw))
    indices = [i for b in batches for i in b.indices]
    failures = [f for b in batches for f in b.failures]
    px = torch.cat([b.pixels[0] for b in batches if b.indices])
    return indices, px, failures


def psnr(enc, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per image, in pixel units (undo the normalisation's std)."""
    std = torch.tensor(enc.model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    mse = (((a - b) * std) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return (10 * torch.log10(1 / mse)).numpy()


def test_fast_agrees_with_exact_on_photos(photos: Path, vit) -> None:
    paths = [f"{n}.jpg" for n in PHOTOS]
    idx_e, exact, _ = pixels(photos, paths, vit, "exact")
    idx_f, fast, _ = pixels(photos, paths, vit, "fast")
    assert idx_e == idx_f == [0, 1, 2]
    assert fast.shape == exact.shape == (3, 3, 224, 224) and fast.dtype == torch.float32
    assert psnr(vit, fast, exact).min() >= 30
    cos = (vit.encode_images(fast) * vit.encode_images(exact)).sum(1)
    assert cos.min() >= 0.99


@pytest.mark.parametrize("name", ["portrait.jpg", "small.jpg", "progressive.jpg", "grey.jpg"])
def test_fast_agrees_on_other_shapes_and_kinds(photos: Path, tiny, name: str) -> None:
    _, exact, _ = pixels(photos, [name], tiny, "exact")
    _, fast, _ = pixels(photos, [name], tiny, "fast")
    assert psnr(tiny, fast, exact).min() >= 30


def test_bad_files_fall_back_inside_a_fast_batch(photos: Path, tiny) -> None:
    paths = ["astronaut.jpg", "coffee.png", "cmyk.jpg", "corrupt.jpg", "truncated.jpg",
             "chelsea.jpg", "missing.jpg"]
    ie, exact, fe = pixels(photos, paths, tiny, "exact", batch_size=len(paths))
    i_f, fast, ff = pixels(photos, paths, tiny, "fast", batch_size=len(paths))
    assert i_f == ie == [0, 1, 2, 5]  # the rest of the batch is embedded
    assert ff == fe  # same rejects, same reasons
    assert [r.split(":")[0] for _, r in ff] == [
        "corrupt or truncated image", "corrupt or truncated image", "missing file"]
    assert torch.equal(fast[1:3], exact[1:3])  # PNG and CMYK went through the exact path
    assert psnr(tiny, fast, exact).min() >= 30


def test_gpu_batch_assembly_with_the_cpu_decoder(photos: Path, tiny) -> None:
    """The CUDA path's packing, batch decode, isolation of a refused file and fallback,
    run with torchvision's CPU decoder (nvJPEG itself needs a GPU)."""
    paths = ["astronaut.jpg", "coffee.png", "corrupt.jpg", "small.jpg"]
    ds = JpegFiles(photos, paths, [tiny.image_transform])
    collate = FastCollate([Preprocess.of(tiny)], [torch.float32], [tiny.image_transform],
                          ds.max_pixels, on_worker=False)
    got = _decode_gpu(collate([ds[i] for i in range(len(paths))]), collate, CPU)
    _, exact, fe = pixels(photos, paths, tiny, "exact")
    assert got.indices == [0, 1, 3] and got.failures == fe
    assert psnr(tiny, got.pixels[0], exact).min() >= 30


def test_hostile_corpus_same_outcome(tmp_path: Path, tiny) -> None:
    corpus.build(tmp_path)
    paths = [*sorted(p.name for p in (tmp_path / "img").iterdir()), "nope.png"]
    kw = {"batch_size": 5, "max_pixels": corpus.BOMB_PIXELS_LIMIT}
    ie, exact, fe = pixels(tmp_path / "img", paths, tiny, "exact", **kw)
    i_f, fast, ff = pixels(tmp_path / "img", paths, tiny, "fast", **kw)
    assert i_f == ie and ff == fe
    assert {paths[i] for i, _ in ff} == {"bomb.png", "not_image.jpg", "truncated.png",
                                        "zero_byte.png", "nope.png"}
    assert psnr(tiny, fast, exact).min() >= 30


def test_workers_and_embeddings_keep_input_order(photos: Path, tiny) -> None:
    paths = ["coffee.jpg", "truncated.jpg", "astronaut.jpg", "coffee.png", "chelsea.jpg"] * 3
    runs = {d: list(iter_image_embeddings(photos, paths, [tiny], device=CPU, batch_size=4,
                                          workers=2, decode=d)) for d in ("exact", "fast")}
    for d, batches in runs.items():
        assert [i for b in batches for i in b.indices] == [0, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13,
                                                            14], d
        assert [i for b in batches for i, _ in b.failures] == [1, 6, 11], d
    vec = {d: np.concatenate([b.vectors["clip"] for b in bs]) for d, bs in runs.items()}
    assert (vec["exact"] * vec["fast"]).sum(1).min() >= 0.99


@pytest.mark.parametrize("mode,size", [("shortest", (64, 64)), ("shortest", (48, 64)),
                                       ("longest", (64, 64)), ("squash", (64, 48))])
def test_preprocess_reproduces_open_clip_transforms(photos: Path, mode: str,
                                                    size: tuple[int, int]) -> None:
    cfg = Preprocess(size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", mode)
    ref = open_clip.image_transform(size, False, cfg.mean, cfg.std, mode, "bicubic")
    for name in ("portrait.jpg", "small.jpg"):
        im = Image.open(photos / name).convert("RGB")
        ours = cfg.apply(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None], torch.float32)
        want = ref(im)[None]
        assert ours.shape == want.shape
        assert (ours - want).abs().max() * 0.3 < 2 / 255  # rounding of uint8 resizes only


def test_resolve_and_provenance(tiny) -> None:
    assert resolve_decode("auto", "cpu", [tiny]) == "exact"
    assert resolve_decode("fast", "cpu", [tiny]) == "fast"
    assert set(DECODERS) >= {"exact", "fast"}
    with pytest.raises(InputError, match="unknown decode 'turbo'"):
        resolve_decode("turbo", "cpu")
    assert decode_provenance("auto", "cpu")["decode"] == "exact"
    prov = decode_provenance("fast", "cpu")
    assert prov["decode"] == "fast" and "antialiased" in prov["resize"]
    assert pixel_dtype(tiny, CPU) == torch.float32


def test_padding_after_the_end_marker_is_not_truncation(photos: Path, tiny) -> None:
    """Zero bytes after EOI (common in camera files) still go through the batch decoder."""
    root = photos.parent / "trailing"
    root.mkdir(exist_ok=True)
    shutil.copy(photos / "coffee.jpg", root / "a.jpg")
    (root / "b.jpg").write_bytes((photos / "coffee.jpg").read_bytes() + b"\0" * 16)
    idx, fast, fails = pixels(root, ["a.jpg", "b.jpg"], tiny, "fast")
    assert idx == [0, 1] and not fails and torch.allclose(fast[0], fast[1])


def test_texts_sorted_trimmed_and_in_input_order(tiny) -> None:
    """encode_texts (length-sorted, tokenised ahead, padding trimmed) vs a direct
    open_clip call on the full 77-token context, batch by batch in input order."""
    texts = ["a dog", corpus.LONG_CAPTION, "", corpus.CHINESE, "!", "a red bicycle in the rain",
             *(f"caption {'word ' * (i % 13)}{i}" for i in range(40))]
    got = tiny.encode_texts(texts, batch_size=8)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(
            tiny.model.encode_text(tiny.tokenizer(texts)), dim=-1).numpy()
    assert got.shape == (len(texts), tiny.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert tiny.encode_texts([], 8).shape == (0, tiny.dim)
