"""serve.imaging: the encoded bytes carry the provenance XMP and nothing else (read
chunk by chunk), decode at the right size, never keep what the source pixels came
with; aspect-ratio sizes (tables and properties); the invisible watermark survives
JPEG, WebP, AVIF and a resize, and is not found where it was not put."""

from __future__ import annotations

import inspect
import io
import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms, ImageDraw, PngImagePlugin

from serve.imaging import EXTENSION, MIME, blur, encode, encode_png, read_xmp, sizes_for
from serve.imaging import watermark as wm
from serve.imaging.encode import DIGITAL_SOURCE_TYPE, FORMATS, PNG_XMP_KEY

LOSSY = ("webp", "avif", "jpeg")
PROMPT = "a portrait of Jane Doe outside 12 Elm Street, Springfield"
PAYLOAD = b"\x5a\x17imagegen"
IPTC_EXT = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}"
XMP_NS = "{http://ns.adobe.com/xap/1.0/}"
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient, hard-edged shapes and a little grain: what generated images
    have and plain noise lacks (a flat image is the watermark's worst case)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([60 + 150 * y / h, 90 + 120 * x / w, 200 - 80 * y / h], axis=-1)
    im = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((0.55 * w, 0.1 * h, 0.85 * w, 0.45 * h), fill=(240, 210, 110))
    d.rectangle((0.1 * w, 0.5 * h, 0.4 * w, 0.9 * h), fill=(170, 60, 50))
    d.polygon([(0, h), (0.5 * w, 0.6 * h), (w, h)], fill=(50, 110, 60))
    grain = np.random.default_rng(seed).normal(0, 4, (h, w, 1))
    return np.clip(np.asarray(im, dtype=np.float64) + grain, 0, 255).astype(np.uint8)


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n  # length, type, data, CRC
    return chunks


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment before the scan data."""
    assert data[:2] == b"\xff\xd8"
    pos, segments = 2, []
    while data[pos + 1] != 0xDA:  # SOS: entropy-coded data follows
        n = int.from_bytes(data[pos + 2:pos + 4], "big")
        segments.append((data[pos + 1], data[pos + 4:pos + 2 + n]))
        pos += 2 + n
    return segments


def webp_chunks(data: bytes) -> list[bytes]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    pos, kinds = 12, []
    while pos < len(data):
        n = int.from_bytes(data[pos + 4:pos + 8], "little")
        kinds.append(data[pos:pos + 4])
        pos += 8 + n + (n & 1)
    return kinds


def assert_only_provenance(data: bytes, fmt: str) -> None:
    """Every metadata container in `data` is the one XMP packet: no EXIF, GPS, ICC,
    comment or text chunk."""
    im = decoded(data)
    assert not im.getexif()
    assert not {"exif", "icc_profile", "comment", "parameters", "gps"} & set(im.info)
    if fmt == "png":
        kinds = [k for k, _ in png_chunks(data)]
        assert set(kinds) == {b"IHDR", b"iTXt", b"IDAT", b"IEND"}
        itxt = [body for k, body in png_chunks(data) if k == b"iTXt"]
        assert len(itxt) == 1 and itxt[0].startswith(PNG_XMP_KEY.encode() + b"\0\0")
    elif fmt == "jpeg":
        app = [(m, body) for m, body in jpeg_segments(data) if 0xE0 <= m <= 0xEF or m == 0xFE]
        assert [m for m, _ in app] == [0xE0, 0xE1]  # JFIF, then XMP; no ICC (APP2), COM
        assert app[0][1].startswith(b"JFIF\0")
        assert app[1][1].startswith(b"http://ns.adobe.com/xap/1.0/\0")
    elif fmt == "webp":
        assert set(webp_chunks(data)) <= {b"VP8X", b"VP8 ", b"VP8L", b"XMP "}
    else:  # avif: an ISOBMFF file; an EXIF item would be typed "Exif", an ICC one "prof"
        assert b"Exif" not in data and b"prof" not in data


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_only_metadata_is_the_provenance_xmp(fmt: str) -> None:
    data = encode(picture(96, 64), fmt)
    assert_only_provenance(data, fmt)
    root = ET.fromstring(read_xmp(data))
    (desc,) = root.iter(f"{RDF}Description")
    assert desc.get(f"{IPTC_EXT}DigitalSourceType") == DIGITAL_SOURCE_TYPE
    assert DIGITAL_SOURCE_TYPE.endswith("/digitalsourcetype/trainedAlgorithmicMedia")
    assert desc.get(f"{XMP_NS}CreatorTool") == "imagegen"


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_provenance_there_is_no_metadata_at_all(fmt: str) -> None:
    data = encode(picture(96, 64), fmt, provenance=False)
    assert read_xmp(data) is None
    if fmt == "png":
        assert [k for k, _ in png_chunks(data)] == [b"IHDR", b"IDAT", b"IEND"]
        assert data == encode_png(picture(96, 64))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [(96, 64), (161, 97), (1344, 768)])
def test_decodes_at_its_size_as_rgb(fmt: str, size: tuple[int, int]) -> None:
    image = picture(*size)
    im = decoded(encode(image, fmt))
    assert (im.format, im.size, im.mode) == (fmt.upper(), size, "RGB")
    error = np.abs(np.asarray(im, dtype=np.int16) - image).mean()
    assert error == 0 if fmt == "png" else error < 6
    assert MIME[fmt] == f"image/{fmt}" and EXTENSION[fmt] in {fmt, "jpg"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_encoding_is_a_pure_function_of_the_pixels(fmt: str) -> None:
    assert encode(picture(128, 128), fmt) == encode(picture(128, 128), fmt)


@pytest.mark.parametrize("fmt", LOSSY)
def test_quality_trades_bytes(fmt: str) -> None:
    image = picture(256, 256)
    assert len(encode(image, fmt, 30)) < len(encode(image, fmt)) < len(encode(image, fmt, 95))


@pytest.mark.parametrize("quality", [0, 101, -5, 50.0, True, "80"])
def test_quality_outside_1_to_100_is_refused(quality) -> None:
    for fmt in FORMATS:
        with pytest.raises(ValueError, match="quality"):
            encode(picture(32, 32), fmt, quality)


@pytest.mark.parametrize("fmt", ["gif", "PNG", "jpg", ""])
def test_unknown_format_is_refused(fmt: str) -> None:
    with pytest.raises(ValueError, match="format"):
        encode(picture(32, 32), fmt)


@pytest.mark.parametrize("image", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                   np.zeros((8, 8, 3), np.float32)])
def test_only_rgb_uint8_arrays_are_encoded(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode(image, "png")


def _source_with_private_metadata(fmt: str) -> Image.Image:
    """A picture saved with the prompt in EXIF and text chunks, a GPS position and an
    ICC profile, opened again: what a caller might turn into an array."""
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = PROMPT
    exif[ExifTags.Base.Software] = "some-ui " + PROMPT
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N",
                                  ExifTags.GPS.GPSLatitude: (51.0, 30.0, 26.0)}
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    options = {"exif": exif, "icc_profile": icc}
    if fmt == "png":
        text = PngImagePlugin.PngInfo()
        text.add_text("parameters", PROMPT)
        text.add_itxt("Description", PROMPT)
        options["pnginfo"] = text
    else:
        options["comment"] = PROMPT
    Image.fromarray(picture(96, 64)).save(buf, format=fmt.upper(), **options)
    return decoded(buf.getvalue())


@pytest.mark.parametrize("source", ["png", "jpeg"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_prompt_in_the_source_never_reaches_the_bytes(source: str, fmt: str) -> None:
    src = _source_with_private_metadata(source)
    # The premise: the source does carry all of it.
    assert src.getexif()[ExifTags.Base.ImageDescription] == PROMPT
    assert src.getexif().get_ifd(ExifTags.IFD.GPSInfo) and src.info["icc_profile"]
    assert PROMPT in (src.info.get("parameters") or src.info["comment"].decode())

    data = encode(np.asarray(src), fmt)
    for needle in (PROMPT.encode(), PROMPT.encode("utf-16-le"), PROMPT.encode("utf-16-be"),
                   b"Jane Doe", b"some-ui", b"Exif"):
        assert needle not in data
    assert_only_provenance(data, fmt)


def test_encode_takes_no_prompt() -> None:
    assert list(inspect.signature(encode).parameters) == ["image", "fmt", "quality",
                                                          "provenance"]


def test_encode_png_and_blur_are_unchanged() -> None:
    image = picture(64, 48)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    assert encode_png(image) == buf.getvalue()
    blurred = blur(image)
    assert blurred.shape == image.shape and blurred.dtype == np.uint8
    assert np.abs(blurred.astype(int) - image).mean() > 5


# -- aspect-ratio sizes ---------------------------------------------------------------

SDXL = {"megapixels": 1.0, "multiple": 64, "min_size": 256, "max_width": 2048,
        "max_height": 2048}


@pytest.mark.parametrize(("ratios", "limits", "want"), [
    (["1:1"], SDXL, [(1024, 1024)]),
    (["16:9", "9:16"], SDXL, [(1344, 768), (768, 1344)]),
    (["21:9"], SDXL, [(1472, 640)]),
    (["4:3", "3:2", "2:4"], SDXL, [(1216, 896), (1280, 832), (704, 1408)]),
    # scaled down whole to fit: the ratio holds
    (["1:1", "16:9", "9:16"], {**SDXL, "megapixels": 4.0, "max_width": 1024, "max_height": 1024},
     [(1024, 1024), (1024, 576), (576, 1024)]),
    (["16:9"], {**SDXL, "megapixels": 4.0, "max_height": 1024}, [(1792, 1024)]),
    # scaled up whole to min_size
    (["1:1", "16:9"], {**SDXL, "megapixels": 0.0041, "multiple": 8, "min_size": 64},
     [(64, 64), (112, 64)]),
    # a ratio the limits cannot hold: the short side pinned to min_size, the long to max
    (["32:1", "1:32"], SDXL, [(2048, 256), (256, 2048)]),
    (["3:2", "16:9"], {**SDXL, "megapixels": 0.25, "multiple": 8, "min_size": 64},
     [(616, 408), (672, 376)]),
    ([], SDXL, []),
])
def test_sizes_for(ratios: list[str], limits: dict, want: list[tuple[int, int]]) -> None:
    assert sizes_for(ratios, **limits) == want


@pytest.mark.parametrize("ratio", ["0:1", "1:0", "33:1", "1:33", "16x9", "16:9:1", "-1:2",
                                   "1.5:1", "", ":", "a:b", "16 : 9", "١:١"])
def test_a_malformed_ratio_is_refused(ratio: str) -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        sizes_for(["1:1", ratio], **SDXL)


@pytest.mark.parametrize("bad", [{"megapixels": 0}, {"megapixels": -1}, {"multiple": 0},
                                 {"min_size": 0}, {"min_size": 4096},
                                 {"max_width": 100, "min_size": 200}])
def test_impossible_limits_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        sizes_for(["1:1"], **{**SDXL, **bad})


ratio_terms = st.integers(1, 32)
limits = st.fixed_dictionaries({
    "megapixels": st.floats(0.05, 4.0), "multiple": st.sampled_from([1, 8, 16, 32, 64]),
    "min_size": st.integers(32, 512), "max_width": st.integers(512, 4096),
    "max_height": st.integers(512, 4096)})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ratio_terms, ratio_terms), max_size=6), limits)
def test_sizes_are_on_the_grid_inside_the_limits(ratios, lim) -> None:
    sizes = sizes_for([f"{w}:{h}" for w, h in ratios], **lim)
    m = lim["multiple"]
    assert len(sizes) == len(ratios)
    for w, h in sizes:
        assert w % m == 0 and h % m == 0
        assert lim["min_size"] <= w <= lim["max_width"]
        assert lim["min_size"] <= h <= lim["max_height"]


@settings(max_examples=300, deadline=None)
@given(ratio_terms, ratio_terms, limits)
def test_an_unclamped_size_is_the_target_rounded_at_the_best_ratio(rw, rh, lim) -> None:
    m, r = lim["multiple"], rw / rh
    area = lim["megapixels"] * 1e6
    w0, h0 = math.sqrt(area * r), math.sqrt(area / r)
    lo = lim["min_size"] + m
    assume(lo <= w0 <= lim["max_width"] - m and lo <= h0 <= lim["max_height"] - m)
    [(w, h)] = sizes_for([f"{rw}:{rh}"], **lim)
    assert abs(w - w0) < m and abs(h - h0) < m
    naive = (max(m, round(w0 / m) * m), max(m, round(h0 / m) * m))
    assert abs(math.log(w / h / r)) <= abs(math.log(naive[0] / naive[1] / r)) + 1e-9


@settings(max_examples=300, deadline=None)
@given(ratio_terms, ratio_terms, limits)
def test_a_turned_ratio_gives_the_turned_size(rw, rh, lim) -> None:
    lim = {**lim, "max_height": lim["max_width"]}
    [(w, h), turned] = sizes_for([f"{rw}:{rh}", f"{rh}:{rw}"], **lim)
    assert turned == (h, w)


# -- watermark ------------------------------------------------------------------------

def _reencoded(image: np.ndarray, fmt: str, quality: int | None = None) -> np.ndarray:
    return np.asarray(decoded(encode(image, fmt, quality)).convert("RGB"))


@pytest.fixture(scope="module")
def marked() -> tuple[np.ndarray, np.ndarray]:
    image = picture(512, 512)
    return image, wm.apply(image, PAYLOAD)


TRANSFORMS = {
    "png": lambda im: _reencoded(im, "png"),
    "jpeg q85": lambda im: _reencoded(im, "jpeg", 85),
    "webp q80": lambda im: _reencoded(im, "webp", 80),
    "avif q60": lambda im: _reencoded(im, "avif", 60),
    "0.75x resize": lambda im: np.asarray(Image.fromarray(im).resize((384, 384), Image.BICUBIC)),
}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_the_mark_survives(marked, transform: str) -> None:
    image, marked_image = marked
    seen = TRANSFORMS[transform](marked_image)
    assert wm.detect(seen, len(PAYLOAD), size=(512, 512)) == PAYLOAD
    assert wm.bit_accuracy(seen, PAYLOAD, size=(512, 512)) >= 0.95
    assert wm.detect(TRANSFORMS[transform](image), len(PAYLOAD), size=(512, 512)) is None


def test_the_mark_is_invisible_enough(marked) -> None:
    image, marked_image = marked
    mse = np.mean((marked_image.astype(np.float64) - image) ** 2)
    assert 10 * np.log10(255**2 / mse) > 33  # dB; only the U channel is touched
    assert marked_image.dtype == np.uint8 and marked_image.shape == image.shape


def test_a_non_square_image_carries_the_mark() -> None:
    marked_image = wm.apply(picture(640, 384, seed=3), b"\x01")
    assert wm.detect(_reencoded(marked_image, "jpeg", 85), 1) == b"\x01"


@pytest.mark.parametrize("unmarked", [
    picture(512, 512, seed=1), picture(300, 700, seed=2), np.full((320, 320, 3), 128, np.uint8),
    np.zeros((256, 256, 3), np.uint8),
    np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)],
    ids=["picture", "tall picture", "flat grey", "black", "noise"])
def test_no_mark_is_found_where_none_was_put(unmarked: np.ndarray) -> None:
    for length in (1, len(PAYLOAD), 16):
        assert wm.detect(unmarked, length) is None


def test_reading_the_wrong_length_finds_nothing(marked) -> None:
    assert wm.detect(marked[1], 4) is None


@pytest.mark.parametrize("size", [(255, 256), (64, 64), (600, 100), (1, 1)])
def test_an_image_under_256x256_pixels_comes_back_unchanged(size: tuple[int, int]) -> None:
    image = picture(*size)
    assert not wm.markable(image)
    assert wm.apply(image, PAYLOAD) is image
    assert wm.detect(image, len(PAYLOAD)) is None


def test_256x256_is_enough() -> None:
    image = picture(256, 256)
    marked_image = wm.apply(image, PAYLOAD)
    assert not np.array_equal(marked_image, image)
    assert wm.detect(marked_image, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("payload", [b"", bytes(17), "text"])
def test_the_payload_is_1_to_16_bytes(payload) -> None:
    with pytest.raises(ValueError, match="payload"):
        wm.apply(picture(256, 256), payload)


@pytest.mark.parametrize("size", [(64, 64), (512, 320)])
def test_the_visible_mark_sits_in_the_bottom_right_corner(size: tuple[int, int]) -> None:
    w, h = size
    image = picture(w, h)
    out = wm.visible(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.argwhere(np.any(out != image, axis=-1))
    assert len(changed) > 0
    assert changed[:, 0].min() >= h // 2 and changed[:, 1].min() >= w // 2
    # semi-transparent: the picture still shows through the label
    ys, xs = changed[:, 0], changed[:, 1]
    assert np.corrcoef(out[ys, xs, 0].astype(float), image[ys, xs, 0])[0, 1] > 0.2


def test_the_watermark_does_not_import_torch() -> None:
    code = ("import sys, numpy as np; from serve.imaging import watermark as wm; "
            "wm.apply(np.zeros((256, 256, 3), np.uint8), b'x'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
