"""DICOM through `load_image`, on the sample files that ship inside pydicom (never downloaded) and
variants of them written to tmp_path. What each test proves:

- test_ct_rescale_then_window_matches_the_standard: CT values are rescaled to HU, then windowed as
  PS3.3 C.11.2.1.2 says (within 1 grey level of an independent computation), and the image is not flat.
- test_mr_window_keeps_the_contrast_a_naive_16bit_mapping_loses: MR_small's window gives the standard's
  grey levels, many more than stored / 257; the same image in other encodings decodes identically.
- test_monochrome1_is_the_inverse_of_monochrome2: MONOCHROME1 is shown inverted.
- test_voi_lut_is_used_over_the_window: a VOI LUT wins over the window and fills the 8 bits from its
  own entries (12-bit values in a LUT declared 16-bit still reach white).
- test_no_window_stretches_over_the_pixel_range: without VOI LUT or window, the rescaled range fills 0..255.
- test_multi_frame_is_a_clear_error: multi-frame files name their frame count and the fix.
- test_colour_dicom_gives_rgb: RGB is kept, YBR_FULL_422 becomes RGB (close to the RGB file of the same
  picture, far from the raw YBR values), 12-bit RGB maps from its full scale, 16-bit RGB equals its
  8-bit twin, a palette maps through its LUT.
- test_bytes_path_and_datasets_rows_give_the_same_image: bytes, str, Path and datasets' {"path", "bytes"}
  rows (through a real datasets column) all decode alike.
- test_file_without_preamble_is_read_by_its_suffix: a raw dataset (no preamble, no file meta) in each
  encoding reads as DICOM when named .dcm, and is refused when named .png.
- test_damaged_dicom_is_an_image_load_error: text named .dcm, a truncated file, a corrupt frame count.
- test_compressed_without_a_decoder_names_the_syntax_and_package: JPEG-LS decodes when a plugin is there,
  else the error names the transfer syntax and what to pip-install.
- test_damaged_compressed_data_is_not_blamed_on_a_missing_decoder: when pydicom's own RLE decoder fails,
  the error says the file is damaged instead of asking for a package.
- test_missing_pydicom_names_the_extra: without pydicom the error names `vlm-adapters[dicom]`.
- test_image_suffixes_include_dicom: the folder-scan helper keeps .dcm / PIL formats, drops others.
- test_classify_accepts_a_dicom_path: VisionTower.preprocess and model.classify take a .dcm path.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import datasets
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless

from vlm_adapters import attach
from vlm_adapters.images import IMAGE_SUFFIXES, ImageLoadError, is_image_file, load_image

SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"


def sample(name: str) -> Path:
    """A sample shipped inside the installed pydicom (get_testdata_file may download the others)."""
    path = SAMPLES / name
    assert path.is_file(), f"{name} does not ship with pydicom {pydicom.__version__}"
    return path


def grey(source) -> np.ndarray:
    rgb = np.asarray(load_image(source)).astype(int)
    assert rgb.ndim == 3 and (rgb == rgb[..., :1]).all(), "a grey DICOM should give R = G = B"
    return rgb[..., 0]


def standard_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, written from the standard rather than pydicom."""
    centre, span = center - 0.5, width - 1
    y = ((values - centre) / span + 0.5) * 255
    return np.round(np.where(values <= centre - span / 2, 0, np.where(values > centre + span / 2, 255, y)))


def saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path)
    return path


@pytest.mark.parametrize("name, window", [("CT_small.dcm", (40.0, 400.0)), ("693_J2KI.dcm", None)])
def test_ct_rescale_then_window_matches_the_standard(tmp_path, name, window):
    ds = pydicom.dcmread(sample(name))
    path = sample(name)
    if window is not None:  # CT_small has a rescale but no window: add a soft-tissue one
        ds.WindowCenter, ds.WindowWidth = window
        path = saved(ds, tmp_path / name)
    assert float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = grey(path)
    expected = standard_window(hu, float(ds.WindowCenter), float(ds.WindowWidth))
    assert np.abs(out - expected).max() <= 1
    assert out.std() > 20 and len(np.unique(out)) > 50  # not flat: the window kept the detail
    assert 0 < (out == 0).mean() < 0.9 and 0 < (out == 255).mean() < 0.9


@pytest.mark.parametrize("variant", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"])
def test_mr_window_keeps_the_contrast_a_naive_16bit_mapping_loses(variant):
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    assert ds.BitsAllocated == 16 and (ds.WindowCenter, ds.WindowWidth) == (600, 1600)
    out = grey(sample("MR_small.dcm"))
    expected = standard_window(ds.pixel_array.astype(float), 600, 1600)
    assert np.abs(out - expected).max() <= 1
    naive = np.round(ds.pixel_array / 257)
    assert len(np.unique(naive)) <= 10 < 150 < len(np.unique(out))
    np.testing.assert_array_equal(grey(sample(variant)), out)


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = grey(saved(ds, tmp_path / "mono1.dcm"))
    np.testing.assert_array_equal(inverted, 255 - grey(sample("MR_small.dcm")))


def test_voi_lut_is_used_over_the_window(tmp_path):
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    entries = np.round(np.sqrt(np.arange(4096) / 4095) * 4095).astype(int)  # 12-bit values
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", entries.tolist())  # LUT Data
    ds.VOILUTSequence = [item]
    assert "WindowCenter" in ds
    out = grey(saved(ds, tmp_path / "voi.dcm"))
    expected = np.round(entries[ds.pixel_array] / 4095 * 255)
    assert np.abs(out - expected).max() <= 1
    assert np.abs(out - grey(sample("MR_small.dcm"))).max() > 20  # not the window's image


def test_no_window_stretches_over_the_pixel_range():
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
    raw = ds.pixel_array.astype(float)
    expected = np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    np.testing.assert_array_equal(grey(sample("CT_small.dcm")), expected)


@pytest.mark.parametrize("name, frames", [("rtdose.dcm", 15), ("SC_rgb_rle_2frame.dcm", 2)])
def test_multi_frame_is_a_clear_error(name, frames):
    message = rf"{name}: a multi-frame DICOM file \({frames} frames\).*pixel_array\[i\]"
    with pytest.raises(ImageLoadError, match=message):
        load_image(sample(name))


def test_colour_dicom_gives_rgb(tmp_path):
    rgb = pydicom.dcmread(sample("examples_rgb_color.dcm"))
    assert rgb.PhotometricInterpretation == "RGB" and rgb.get("PlanarConfiguration", 0) == 0
    np.testing.assert_array_equal(np.asarray(load_image(sample("examples_rgb_color.dcm"))), rgb.pixel_array)
    # 12-bit RGB using only the lower half of its range keeps its absolute scale (not stretched)
    eight = rgb.pixel_array.astype(int)
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 16, 12, 11
    rgb.PixelData = (eight * 8).astype("<u2").tobytes()
    twelve = np.asarray(load_image(saved(rgb, tmp_path / "rgb12.dcm")))
    np.testing.assert_array_equal(twelve, np.round(eight * 8 / 4095 * 255))

    reference = np.asarray(load_image(sample("SC_rgb_rle.dcm"))).astype(int)  # the same picture in RGB
    ybr = pydicom.dcmread(sample("SC_ybr_full_422_uncompressed.dcm"))
    ybr.pixel_array_options(raw=True)
    assert ybr.PhotometricInterpretation == "YBR_FULL_422"
    converted = np.asarray(load_image(sample("SC_ybr_full_422_uncompressed.dcm"))).astype(int)
    assert np.abs(converted - reference).mean() < 2 < 20 < np.abs(ybr.pixel_array.astype(int) - reference).mean()

    np.testing.assert_array_equal(np.asarray(load_image(sample("SC_rgb_rle_16bit.dcm"))), reference)

    palette = pydicom.dcmread(sample("examples_palette.dcm"))
    assert palette.PhotometricInterpretation == "PALETTE COLOR"
    tables = [np.frombuffer(palette[f"{c}PaletteColorLookupTableData"].value, "<u2") for c in ("Red", "Green", "Blue")]
    first = palette.RedPaletteColorLookupTableDescriptor[1]
    expected = np.stack([np.round(t[palette.pixel_array - first] / 65535 * 255) for t in tables], axis=-1)
    np.testing.assert_array_equal(np.asarray(load_image(sample("examples_palette.dcm"))), expected)


def test_bytes_path_and_datasets_rows_give_the_same_image():
    path = sample("MR_small.dcm")
    expected = grey(path)
    column = datasets.Dataset.from_dict(
        {"image": [{"bytes": path.read_bytes(), "path": None}, {"bytes": None, "path": str(path)}]},
        features=datasets.Features({"image": datasets.Image(decode=False)}),
    )
    for source in [path.read_bytes(), str(path), column[0]["image"], column[1]["image"]]:
        np.testing.assert_array_equal(grey(source), expected)


@pytest.mark.parametrize(  # dcmwrite does not byte-swap Pixel Data: big endian starts from a big-endian file
    "source, implicit, little",
    [("MR_small.dcm", True, True), ("MR_small.dcm", False, True), ("MR_small_bigendian.dcm", False, False)],
)
def test_file_without_preamble_is_read_by_its_suffix(tmp_path, source, implicit, little):
    ds = pydicom.dcmread(sample(source))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    raw = buffer.getvalue()
    assert raw[128:132] != b"DICM"
    (tmp_path / "scan.dcm").write_bytes(raw)
    expected = grey(sample("MR_small.dcm"))
    np.testing.assert_array_equal(grey(tmp_path / "scan.dcm"), expected)
    np.testing.assert_array_equal(grey({"bytes": raw, "path": "scan.DCM"}), expected)
    (tmp_path / "scan.png").write_bytes(raw)
    with pytest.raises(ImageLoadError, match="not an image PIL can read"):
        load_image(tmp_path / "scan.png")


def test_damaged_dicom_is_an_image_load_error(tmp_path):
    (tmp_path / "notes.dcm").write_text("patient notes, not an image\n" * 20)
    with pytest.raises(ImageLoadError, match=r"notes\.dcm: no image in this DICOM file"):
        load_image(tmp_path / "notes.dcm")
    (tmp_path / "cut.dcm").write_bytes(sample("MR_small.dcm").read_bytes()[:2000])
    with pytest.raises(ImageLoadError, match=r"cut\.dcm: the DICOM pixel data is truncated or corrupt"):
        load_image(tmp_path / "cut.dcm")
    with pytest.raises(ImageLoadError, match=r"MR_truncated\.dcm: the DICOM pixel data is truncated or corrupt"):
        load_image(sample("MR_truncated.dcm"))
    with pytest.raises(ImageLoadError, match=r"badVR\.dcm: the DICOM Number of Frames is corrupt"):
        load_image(sample("badVR.dcm"))


def test_compressed_without_a_decoder_names_the_syntax_and_package():
    path = sample("MR_small_jpeg_ls_lossless.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLSLossless
    if get_decoder(JPEGLSLossless).is_available:  # a plugin is installed: it decodes losslessly
        np.testing.assert_array_equal(grey(path), grey(sample("MR_small.dcm")))
    else:
        message = r"compressed as JPEG-LS Lossless .*install one: pip install pylibjpeg pylibjpeg-libjpeg"
        with pytest.raises(ImageLoadError, match=message):
            load_image(path)


def test_damaged_compressed_data_is_not_blamed_on_a_missing_decoder():
    ds = pydicom.dcmread(sample("MR_small_RLE.dcm"))
    ds.PixelData = encapsulate([b"\x05" + bytes(163)])  # an RLE header announcing 5 segments, not 2
    buffer = io.BytesIO()
    ds.save_as(buffer)
    message = r"rle\.dcm: .*compressed as RLE Lossless .*decoders \(.*pydicom.*\) failed on it, so it is damaged"
    with pytest.raises(ImageLoadError, match=message):
        load_image({"bytes": buffer.getvalue(), "path": "rle.dcm"})


def test_missing_pydicom_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now raises ImportError
    with pytest.raises(ImageLoadError, match=r'MR_small\.dcm is a DICOM file; .*pip install "vlm-adapters\[dicom\]"'):
        load_image(sample("MR_small.dcm"))


def test_image_suffixes_include_dicom():
    assert {".dcm", ".png", ".jpg", ".jpeg", ".tif", ".bmp"} <= IMAGE_SUFFIXES
    assert is_image_file("scans/CHEST.DCM") and is_image_file(Path("a/b.Png")) and is_image_file("x.dicom")
    for other in ["notes.txt", "report.pdf", "volume.h5", "clip.mpg", "labels.csv", "dcm"]:
        assert not is_image_file(other), other


def test_classify_accepts_a_dicom_path(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir)
    path = str(sample("MR_small.dcm"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 64)
    np.testing.assert_array_equal(model.vision.preprocess([path]).numpy(), model.vision.preprocess([image]).numpy())
    labels = ["red", "green", "blue"]
    assert model.classify(path, labels) == pytest.approx(model.classify(image, labels), abs=1e-6)
