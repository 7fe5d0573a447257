"""PNG and JPEG: the text that OCR finds in the picture."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from appliance.rag.document import Section
from appliance.rag.errors import IngestError
from appliance.rag.limits import IngestLimits, check_image_pixels
from appliance.rag.parsers.ocr import ocr_image
from appliance.rag.parsers.plaintext import paragraphs

if TYPE_CHECKING:
    from PIL.Image import Image


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """Paragraphs recognised in an image, within the pixel limit."""
    with _open(data, filename, limits) as image:
        # Opening read only the header: the size is checked before any pixel is decoded.
        check_image_pixels(filename, image.width, image.height, limits)
        image.load()
        return paragraphs(ocr_image(image, filename, limits))


def _open(data: bytes, filename: str, limits: IngestLimits) -> Image:
    """The image, opened under Pillow's own guard set to the pixel limit.

    Pillow refuses images over twice `MAX_IMAGE_PIXELS` when opening them. The setting is
    global (font rendering checks it too), so it is set for the call only and then restored.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    try:
        with warnings.catch_warnings():
            # Up to twice the limit Pillow only warns; check_image_pixels refuses those.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError as exc:
        raise IngestError(filename, f"the image is too large: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
