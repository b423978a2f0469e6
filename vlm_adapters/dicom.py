"""Decode a DICOM file into the 8-bit image a viewer shows, for `load_image`.

Stored values go through the modality LUT (RescaleSlope / RescaleIntercept), then the VOI LUT or
else the window the file carries (no VOI: stretched over the pixel range), and stay float until the
one final mapping to 8 bits, so a narrow window on 12- or 16-bit data keeps its contrast; MONOCHROME1
is inverted. pydicom (the `dicom` extra) is imported only when a DICOM file arrives.
"""

from __future__ import annotations

from typing import IO, Any

import numpy as np
from PIL import Image

from .pixels import ImageLoadError, stretch_to_uint8

_INSTALL = 'pip install "vlm-adapters[dicom]"'


def decode_dicom(fileobj: IO[bytes], name: str) -> Image.Image:
    """An 8-bit grey (mode L) or RGB image of a single-frame DICOM file, or ImageLoadError."""
    ds = _read(fileobj, name)
    _check_one_frame(ds, name)
    pixels = _pixel_array(ds, name)
    try:
        if int(ds.get("SamplesPerPixel") or 1) == 1 and ds.PhotometricInterpretation != "PALETTE COLOR":
            return Image.fromarray(_grey_to_uint8(pixels, ds))
        return Image.fromarray(_colour_to_uint8(pixels, ds, name))
    except ImageLoadError:
        raise
    except Exception as err:  # a malformed rescale, window or LUT tag
        raise ImageLoadError(
            f"{name}: the DICOM display tags cannot be applied ({type(err).__name__}: {err}); fix or delete the "
            "rescale / window / LUT tags, or re-export the file."
        ) from err


def _read(fileobj: IO[bytes], name: str) -> Any:
    try:
        import pydicom
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    except ImportError as err:
        raise ImageLoadError(f"{name} is a DICOM file; reading it needs pydicom: {_INSTALL}") from err
    try:  # force: files without the 128-byte preamble and 'DICM' (older exports, raw datasets)
        ds = pydicom.dcmread(fileobj, force=True)
    except Exception as err:
        raise ImageLoadError(
            f"{name}: not a readable DICOM file ({type(err).__name__}: {err}); re-export or remove it."
        ) from err
    if "PixelData" not in ds:
        raise ImageLoadError(
            f"{name}: no image in this DICOM file (no Pixel Data element): it is corrupt, or a non-image object "
            "such as a report or an RT plan; re-export it or remove it from the image set."
        )
    if "TransferSyntaxUID" not in ds.file_meta:
        # A raw dataset has no file meta; pydicom found its encoding while reading it but needs the
        # transfer syntax written down to decode the pixels.
        syntaxes = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                    (False, False): ExplicitVRBigEndian}
        ds.file_meta.TransferSyntaxUID = syntaxes.get(tuple(ds.original_encoding), ImplicitVRLittleEndian)
    return ds


def _check_one_frame(ds: Any, name: str) -> None:
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as err:
        raise ImageLoadError(f"{name}: the DICOM Number of Frames is corrupt ({err}); re-export or remove it.") from err
    if frames > 1:
        raise ImageLoadError(
            f"{name}: a multi-frame DICOM file ({frames} frames) is not one image. Pass one frame as an array, "
            "windowed as you need it (e.g. pydicom.dcmread(path).pixel_array[i] through "
            "pydicom.pixels.apply_modality_lut and apply_voi_lut), or export the frames to separate files."
        )


def _decode_failure(syntax: Any, name: str, err: Exception) -> ImageLoadError:
    """Say whether a decoder is missing (and which to install) or the installed ones failed."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    head = f"{name}: pydicom cannot decode this file's pixel data, compressed as {syntax.name} ({syntax})"
    try:
        installed = get_decoder(syntax).available_plugins
    except NotImplementedError:  # video and other syntaxes pydicom has no decoder for
        return ImageLoadError(f"{head}; pydicom has no decoder for it: export the image as PNG or uncompressed DICOM.")
    # pylibjpeg covers the JPEG families (pydicom's message below lists the other plugins); pydicom
    # decodes RLE itself, so a failure there means a damaged file.
    if syntax in uid.JPEG2000TransferSyntaxes:
        plugin, packages = "pylibjpeg", "pylibjpeg pylibjpeg-openjpeg"
    elif syntax in uid.JPEGTransferSyntaxes or syntax in uid.JPEGLSTransferSyntaxes:
        plugin, packages = "pylibjpeg", "pylibjpeg pylibjpeg-libjpeg"
    else:
        plugin, packages = "gdcm", "python-gdcm"
    if plugin in installed or "pydicom" in installed:
        return ImageLoadError(
            f"{head}: the installed decoders ({', '.join(installed)}) failed on it, so it is damaged or a variant "
            f"they do not support; re-export it uncompressed (pydicom said: {err})"
        )
    return ImageLoadError(f"{head} with the decoders installed here; install one: pip install {packages} "
                          f"(pydicom said: {err})")


def _pixel_array(ds: Any, name: str) -> np.ndarray:
    try:
        # pydicom >= 3 returns YBR_FULL / YBR_FULL_422 data already converted to RGB (pixel_array's
        # default, through convert_color_space) and its JPEG 2000 decoders undo YBR_RCT / YBR_ICT.
        return ds.pixel_array
    except Exception as err:
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_transfer_syntax and syntax.is_compressed:
            raise _decode_failure(syntax, name, err) from err
        raise ImageLoadError(
            f"{name}: the DICOM pixel data is truncated or corrupt ({type(err).__name__}: {err}); "
            "re-export or remove it."
        ) from err


def _grey_to_uint8(stored: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(stored, ds)  # float64 when a rescale applies
    value_range: tuple[float, float] | None = None  # None: stretch over the pixel range
    if ds.get("VOILUTSequence") and "LUTData" in ds.VOILUTSequence[0]:
        # The LUT indexes integer modality values; rounding also spares pydicom's float-input path.
        values = apply_voi(np.rint(values).astype(np.int64), ds)
        count, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        # Its own entries bound the LUT's output: the descriptor's bit count is only an upper limit.
        entries = apply_voi(np.arange(first, first + (count or 2**16)), ds)
        value_range = (float(entries.min()), float(entries.max()))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_windowing(values, ds)
        # pydicom maps the window onto an output range it derives from the bit depth, signedness and
        # rescale; windowing -inf and +inf reads that range back instead of re-deriving it here.
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
        value_range = (float(low), float(high))
    grey = stretch_to_uint8(values, value_range)
    return 255 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def _colour_to_uint8(pixels: np.ndarray, ds: Any, name: str) -> np.ndarray:
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)  # uint8 or uint16, by the palette's entry size
        bits = 8 * pixels.dtype.itemsize
    else:
        bits = int(ds.BitsStored)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ImageLoadError(
            f"{name}: a DICOM colour image of shape {pixels.shape} ({ds.PhotometricInterpretation}); expected rows x "
            "columns x 3 samples. Re-export it as RGB."
        )
    if bits == 8:
        return pixels.astype(np.uint8)
    return stretch_to_uint8(pixels, (0.0, 2.0**bits - 1))  # colour keeps its absolute scale, not its range
