"""model/image_decode.py, image_config.py, images.py: safe ingestion (bombs, garbage, every Pillow mode) and pixel
parity with transformers' PIL-backend image processors (CLIP, SigLIP, LLaVA pad-to-square), checked against
transformers itself."""

from __future__ import annotations

import io
import json
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from transformers import AutoImageProcessor, CLIPImageProcessorPil, LlavaImageProcessorPil, SiglipImageProcessorPil

from vlmserve.model import images as images_module
from vlmserve.model.image_config import CLIP_STD, ImageProcessorConfig, SizeSpec
from vlmserve.model.image_decode import ImageError, image_size, open_image, to_rgb
from vlmserve.model.images import ImageProcessor

BIG = 50_000_000  # a pixel cap no test image comes near


# -- processor directories, saved by transformers ----------------------------------------------------------------

PROCESSORS: dict[str, Callable[[], object]] = {
    "clip": lambda: CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    # odd, non-square crop larger than the resized short side on one axis: crop offsets and zero padding
    "clip_odd": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 21}, crop_size={"height": 27, "width": 20}, resample=2
    ),
    "siglip": lambda: SiglipImageProcessorPil(size={"height": 32, "width": 32}),
    "llava_pad": lambda: LlavaImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True
    ),
}


def _save(kind: str, directory: Path, *, nested: bool = False) -> Path:
    processor = PROCESSORS[kind]()
    directory.mkdir(parents=True, exist_ok=True)
    if nested:  # the newer layout: processor_config.json with the image processor under "image_processor"
        config = {"image_processor": json.loads(processor.to_json_string()), "processor_class": "LlavaProcessor"}
        (directory / "processor_config.json").write_text(json.dumps(config))
    else:
        processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def processor_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("processors")
    dirs = {kind: _save(kind, root / kind) for kind in PROCESSORS}
    dirs["llava_nested"] = _save("llava_pad", root / "llava_nested", nested=True)
    return dirs


def _reference(directory: Path, images: list[Image.Image]) -> torch.Tensor:
    processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    assert type(processor).__name__.endswith("Pil")
    return processor(images, return_tensors="pt").pixel_values  # (N, 3, H, W)


def _assert_parity(ours: torch.Tensor, theirs: torch.Tensor, names: list[str]) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape
    for name, a, b in zip(names, ours, theirs, strict=True):
        diff = (a - b.float()).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"


# -- test images ---------------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(1234)


def _noise(width: int, height: int, channels: int = 3) -> np.ndarray:
    """Noise on a gradient: hard for resampling, easy to see a flip or a shift in."""
    ramp = np.linspace(0, 200, width, dtype=np.float64)[None, :, None]
    rng = np.random.default_rng((width, height, channels))  # the same image whichever tests run, in any order
    noise = rng.integers(0, 56, size=(height, width, channels))
    return (ramp + noise).clip(0, 255).astype(np.uint8)  # (H, W, C)


def _rgb(width: int, height: int) -> Image.Image:
    return Image.fromarray(_noise(width, height))


def _mode_images() -> dict[str, Image.Image]:
    rgb = _rgb(45, 38)
    gray = rgb.convert("L")
    rgba = Image.fromarray(np.concatenate([_noise(45, 38), _noise(45, 38, 1)], axis=2), mode="RGBA")
    p_plain = rgb.quantize(16)
    p_transparent = rgb.quantize(16)
    p_transparent.info["transparency"] = 3
    floats = np.asarray(gray, dtype=np.float32) + 0.7
    floats[0, :5] = [-20.0, 300.0, 254.6, 0.2, 255.0]
    gray_transparent = Image.fromarray(np.asarray(gray), mode="L")
    gray_transparent.info["transparency"] = 17
    rgb_transparent = _rgb(30, 20)
    rgb_transparent.info["transparency"] = tuple(int(v) for v in np.asarray(rgb_transparent)[0, 0])
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "L": gray,
        "L_transparency": gray_transparent,
        "P": p_plain,
        "P_transparency": p_transparent,
        "PA": Image.merge("PA", (p_plain, rgba.getchannel("A"))),
        "1": gray.convert("1"),
        "I": Image.fromarray(np.asarray(gray, dtype=np.int32)),
        "F": Image.fromarray(floats),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "HSV": rgb.convert("HSV"),
        "LAB": rgb.convert("LAB"),
        "RGBX": rgb.convert("RGBX"),
        "RGBa": rgba.convert("RGBa"),
        "RGB_transparency": rgb_transparent,
    }


def _sized_images() -> dict[str, Image.Image]:
    sizes = [(1, 1), (2, 2), (7, 300), (300, 7), (2000, 300), (300, 2000), (33, 47), (47, 33), (224, 224)]
    sizes += [(640, 480), (480, 640), (31, 32), (32, 32), (21, 21), (100, 1), (1, 100), (10000, 1)]
    return {f"{w}x{h}": _rgb(w, h) for w, h in sizes}


@pytest.fixture(scope="module")
def varied_images() -> dict[str, Image.Image]:
    return {**_sized_images(), **_mode_images()}


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((24, 36, 3), c, dtype=np.uint8)) for c in (40, 120, 220)]
    frames[0] = _rgb(36, 24)
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _encoded_files() -> dict[str, bytes]:
    rgb = _rgb(57, 43)
    rgba = Image.fromarray(np.concatenate([_noise(40, 30), _noise(40, 30, 1)], axis=2), mode="RGBA")
    return {
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "jpeg_gray": _encode(rgb.convert("L"), "JPEG"),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "png_rgb": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgba, "PNG"),
        "png_palette_transparency": _encode(rgb.quantize(8), "PNG", transparency=2),
        "png_1bit": _encode(rgb.convert("1"), "PNG"),
        "gif_animated": _animated_gif(),
        "webp": _encode(rgb, "WEBP", lossless=True),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_float": _encode(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32)), "TIFF"),
    }


# -- parity with transformers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "clip_odd", "siglip", "llava_pad", "llava_nested"])
def test_parity_with_transformers(kind: str, processor_dirs: dict[str, Path], varied_images) -> None:
    names = [n for n in varied_images if not (kind.startswith("llava") and n == "10000x1")]  # 10000² canvas
    batch = [varied_images[n] for n in names]
    assert len(batch) >= 20
    ours = ImageProcessor.from_pretrained(processor_dirs[kind])(batch)
    _assert_parity(ours, _reference(processor_dirs[kind], batch), names)


@pytest.mark.parametrize("kind", ["clip", "siglip", "llava_pad"])
def test_parity_through_bytes(kind: str, processor_dirs: dict[str, Path]) -> None:
    files = _encoded_files()
    ours = ImageProcessor.from_pretrained(processor_dirs[kind])([open_image(d, max_pixels=BIG) for d in files.values()])
    theirs = _reference(processor_dirs[kind], [Image.open(io.BytesIO(d)) for d in files.values()])
    _assert_parity(ours, theirs, list(files))


def test_bounded_resize_route_stays_close_to_transformers(processor_dirs, varied_images, monkeypatch) -> None:
    """Resizing only the cropped window (the route for extreme aspect ratios) lands within a few levels of
    transformers' pixels (Pillow rounds the box to float32 and may order its passes differently)."""
    monkeypatch.setattr(images_module, "MAX_INTERMEDIATE_PIXELS", 1)
    names = list(varied_images)
    batch = [varied_images[n] for n in names]
    for kind in ("clip", "clip_odd"):
        diff = (
            ImageProcessor.from_pretrained(processor_dirs[kind])(batch) - _reference(processor_dirs[kind], batch)
        ).abs()
        assert diff.max() <= 8 / 255 / min(CLIP_STD), kind  # 8 uint8 levels
        assert diff.mean() <= 1 / 255 / max(CLIP_STD), kind


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_resize": False, "crop_size": {"height": 16, "width": 24}},
        {"do_rescale": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"image_mean": 0.3, "image_std": 0.2, "rescale_factor": 0.5 / 255, "resample": 0},
        {"size": 40, "crop_size": 30, "resample": 1},
        {"size": {"shortest_edge": 20, "longest_edge": 40}, "do_center_crop": False, "do_pad": True},
        {"do_resize": False, "do_center_crop": False, "do_pad": True},
        {"do_resize": False, "do_center_crop": False, "do_pad": True, "pad_size": {"height": 64, "width": 80}},
    ],
)
def test_flags_parity(kwargs: dict, tmp_path: Path) -> None:
    base = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    CLIPImageProcessorPil(**{**base, **kwargs}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    for key, value in kwargs.items():  # legacy int sizes are written back in the file as given
        config[key] = value
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    batch = [_rgb(w, h) for w, h in [(40, 30), (25, 50), (33, 33), (60, 17)]]
    ours = ImageProcessor.from_pretrained(tmp_path)(batch)
    _assert_parity(ours, _reference(tmp_path, batch), ["40x30", "25x50", "33x33", "60x17"])


def test_sixteen_bit_matches_transformers_on_the_8bit_equivalent(processor_dirs) -> None:
    values = _RNG.integers(0, 65536, size=(37, 51), dtype=np.uint16)
    as_8bit = ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    wide = [Image.fromarray(values), Image.fromarray(values.astype(np.int32))]
    assert [im.mode for im in wide] == ["I;16", "I"]
    ours = ImageProcessor.from_pretrained(processor_dirs["clip"])(wide)
    theirs = _reference(processor_dirs["clip"], [Image.fromarray(as_8bit, mode="L")] * 2)
    _assert_parity(ours, theirs, ["I;16", "I"])


# -- behaviour of our own (where transformers differs by design or refuses) ---------------------------------------


def test_sixteen_bit_png_keeps_its_gradient() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))  # (8, 256)
    data = _encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    red = np.asarray(open_image(data, max_pixels=BIG))[0, :, 0]  # (256,)
    assert red[0] == 0 and red[-1] == 255
    assert np.all(np.diff(red.astype(int)) >= 0) and len(np.unique(red)) > 200
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, :, 0]  # what transformers would see
    assert (clipped == 255).mean() > 0.9


def test_exif_orientation_is_applied(processor_dirs) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall: left half red, right half blue
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to display
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    upright = open_image(data, max_pixels=BIG)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 50, bottom  # blue below
    ours = ImageProcessor.from_pretrained(processor_dirs["clip"])([upright])
    theirs = _reference(processor_dirs["clip"], [ImageOps.exif_transpose(Image.open(io.BytesIO(data)))])
    _assert_parity(ours, theirs, ["exif"])


def test_image_size_reads_a_png_header_only_and_its_exif_before_the_pixels(monkeypatch) -> None:
    """Pillow's PNG `getexif` decodes the whole image looking for an eXIf chunk after the pixels; `image_size`
    must not (it plans before any pixel work), and an eXIf orientation written before the pixels (where the PNG
    spec puts it, and Pillow writes it) turns the size."""
    pixels = np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall
    data = _encode(Image.fromarray(pixels), "PNG")
    loads: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.format) or real_load(self))
    assert image_size(data, max_pixels=BIG) == (20, 40) and loads == []
    assert open_image(data, max_pixels=BIG).size == (40, 20) and loads  # decoding loads
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    turned = _encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    assert turned.index(b"eXIf") < turned.index(b"IDAT")
    assert image_size(turned, max_pixels=BIG) == (40, 20) == open_image(turned, max_pixels=BIG).size[::-1]


def test_premultiplied_la_which_transformers_cannot_convert() -> None:
    la = Image.merge("LA", (Image.new("L", (4, 4), 100), Image.new("L", (4, 4), 128)))
    with pytest.raises(ValueError):
        la.convert("La").convert("RGB")  # Pillow itself refuses; transformers passes it on
    rgb = to_rgb(la.convert("La"))
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb).astype(int) - np.asarray(to_rgb(la)).astype(int)).max() <= 1


def test_every_mode_comes_out_rgb(varied_images) -> None:
    for name, image in varied_images.items():
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == image.size, name


def test_animated_gif_takes_the_first_frame() -> None:
    data = _animated_gif()
    image = open_image(data, max_pixels=BIG)
    first = Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(first))
    assert np.asarray(image).std() > 5  # the noisy first frame, not a flat later one


def test_extreme_aspect_ratio_processes_to_the_right_shape(processor_dirs) -> None:
    wide, tall = _rgb(10000, 1), _rgb(1, 10000)
    for kind in ("clip", "siglip", "llava_pad"):
        out = ImageProcessor.from_pretrained(processor_dirs[kind])([wide, tall])
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all(), kind


def test_extreme_aspect_ratio_takes_bounded_routes(processor_dirs, monkeypatch) -> None:
    monkeypatch.setattr(images_module, "MAX_INTERMEDIATE_PIXELS", 64 * 64)
    image = _rgb(200, 3)
    out = ImageProcessor.from_pretrained(processor_dirs["llava_pad"])([image])  # pre-shrunk before padding
    assert out.shape == (1, 3, 32, 32)
    no_crop = ImageProcessor(ImageProcessorConfig.clip(32, do_center_crop=False))
    with pytest.raises(ImageError) as info:
        no_crop([_rgb(2000, 1)])  # would resize to 64000x32 with nothing to crop it
    assert info.value.code == "unsupported_image"


# -- ingestion: refusals ----------------------------------------------------------------------------------------


def _png(width: int, height: int, *, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A grayscale PNG of zeros written chunk by chunk (a 20000x20000 bomb is ~50 kB and never held in memory)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row * 500) for _ in range((height + 499) // 500))
    body += compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_400mp() -> bytes:
    return _png(20000, 20000)  # 400 M pixels: above Pillow's own error threshold (2 x 89 M)


def _refuse(data: bytes, code: str, **limits) -> ImageError:
    with pytest.raises(ImageError) as info:
        open_image(data, **{"max_pixels": BIG, **limits})
    assert info.value.code == code, info.value
    assert not isinstance(info.value.__cause__, ImageError)
    return info.value


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse_to_decode(self, *args, **kwargs):
        raise AssertionError("decoded an image that should have been refused from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)


def test_bomb_above_pillows_limit_is_refused_from_the_header(bomb_400mp, no_decoding) -> None:
    assert len(bomb_400mp) < 200_000
    start = time.perf_counter()
    error = _refuse(bomb_400mp, "image_too_many_pixels")
    assert time.perf_counter() - start < 1.0
    assert "20000x20000" in str(error) and error.status_code == 400


def test_bomb_below_pillows_limit_is_refused_by_our_cap(no_decoding) -> None:
    bomb = _png(10000, 9000)  # 90 M pixels: past Pillow's warning threshold, under its error threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail the test: ours comes first
        _refuse(bomb, "image_too_many_pixels", max_pixels=4_000_000)
    _refuse(_png(3000, 3000), "image_too_many_pixels", max_pixels=4_000_000)


def test_our_cap_does_not_depend_on_pillows(monkeypatch, bomb_400mp) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone switched Pillow's check off: we still refuse
    _refuse(bomb_400mp, "image_too_many_pixels", max_pixels=1_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # and Pillow's limit does not override ours
    assert open_image(_encode(_rgb(50, 40), "PNG"), max_pixels=2000).size == (50, 40)


def test_pixel_cap_boundary() -> None:
    data = _encode(_rgb(50, 40), "PNG")
    assert open_image(data, max_pixels=2000).size == (50, 40)
    _refuse(data, "image_too_many_pixels", max_pixels=1999)


def test_byte_cap() -> None:
    data = _encode(_rgb(50, 40), "PNG")
    assert open_image(data, max_pixels=BIG, max_bytes=len(data)).size == (50, 40)
    error = _refuse(data, "image_too_large", max_bytes=len(data) - 1)
    assert error.status_code == 413


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(_RNG.bytes(5000), id="random"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + _RNG.bytes(200), id="png-magic-then-garbage"),
        pytest.param(b"\xff\xd8\xff\xe0" + _RNG.bytes(200), id="jpeg-magic-then-garbage"),
        pytest.param(b"GIF89a" + b"\x00" * 10, id="gif-header-only"),
        pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg'/>", id="svg"),
        pytest.param(_encode(_rgb(64, 64), "PNG")[:-200], id="truncated-png"),
        pytest.param(_encode(_rgb(64, 64), "JPEG")[:400], id="truncated-jpeg"),
        pytest.param(_encode(_rgb(64, 64), "GIF")[:300], id="truncated-gif"),
        pytest.param(_png(0, 10), id="zero-width"),
        pytest.param(_png(10, 0), id="zero-height"),
        pytest.param(_encode(_rgb(256, 256), "PNG")[:20000], id="png-cut-mid-idat"),
        pytest.param(_encode(_rgb(256, 256), "WEBP")[:3000], id="truncated-webp"),
        pytest.param(_encode(_rgb(16, 16), "ICO"), id="ico-not-allowed"),
        pytest.param(_encode(_rgb(16, 16), "PPM"), id="ppm-not-allowed"),
        pytest.param(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", id="eps-not-allowed"),
    ],
)
def test_garbage_is_an_image_error(data: bytes) -> None:
    _refuse(data, "invalid_image")


def test_format_is_sniffed_from_content_not_labels() -> None:
    jpeg = _encode(_rgb(20, 10), "JPEG")
    assert open_image(bytearray(jpeg), max_pixels=BIG).size == (20, 10)  # no name, no type: content decides
    _refuse(jpeg, "invalid_image", formats=("PNG",))  # and the allowlist is enforced on content too


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_is_ignored() -> None:
    data = bytearray(_encode(_rgb(20, 10), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\xff"))
    assert open_image(bytes(data), max_pixels=BIG).size == (20, 10)


# -- config loading ----------------------------------------------------------------------------------------------


def test_nested_processor_config_wins(processor_dirs, tmp_path: Path) -> None:
    nested = ImageProcessor.from_pretrained(processor_dirs["llava_nested"]).config
    assert nested.kind == "llava" and nested.do_pad_to_square
    assert nested.size == SizeSpec(shortest_edge=32) and nested.crop_size == (32, 32)
    _save("siglip", tmp_path)
    (tmp_path / "processor_config.json").write_text(
        (processor_dirs["llava_nested"] / "processor_config.json").read_text()
    )
    assert ImageProcessor.from_pretrained(tmp_path).config.kind == "llava"  # as transformers: nested first


def test_config_defaults_and_fallbacks(tmp_path: Path) -> None:
    siglip = ImageProcessorConfig.from_dict(
        {"image_processor_type": "SiglipImageProcessorFast", "size": {"height": 48, "width": 48}}
    )
    assert siglip.size == SizeSpec(height=48, width=48) and not siglip.do_center_crop
    as_int = ImageProcessorConfig.from_dict({"image_processor_type": "SiglipImageProcessor", "size": 48})
    assert as_int.size == SizeSpec(shortest_edge=48)  # as transformers: SigLIP's default_to_square is False
    assert siglip.image_mean == (0.5, 0.5, 0.5) and siglip.output_hw == (48, 48)
    legacy = ImageProcessorConfig.from_dict(
        {"image_processor_type": "CLIPImageProcessor", "size": 336, "crop_size": 336}
    )
    assert legacy.size == SizeSpec(shortest_edge=336) and legacy.crop_size == (336, 336)
    assert legacy.resample == Image.Resampling.BICUBIC and legacy.output_hw == (336, 336)
    with pytest.raises(ValueError, match="unsupported image processor type"):
        ImageProcessorConfig.from_dict({"image_processor_type": "MllamaImageProcessor"})

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model", "image_size": 40}})
    )
    fallback = ImageProcessor.from_pretrained(tmp_path)
    assert fallback.config.kind == "siglip" and fallback.config.output_hw == (40, 40)
    assert ImageProcessor.for_vision_model("clip_vision_model", 24).preprocess_one(_rgb(30, 50)).shape == (3, 24, 24)
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_pretrained(tmp_path / "missing")


def test_mixed_sizes_without_resize_or_pad_is_a_clear_error() -> None:
    processor = ImageProcessor(ImageProcessorConfig.clip(32, do_resize=False, do_center_crop=False))
    with pytest.raises(ValueError, match="different sizes"):
        processor([_rgb(10, 10), _rgb(12, 10)])
