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
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .pixels import ImageLoadError, check_finite, stretch_to_uint8

ImageInput = Any  # PIL.Image | str | os.PathLike | np.ndarray | torch.Tensor | dict from datasets


DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})


def _pil_suffixes() -> frozenset[str]:
    # PIL only identifies MPEG and the stub formats (HDF5, GRIB, BUFR, WMF off Windows): they decode
    # nothing without a handler the user registers. Save-only formats (PDF) have no opener at all.
    def decodes(fmt: str) -> bool:
        factory = Image.OPEN.get(fmt, (None,))[0]
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        return factory is not None and not stub and fmt != "MPEG"

    return frozenset(suffix for suffix, fmt in Image.registered_extensions().items() if decodes(fmt))


IMAGE_SUFFIXES: frozenset[str] = _pil_suffixes() | DICOM_SUFFIXES
"""Lower-case file suffixes `load_image` reads: PIL's decodable formats plus DICOM."""


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a folder scan should pick up `path`: its suffix (any case) is in IMAGE_SUFFIXES."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES


def walk_files(folder: str | os.PathLike) -> list[str]:
    """Every file under `folder` at any depth, sorted by path (as a recursive glob lists them); hidden
    files and folders (`.DS_Store`, `.git/`, `.ipynb_checkpoints/`) are left out."""
    found = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [os.path.join(here, name) for name in names if not name.startswith(".")]
    return sorted(found)


def is_dicom(head: bytes, name: str) -> bool:
    """Part-10 DICOM files carry 'DICM' after a 128-byte preamble; older exports and raw datasets
    have none, and then only their suffix says DICOM."""
    return head[128:132] == b"DICM" or os.path.splitext(name)[1].lower() in DICOM_SUFFIXES


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent pixels onto white, as a viewer shows them."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB without clipping high bit depths or blackening alpha."""
    mode = image.mode
    try:
        image = ImageOps.exif_transpose(image) or image
        if mode == "RGB":
            return image
        if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return Image.fromarray(stretch_to_uint8(np.asarray(image))).convert("RGB")
        if mode == "La":  # premultiplied grey+alpha: PIL only converts it to LA
            image = image.convert("LA")
        if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info):
            return _flatten_alpha(image)
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL converts these exactly
    except (ImageLoadError, MemoryError):
        raise
    except Exception as err:  # a mode PIL cannot convert, or a malformed EXIF block
        raise ImageLoadError(
            f"cannot convert an image of mode {mode!r} to RGB ({type(err).__name__}: {err}); "
            "convert it to RGB, L or RGBA first."
        ) from err


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
    if not (array.dtype == np.bool_ or array.dtype.kind in "iuf"):  # bool, signed, unsigned, float
        raise ImageLoadError(
            f"cannot read an image array of dtype {array.dtype}; pass bool, integer or float pixel values."
        )
    check_finite(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and np.nanmin(array) >= 0.0 and np.nanmax(array) <= 1.0:
            array = np.round(array * 255.0).astype(np.uint8)  # the usual [0, 1] float convention
        else:
            array = stretch_to_uint8(array)
    return Image.fromarray(array)


def _decode(fileobj: Any, name: str) -> Image.Image:
    head = fileobj.read(132)
    fileobj.seek(0)
    if not head:
        raise ImageLoadError(f"{name}: the file is empty (0 bytes); re-export or remove it.")
    if is_dicom(head, name):
        from .dicom import decode_dicom  # pydicom loads only when a DICOM file arrives

        return decode_dicom(fileobj, name)
    # Decompression bombs: PIL refuses images over 2 * Image.MAX_IMAGE_PIXELS (default 89.5M pixels)
    # with DecompressionBombError, turned into ImageLoadError below. Between MAX_IMAGE_PIXELS and twice
    # that it only emits Image.DecompressionBombWarning and decodes the image (up to ~540 MB as RGB).
    # We leave that as PIL does, so a large but genuine scan (whole-slide, satellite) still loads.
    # Mind that it is easy to miss: Python's default filter prints the warning once per distinct
    # message (i.e. per image size) and then stays quiet, and the encoder resizes the image anyway,
    # so run with `-W error::PIL.Image.DecompressionBombWarning` (or lower MAX_IMAGE_PIXELS) to be
    # told about every one. With warnings turned into errors the warning is raised here and becomes
    # the same ImageLoadError as the error case, so it never escapes as a bare RuntimeWarning.
    try:
        image = Image.open(fileobj)
        image.load()  # decode now so truncated files fail here, not inside the encoder
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(
            f"{name}: {str(err).rstrip('.')}. It is refused as a possible decompression bomb; downscale it, "
            "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not an image PIL can read (wrong extension or another file type).") from err
    except MemoryError:
        raise  # not a property of the file
    except Exception as err:
        # PIL's decoders raise OSError/SyntaxError/ValueError for most damaged files, but fuzzing
        # (tests/test_images.py) also got a TypeError out of a TIFF whose StripOffsets tag had a
        # float type, and the plugins can raise struct.error, IndexError, KeyError, EOFError or
        # zlib.error from deep inside. Whatever the type, a file that fails to decode is damaged, so
        # every exception of the decode step becomes ImageLoadError (which skip_bad_images catches).
        raise ImageLoadError(
            f"{name}: the image is truncated or corrupt ({type(err).__name__}: {err}); re-export or remove it."
        ) from err
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
        try:  # Image.open() is lazy: a damaged file passed as an opened image fails only here
            source.load()
        except MemoryError:
            raise
        except Exception as err:
            name = getattr(source, "filename", "") or "PIL image"
            if getattr(source, "fp", True) is None:  # `with Image.open(p) as im:` left before im.load()
                raise ImageLoadError(
                    f"{name}: the image's file was closed before its pixels were read; call .load() "
                    "inside the `with Image.open(...)` block, or pass the path instead."
                ) from err
            raise ImageLoadError(
                f"{name}: the image is truncated or corrupt ({type(err).__name__}: {err}); re-export or remove it."
            ) from err
        return to_rgb(source)
    if type(source).__module__.startswith("torch"):
        source = source.detach().cpu().float().numpy() if source.is_floating_point() else source.cpu().numpy()
    if isinstance(source, np.ndarray):
        return to_rgb(_array_to_pil(source))
    raise ImageLoadError(
        f"cannot use an object of type {type(source).__name__} as an image; pass a PIL image, a file path, "
        "a numpy array or a torch tensor."
    )
