"""Text recognition with Tesseract, for images and PDF pages without a text layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.rag.errors import IngestError
from appliance.rag.limits import IngestLimits

if TYPE_CHECKING:
    from PIL.Image import Image


def ocr_image(image: Image, filename: str, limits: IngestLimits, where: str = "") -> str:
    """The text Tesseract reads in `image`; `where` (e.g. "page 3") goes into error messages."""
    import pytesseract

    try:
        return pytesseract.image_to_string(image, timeout=limits.ocr_timeout_s)
    except pytesseract.TesseractNotFoundError:
        raise IngestError(
            filename, "it needs OCR, and tesseract is not installed (apt-get install tesseract-ocr)"
        ) from None
    except RuntimeError as exc:
        # pytesseract reports its timeout as a bare RuntimeError.
        if "timeout" not in str(exc).lower():
            raise
        raise IngestError(
            filename,
            f"OCR of {where or 'the image'} took longer than {limits.ocr_timeout_s:g} s",
        ) from None
