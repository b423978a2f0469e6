"""Turn whatever a user calls an image into an RGB `PIL.Image`, or say clearly why not.

Encoders' image processors expect 8-bit RGB. Medical and field data arrive as 16-bit grayscale
PNGs, palette or RGBA files, CMYK JPEGs, EXIF-rotated phone photos, arrays and tensors; PIL's
plain `.convert("RGB")` clips 16-bit data to white and drops the alpha channel onto black, so
the conversions are written out here.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Any  # PIL.Image | str | os.PathLike | np.ndarray | torch.Tensor | dict from datasets


class ImageLoadError(ValueError):
    """An image could not be read; the message names the source and the fix."""


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map a high-bit-depth or float array onto 0..255 using its own range (X-ray exports use
    only part of the 16-bit range, so a fixed /257 would leave them nearly black)."""
    array = array.astype(np.float64)
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if not np.isfinite(low) or not np.isfinite(high):
        raise ImageLoadError("image array holds NaN or inf values; clean it before passing it in.")
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) / (high - low) * 255.0).astype(np.uint8)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent pixels onto white, as a viewer shows them."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB without clipping high bit depths or blackening alpha."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_stretch_to_uint8(np.asarray(image))).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL converts these exactly


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW (torch layout) -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(
            f"cannot read an image array of shape {tuple(array.shape)}; pass HxW, HxWxC or CxHxW with C in 1, 3, 4."
        )
    if array.size == 0:
        raise ImageLoadError(f"image array of shape {tuple(array.shape)} is empty.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and np.nanmin(array) >= 0.0 and np.nanmax(array) <= 1.0:
            array = np.round(array * 255.0).astype(np.uint8)  # the usual [0, 1] float convention
        else:
            array = _stretch_to_uint8(array)
    return Image.fromarray(array)


def _decode(fileobj: Any, name: str) -> Image.Image:
    head = fileobj.read(132)
    fileobj.seek(0)
    if not head:
        raise ImageLoadError(f"{name}: the file is empty (0 bytes); re-export or remove it.")
    if head[128:132] == b"DICM":
        raise ImageLoadError(
            f"{name} is a DICOM file, not a PNG/JPEG. Read it with pydicom "
            "(pydicom.dcmread(path).pixel_array) and pass the array, or export it to PNG."
        )
    try:
        image = Image.open(fileobj)
        image.load()  # decode now so truncated files fail here, not inside the encoder
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            f"{name}: {err}. It is refused as a possible decompression bomb; downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not an image PIL can read (wrong extension or another file type).") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{name}: the image is truncated or corrupt ({err}); re-export or remove it.") from err
    return image


def _open_file(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ImageLoadError(f"{path}: file not found.")
    with open(path, "rb") as fh:
        return _decode(io.BytesIO(fh.read()), path)


def load_image(source: ImageInput) -> Image.Image:
    """Return an RGB PIL image from a PIL image, path, numpy array, torch tensor or datasets dict."""
    if isinstance(source, dict) and ("path" in source or "bytes" in source):  # datasets' undecoded Image
        if source.get("bytes") is not None:
            return to_rgb(_decode(io.BytesIO(source["bytes"]), source.get("path") or "image bytes"))
        source = source["path"]
    if isinstance(source, bytes):
        return to_rgb(_decode(io.BytesIO(source), "image bytes"))
    if isinstance(source, (str, os.PathLike)):
        return to_rgb(_open_file(os.fspath(source)))
    if isinstance(source, Image.Image):
        if source.width < 1 or source.height < 1:
            raise ImageLoadError(f"image has size {source.size}; it holds no pixels.")
        return to_rgb(source)
    if type(source).__module__.startswith("torch"):
        source = source.detach().cpu().float().numpy() if source.is_floating_point() else source.cpu().numpy()
    if isinstance(source, np.ndarray):
        return to_rgb(_array_to_pil(source))
    raise ImageLoadError(
        f"cannot use an object of type {type(source).__name__} as an image; pass a PIL image, a file path, "
        "a numpy array or a torch tensor."
    )
