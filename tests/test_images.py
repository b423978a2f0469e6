"""`load_image`: every input becomes an RGB PIL image with the right pixels, or an ImageLoadError
whose message names the problem and the fix. Nothing here needs a model; all files are tiny and
made in the test (docs/reliability.md lists the inputs with the test that covers each).

What each test proves:
- 16bit_grayscale_png_is_stretched_to_full_range_not_clipped: a 16-bit PNG's own range maps onto 0-255.
- mode_I_and_F_are_stretched_over_their_own_range: 32-bit integer and float images are stretched, not clipped.
- constant_high_bit_depth_image_becomes_black_not_an_error: a flat 16-bit image gives black.
- one_bit_image_gives_black_and_white: mode "1" gives pure black and white.
- palette_image_without_transparency_uses_its_palette_colours: palette indices become their colours.
- palette_image_with_transparency_composites_onto_white: transparent palette entries (PNG, GIF) become white.
- rgba_composites_onto_white: RGBA is composited onto white, not stripped of alpha.
- la_composites_onto_white: grey + alpha is composited onto white.
- other_alpha_modes_composite_onto_white: RGBa, La and PA are composited onto white.
- cmyk_jpeg_on_disk_reads_back_as_sensible_rgb: a CMYK JPEG reads as the RGB colour it shows.
- exif_rotated_jpeg_comes_out_upright: EXIF orientations 6 and 8 are applied.
- one_by_one_images: 1x1 images (PIL RGB / L / BMP, arrays, uint16) give 1x1 RGB with their pixel.
- numpy_hw_uint8_is_grey: an HxW uint8 array is grey with the same values.
- numpy_hwc_uint8_is_exact: HxWx3 and HxWx1 uint8 arrays keep their pixels exactly.
- numpy_hwc4_composites_onto_white: an HxWx4 array is composited onto white.
- numpy_chw_float_in_unit_range_is_scaled_and_transposed: a CxHxW float array in [0, 1] is scaled and transposed.
- numpy_uint16_array_is_stretched: a uint16 array is stretched over its own range.
- numpy_bool_array_is_black_and_white: a bool array gives black and white.
- torch_chw_float_tensor: a CxHxW float tensor gives the same image as the array.
- torch_uint8_chw_and_bfloat16_tensors: uint8 CxHxW and bfloat16 tensors give exact / right-sized RGB.
- datasets_dict_bytes_path_and_raw_bytes: datasets' {"bytes", "path"} dicts, raw bytes, str and Path load.
- rgb_pil_image_passes_unchanged: an RGB PIL image comes back with the same pixels.
- truncated_file_names_path_and_fix: a truncated JPEG / PNG names the path and the fix.
- lazily_opened_truncated_pil_image: a truncated file opened lazily by PIL fails clearly when decoded.
- pil_image_whose_file_was_closed: an image whose file was closed fails clearly.
- garbage_bytes_are_not_an_image: random bytes are named as not an image.
- png_with_corrupt_pixel_data: a PNG with corrupt pixel data fails clearly.
- zero_byte_file: an empty file is named as empty.
- text_file_named_png: a text file with an image suffix is named as text.
- dicom_where_png_expected_names_pydicom: a DICOM file names pydicom as the fix.
- missing_path: a missing file, or a folder, names the path as not found.
- decompression_bomb_is_refused: an image over PIL's bomb limit is refused.
- decompression_bomb_warning_zone: in PIL's warning zone an image loads and the warning reaches the caller (an
  ImageLoadError under -W error); past it, refused.
- array_of_bad_shape: arrays of shapes that are no image are refused with the shape named.
- zero_dim_array: a 0-d array is refused.
- empty_array: arrays with a zero dimension are refused.
- nan_or_inf_array: NaN / inf anywhere in an array is refused.
- float_pil_image_with_nan: a float PIL image with NaN is refused.
- array_of_unsupported_dtype: complex, object and other dtypes are refused by name.
- unsupported_object_type: objects that are no image source are refused by type.
- datasets_dict_without_bytes_or_path: a dict without bytes or path is refused.
- empty_pil_image: a 0-pixel PIL image is refused.
- tiff_with_mistyped_tag_is_a_clear_error: a TIFF with a mistyped tag gives an ImageLoadError, not a crash.
- property_any_mode_and_size_gives_rgb_of_same_size: any PIL mode and size, in memory or on disk, gives RGB of that
  size.
- property_arrays_and_tensors_give_rgb_of_same_size: arrays and tensors of every dtype and layout give RGB of their
  size.
- property_any_array_gives_rgb_or_image_load_error: any shape, dtype and NaN/inf placement gives RGB or
  ImageLoadError.
- fuzzed_files_give_rgb_or_image_load_error: mutated bytes of real files give RGB or ImageLoadError, nothing else.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_adapters.images import ImageLoadError, load_image, to_rgb

CORRUPT = r"truncated or corrupt .*re-export or remove it"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(h: int, w: int, channels: int = 3, seed: int = 0) -> Image.Image:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# --------------------------------------------------------------------------- conversions


def test_16bit_grayscale_png_is_stretched_to_full_range_not_clipped(tmp_path):
    # an X-ray export: uint16 but only 1000..5000 used; a plain convert("RGB") would be all white
    raw = np.linspace(1000, 5000, 8 * 16).reshape(8, 16).astype(np.uint16)
    path = tmp_path / "xray.png"
    Image.fromarray(raw).save(path)
    assert Image.open(path).mode == "I;16"
    out = pixels(load_image(path))
    assert out.shape == (8, 16, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    grey = out[..., 0]
    assert grey.min() == 0 and grey.max() == 255  # the used range spans the full 8 bits
    expected = np.round((raw.astype(float) - 1000) / 4000 * 255)
    np.testing.assert_array_equal(grey, expected)
    assert (np.diff(grey.ravel()) >= 0).all()  # order of intensities kept
    assert (grey == 255).mean() < 0.05  # not clipped to white


def test_mode_I_and_F_are_stretched_over_their_own_range():
    out = pixels(load_image(Image.fromarray(np.array([[-100, 50_000, 100_000]], dtype=np.int32))))
    assert Image.fromarray(np.zeros((1, 1), np.int32)).mode == "I"
    assert out[0, :, 0].tolist() == [0, 128, 255]  # (50000 + 100) / 100100 * 255 = 127.6, not clipped
    out = pixels(load_image(Image.fromarray(np.array([[-1.5, 0.0, 2.5]], dtype=np.float32))))
    assert out[0, :, 0].tolist() == [0, 96, 255]  # (0 + 1.5) / 4 * 255 = 95.6


def test_constant_high_bit_depth_image_becomes_black_not_an_error():
    out = pixels(load_image(Image.fromarray(np.full((3, 4), 777, dtype=np.uint16))))
    assert (out == 0).all()


def test_one_bit_image_gives_black_and_white():
    image = Image.fromarray((np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    assert image.mode == "1"
    out = pixels(load_image(image))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert set(np.unique(out)) == {0, 255}


def test_palette_image_without_transparency_uses_its_palette_colours():
    image = Image.new("P", (3, 1))
    image.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    out = pixels(load_image(encode(image, "PNG")))
    assert out[0].tolist() == [[200, 10, 10], [10, 200, 10], [10, 10, 200]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_image_with_transparency_composites_onto_white(fmt):
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 10, 200, 10, 10, 10, 200] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    data = encode(image, fmt, transparency=0)  # index 0 (black in the palette) is transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = pixels(load_image(data))
    assert out[0].tolist() == [[255, 255, 255], [10, 200, 10], [10, 10, 200]]


def test_rgba_composites_onto_white():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = pixels(load_image(encode(Image.fromarray(rgba), "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not black
    assert out[0, 1].tolist() == [10, 20, 30]  # opaque -> unchanged
    assert all(abs(v - 127) <= 1 for v in out[0, 2])  # half-transparent black -> mid grey


def test_la_composites_onto_white():
    la = np.array([[[0, 0], [40, 255], [0, 128]]], dtype=np.uint8)
    image = Image.fromarray(la)
    assert image.mode == "LA"
    out = pixels(load_image(image))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [40, 40, 40]
    assert all(abs(v - 127) <= 1 for v in out[0, 2])


@pytest.mark.parametrize("mode", ["RGBa", "La", "PA"])
def test_other_alpha_modes_composite_onto_white(mode):
    out = pixels(load_image(Image.new(mode, (2, 2))))  # all-zero: fully transparent
    assert (out == 255).all()


def test_cmyk_jpeg_on_disk_reads_back_as_sensible_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    image = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # white
    image.paste((0, 255, 255, 0), (0, 0, 8, 8))  # left half red (no cyan, full magenta + yellow)
    image.save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = pixels(load_image(str(path)))
    assert np.abs(out[4, 2] - [255, 0, 0]).max() <= 12
    assert np.abs(out[4, 13] - [255, 255, 255]).max() <= 12


@pytest.mark.parametrize("orientation, red_half", [(6, "top"), (8, "bottom")])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, red_half):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # stored left half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)
    out = load_image(path)
    assert out.size == (20, 40)  # width and height swapped
    arr = pixels(out)
    top, bottom = arr[5, 10], arr[35, 10]
    red, blue = (top, bottom) if red_half == "top" else (bottom, top)
    assert red[0] > 200 and red[2] < 60, (top, bottom)
    assert blue[2] > 200 and blue[0] < 60, (top, bottom)


def test_one_by_one_images():
    assert pixels(load_image(Image.new("RGB", (1, 1), (1, 2, 3))))[0, 0].tolist() == [1, 2, 3]
    assert pixels(load_image(encode(Image.new("L", (1, 1), 77), "PNG")))[0, 0].tolist() == [77] * 3
    assert pixels(load_image(encode(Image.new("RGB", (1, 1), (9, 99, 199)), "BMP")))[0, 0].tolist() == [9, 99, 199]
    assert pixels(load_image(np.array([[[5, 6, 7]]], dtype=np.uint8)))[0, 0].tolist() == [5, 6, 7]
    assert load_image(np.array([[0.5]])).size == (1, 1)
    assert load_image(Image.fromarray(np.array([[1234]], dtype=np.uint16))).size == (1, 1)


def test_numpy_hw_uint8_is_grey():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = pixels(load_image(arr))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_numpy_hwc_uint8_is_exact():
    arr = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pixels(load_image(arr)), arr)
    np.testing.assert_array_equal(pixels(load_image(arr[..., :1])), np.repeat(arr[..., :1], 3, axis=2))  # HxWx1


def test_numpy_hwc4_composites_onto_white():
    arr = np.zeros((2, 5, 4), dtype=np.uint8)
    arr[0, :] = [10, 20, 30, 255]
    out = pixels(load_image(arr))
    assert (out[0] == [10, 20, 30]).all() and (out[1] == 255).all()


def test_numpy_chw_float_in_unit_range_is_scaled_and_transposed():
    chw = np.full((3, 5, 6), 0.25, dtype=np.float32)  # does not span 0..1: scaled by 255, not stretched
    chw[0, 1, 2], chw[1, 1, 2], chw[2, 1, 2] = 0.6, 0.5, 0.2
    out = load_image(chw)
    assert out.size == (6, 5)
    assert pixels(out)[1, 2].tolist() == [153, 128, 51]
    assert pixels(out)[0, 0].tolist() == [64, 64, 64]


def test_numpy_uint16_array_is_stretched():
    arr = np.array([[1000, 3000, 5000]], dtype=np.uint16)
    assert pixels(load_image(arr))[0, :, 0].tolist() == [0, 128, 255]


def test_numpy_bool_array_is_black_and_white():
    arr = np.array([[True, False], [False, True]])
    out = pixels(load_image(arr))
    assert out[..., 0].tolist() == [[255, 0], [0, 255]]


def test_torch_chw_float_tensor():
    t = torch.full((3, 4, 6), 0.5)
    t[:, 2, 3] = torch.tensor([0.2, 0.8, 0.4])
    t.requires_grad_(True)
    out = load_image(t)
    assert out.size == (6, 4)
    assert pixels(out)[2, 3].tolist() == [51, 204, 102]
    assert pixels(out)[0, 0].tolist() == [128, 128, 128]


def test_torch_uint8_chw_and_bfloat16_tensors():
    t = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    np.testing.assert_array_equal(pixels(load_image(t)), t.permute(1, 2, 0).numpy())
    assert load_image(torch.rand(3, 8, 9, dtype=torch.bfloat16)).size == (9, 8)


def test_datasets_dict_bytes_path_and_raw_bytes(tmp_path):
    image = Image.new("RGB", (4, 3), (12, 34, 56))
    data = encode(image, "PNG")
    for source in ({"bytes": data, "path": None}, {"bytes": data, "path": "a.png"}, data):
        out = load_image(source)
        assert out.size == (4, 3) and pixels(out)[1, 1].tolist() == [12, 34, 56]
    path = tmp_path / "b.png"
    path.write_bytes(data)
    for source in ({"bytes": None, "path": str(path)}, str(path), Path(path)):
        assert pixels(load_image(source))[0, 0].tolist() == [12, 34, 56]


def test_rgb_pil_image_passes_unchanged():
    image = noise(6, 5)
    np.testing.assert_array_equal(np.asarray(load_image(image)), np.asarray(image))
    assert to_rgb(image).mode == "RGB"


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file_names_path_and_fix(tmp_path, fmt, suffix):
    data = encode(noise(64, 64), fmt)
    path = tmp_path / f"scan_0042.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=rf"scan_0042\.{suffix}: the image is {CORRUPT}"):
        load_image(str(path))


def test_lazily_opened_truncated_pil_image(tmp_path):
    data = encode(noise(64, 64), "PNG")
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"half\.png: the image is " + CORRUPT):
        load_image(Image.open(path))  # Image.open() is lazy; the damage shows when pixels are read


def test_pil_image_whose_file_was_closed(tmp_path):
    path = tmp_path / "c.png"
    Image.new("RGB", (4, 4)).save(path)
    with Image.open(path) as image:
        pass
    with pytest.raises(ImageLoadError, match=r"file was closed before its pixels were read; call \.load\(\)"):
        load_image(image)
    with Image.open(path) as loaded:
        loaded.load()
    assert load_image(loaded).size == (4, 4)  # loaded inside the block: fine


def test_garbage_bytes_are_not_an_image():
    with pytest.raises(ImageLoadError, match=r"image bytes: not an image PIL can read \(wrong extension"):
        load_image(b"this is not an image, just some bytes" * 10)


def test_png_with_corrupt_pixel_data():
    data = bytearray(encode(noise(32, 32), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = bytes(40)  # zero out part of the compressed stream
    with pytest.raises(ImageLoadError, match=CORRUPT):
        load_image(bytes(data))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png: the file is empty \(0 bytes\); re-export or remove it"):
        load_image(path)
    with pytest.raises(ImageLoadError, match=r"file is empty"):
        load_image({"bytes": b"", "path": "x.png"})


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("label,comment\nnormal,looks fine\n")
    with pytest.raises(
        ImageLoadError, match=r"notes\.png: not an image PIL can read \(wrong extension or another file type\)"
    ):
        load_image(str(path))


def write_dicom(path: Path) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "CR", "Test^Patient"
    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(16, dtype=np.uint16).reshape(4, 4).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_with_a_png_extension_is_read_as_dicom(tmp_path):
    path = tmp_path / "chest.png"  # exported with the wrong extension: the DICM magic still says DICOM
    write_dicom(path)
    assert path.read_bytes()[128:132] == b"DICM"
    expected = np.round(np.arange(16).reshape(4, 4) / 15 * 255)  # no window: stretched over 0..15
    np.testing.assert_array_equal(pixels(load_image(path))[..., 0], expected)
    np.testing.assert_array_equal(pixels(load_image({"bytes": path.read_bytes(), "path": None}))[..., 0], expected)


def test_missing_path(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.jpg: file not found"):
        load_image(str(tmp_path / "nope.jpg"))
    with pytest.raises(ImageLoadError, match=r"file not found"):
        load_image(tmp_path)  # a folder is not an image file either


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG written row by row: ~50 KB on disk for 20000x20000, and no
    image of that size is ever held in memory (PIL's mode "1" would take 400 MB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_bilevel_png(20000, 20000))
    assert path.stat().st_size < 200_000
    with pytest.raises(
        ImageLoadError, match=r"huge\.png: .*decompression bomb; downscale it, or raise PIL\.Image\.MAX_IMAGE_PIXELS"
    ):
        load_image(path)


def test_decompression_bomb_warning_zone(monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that PIL warns and decodes; load_image keeps that, and the
    # warning reaches the caller. Limits are lowered so the images stay tiny.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    small, big, bomb = (_bilevel_png(s, s) for s in (30, 40, 50))  # 900, 1600, 2500 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(small).size == (30, 30)
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(big).size == (40, 40)
    with warnings.catch_warnings():  # warnings as errors (-W error): still an ImageLoadError
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError, match=r"decompression bomb; downscale it"):
            load_image(big)
    with pytest.raises(ImageLoadError, match=r"decompression bomb"):
        load_image(bomb)


@pytest.mark.parametrize("shape", [(5, 6, 2), (1, 3, 8, 8), (10,), (5, 6, 5), (2, 3, 4, 5, 6)])
def test_array_of_bad_shape(shape):
    with pytest.raises(
        ImageLoadError, match=r"cannot read an image array of shape .*; pass HxW, HxWxC or CxHxW with C in 1, 3, 4"
    ):
        load_image(np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ImageLoadError, match=r"cannot read an image array of shape"):
        load_image(torch.zeros(shape))


def test_zero_dim_array():
    with pytest.raises(ImageLoadError, match=r"array of shape \(\)"):
        load_image(np.array(3.0))


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (0, 5, 3), (3, 0, 7), (4, 0, 3)])
def test_empty_array(shape):
    with pytest.raises(ImageLoadError, match=r"image array of shape .* is empty"):
        load_image(np.zeros(shape, dtype=np.float32))


@pytest.mark.parametrize(
    "array",
    [
        np.full((4, 4), np.nan),
        np.array([[0.2, np.nan], [0.4, 0.5]]),  # otherwise a valid [0, 1] image
        np.array([[0.0, 5.0], [np.nan, 2.0]]),  # otherwise stretched
        np.array([[0.0, np.inf]]),
        np.array([[-np.inf, 1.0]], dtype=np.float32),
    ],
    ids=["all-nan", "one-nan-unit-range", "one-nan-wide-range", "inf", "minus-inf"],
)
def test_nan_or_inf_array(array):
    with pytest.raises(ImageLoadError, match=r"holds NaN or inf values; clean it before passing it in"):
        load_image(array)
    with pytest.raises(ImageLoadError, match=r"NaN or inf"):
        load_image(torch.from_numpy(array.copy()))


def test_float_pil_image_with_nan():
    with pytest.raises(ImageLoadError, match=r"NaN or inf"):
        load_image(Image.fromarray(np.array([[0.0, 3.0, np.nan]], dtype=np.float32)))


@pytest.mark.parametrize(
    "array",
    [np.ones((2, 2), dtype=np.complex64), np.array([["a", "b"]]), np.array([[None, 1]], dtype=object)],
    ids=["complex", "str", "object"],
)
def test_array_of_unsupported_dtype(array):
    with pytest.raises(ImageLoadError, match=r"array of dtype .*; pass bool, integer or float pixel values"):
        load_image(array)


@pytest.mark.parametrize(
    "source", [3, 2.5, None, [[0, 1], [1, 0]], object()], ids=["int", "float", "None", "list", "object"]
)
def test_unsupported_object_type(source):
    name = type(source).__name__
    with pytest.raises(
        ImageLoadError, match=rf"cannot use an object of type {name} as an image; pass a PIL image, a file path"
    ):
        load_image(source)


def test_datasets_dict_without_bytes_or_path():
    with pytest.raises(ImageLoadError, match=r"type NoneType"):
        load_image({"bytes": None, "path": None})


def test_empty_pil_image():
    with pytest.raises(ImageLoadError, match=r"size \(0, 0\); it holds no pixels"):
        load_image(Image.new("RGB", (0, 0)))


def _tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag says FLOAT: PIL raised a bare TypeError on it (found by the fuzz test)."""
    data = bytearray(encode(Image.new("RGB", (16, 12), (10, 20, 30)), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        pos = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, pos)[0] == 273:
            struct.pack_into("<H", data, pos + 2, 11)
            return bytes(data)
    raise AssertionError("no StripOffsets tag")


def test_tiff_with_mistyped_tag_is_a_clear_error():
    with pytest.raises(ImageLoadError, match=r"the image is truncated or corrupt \(TypeError"):
        load_image(_tiff_with_float_strip_offsets())


# --------------------------------------------------------------------------- properties

MODES = ["L", "RGB", "RGBA", "P", "I;16", "I", "F", "1", "CMYK", "LA"]
FORMATS = {  # file formats that store each mode as it is, for the round-trip variant
    "L": "PNG", "RGB": "JPEG", "RGBA": "PNG", "P": "GIF", "I;16": "PNG", "I": "TIFF",
    "F": "TIFF", "1": "BMP", "CMYK": "JPEG", "LA": "PNG",
}  # fmt: skip


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray((rng.standard_normal((height, width)) * 1e4).astype(np.float32))
    if mode == "P":
        image = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if seed % 2:
            image.info["transparency"] = 0
        return image
    image = Image.fromarray(rgba)
    return image if mode == "RGBA" else image.convert(mode)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    seed=st.integers(0, 2**16),
    via_file=st.booleans(),
    orientation=st.sampled_from([None, 3, 6, 8]),
)
def test_property_any_mode_and_size_gives_rgb_of_same_size(mode, width, height, seed, via_file, orientation):
    image = make_image(mode, width, height, seed)
    assert image.mode == mode and image.size == (width, height)
    source: object = image
    if via_file or orientation:
        fmt = "JPEG" if orientation else FORMATS[mode]
        if fmt == "JPEG" and mode not in ("RGB", "L", "CMYK"):
            image = to_rgb(image)
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        source = encode(image, fmt, exif=exif) if orientation else encode(image, fmt)
    try:
        out = load_image(source)
    except ImageLoadError as err:  # valid input: even a clear error is a failure here
        pytest.fail(f"valid {mode} {width}x{height} image refused: {err}")
    assert out.mode == "RGB"
    assert out.size == ((height, width) if orientation in (6, 8) else (width, height))
    if mode in ("L", "RGB") and not via_file and not orientation:  # lossless, no conversion needed
        np.testing.assert_array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.bool_]


def make_array(dtype, shape, seed: int, unit_range: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.floating):
        values = rng.random(shape) if unit_range else rng.standard_normal(shape) * 1000
        return values.astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), shape, dtype=dtype, endpoint=True)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["HW", "HWC1", "HWC3", "HWC4", "CHW1", "CHW3", "CHW4"]),
    height=st.integers(1, 64),
    width=st.integers(1, 64),
    seed=st.integers(0, 2**16),
    unit_range=st.booleans(),
    as_tensor=st.booleans(),
)
def test_property_arrays_and_tensors_give_rgb_of_same_size(dtype, layout, height, width, seed, unit_range, as_tensor):
    channels = int(layout[-1]) if layout != "HW" else 0
    if layout.startswith("CHW"):
        assume(width not in (1, 3, 4))  # (C, H, 3) reads as HxWx3: the documented ambiguity
        shape = (channels, height, width)
    else:
        shape = (height, width, channels) if channels else (height, width)
    array = make_array(dtype, shape, seed, unit_range)
    source = array
    if as_tensor and dtype not in (np.uint16,):  # torch has no general uint16 support
        source = torch.from_numpy(array)
    try:
        out = load_image(source)
    except ImageLoadError as err:
        pytest.fail(f"valid {dtype.__name__} array of shape {shape} refused: {err}")
    assert out.mode == "RGB" and out.size == (width, height)
    if dtype == np.uint8 and layout == "HWC3":
        np.testing.assert_array_equal(np.asarray(out), array)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=5).map(tuple),
    dtype=st.sampled_from(DTYPES + [np.complex64, np.int8, np.float16]),
    special=st.sampled_from([None, np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**16),
)
def test_property_any_array_gives_rgb_or_image_load_error(shape, dtype, special, seed):
    rng = np.random.default_rng(seed)
    array = (rng.random(shape) * 300).astype(dtype)
    if special is not None and array.size and np.issubdtype(dtype, np.inexact):
        array.flat[rng.integers(0, array.size)] = special
    try:
        out = load_image(array)
    except ImageLoadError:
        return
    assert out.mode == "RGB"
    assert out.width >= 1 and out.height >= 1


# --------------------------------------------------------------------------- fuzzing the file path


def seed_files() -> dict[str, bytes]:
    image = noise(12, 16, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "camera"
    return {
        "png": encode(image, "PNG"),
        "png-rgba": encode(image.convert("RGBA"), "PNG"),
        "png-16bit": encode(Image.fromarray(np.asarray(image)[..., 0].astype(np.uint16) * 200), "PNG"),
        "png-palette-trns": encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", transparency=1),
        "jpeg": encode(image, "JPEG"),
        "jpeg-exif": encode(image, "JPEG", exif=exif),
        "jpeg-cmyk": encode(image.convert("CMYK"), "JPEG"),
        "gif": encode(image.convert("P"), "GIF"),
        "gif-animated": encode(image, "GIF", save_all=True, append_images=[image.rotate(90)]),
        "bmp": encode(image, "BMP"),
        "tiff": encode(image, "TIFF"),
        "tiff-lzw-exif": encode(image.convert("RGBA"), "TIFF", compression="tiff_lzw", exif=exif),
    }


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    op = rng.integers(0, 5)
    if op == 0:  # a few random byte flips anywhere
        for _ in range(rng.integers(1, 6)):
            out[rng.integers(0, len(out))] = rng.integers(0, 256)
    elif op == 1:  # flips in the header, where sizes, types and offsets live
        for _ in range(rng.integers(1, 4)):
            out[rng.integers(0, min(len(out), 96))] ^= 1 << rng.integers(0, 8)
    elif op == 2:  # truncation
        del out[rng.integers(0, len(out)) :]
    elif op == 3:  # insertion
        pos = rng.integers(0, len(out) + 1)
        out[pos:pos] = rng.integers(0, 256, rng.integers(1, 32), dtype=np.uint8).tobytes()
    else:  # deletion
        pos = rng.integers(0, len(out))
        del out[pos : pos + rng.integers(1, 32)]
    return bytes(out)


@pytest.mark.filterwarnings("ignore")  # TIFF "Truncated File Read" and similar decoder warnings
def test_fuzzed_files_give_rgb_or_image_load_error(monkeypatch):
    # A flipped header byte can declare a huge image; the lower limit keeps such cases to a clear
    # decompression-bomb error instead of a large allocation.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    seeds = seed_files()
    for name, data in seeds.items():  # the unmutated seeds are valid
        assert load_image(data).mode == "RGB", name
    rng = np.random.default_rng(20240611)
    outcomes = {"rgb": 0, "error": 0}
    escaped = []
    for i in range(480):
        name = list(seeds)[i % len(seeds)]
        data = mutate(seeds[name], rng)
        try:
            out = load_image({"bytes": data, "path": f"fuzz_{i}_{name}"})
        except ImageLoadError as err:
            assert f"fuzz_{i}_{name}" in str(err)
            outcomes["error"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            escaped.append(f"case {i} ({name}): {type(err).__name__}: {err}")
            continue
        assert out.mode == "RGB" and out.width >= 1 and out.height >= 1
        outcomes["rgb"] += 1
    assert not escaped, "\n".join(escaped)
    assert outcomes["rgb"] > 20 and outcomes["error"] > 100, outcomes  # the mutations hit both paths
