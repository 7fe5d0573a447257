"""PDF with pypdf: the text layer page by page; a page without one is rendered and OCR'd."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from appliance.rag.document import Section
from appliance.rag.errors import IngestError
from appliance.rag.limits import IngestLimits, check_pdf_pages
from appliance.rag.parsers.ocr import ocr_image
from appliance.rag.parsers.plaintext import paragraphs

if TYPE_CHECKING:
    import pypdfium2
    from PIL.Image import Image

# Tesseract reads body text well from 200 dpi; more only costs time.
_RENDER_DPI = 200
_POINTS_PER_INCH = 72
# Readers look for the end-of-file marker in the last KiB; without it the file was cut short.
_EOF_MARKER, _EOF_WINDOW = b"%%EOF", 1024


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """Paragraphs of every page, each with its page number."""
    from pypdf import PdfReader

    if _EOF_MARKER not in data[-_EOF_WINDOW:]:
        raise IngestError(filename, "the PDF is truncated (it has no end-of-file marker)")
    reader = PdfReader(io.BytesIO(data))
    # An empty user password only restricts printing or copying: such files open as they are.
    if reader.is_encrypted and not reader.decrypt(""):
        raise IngestError(filename, "encrypted PDF: remove the password first")
    check_pdf_pages(filename, len(reader.pages), limits)
    sections: list[Section] = []
    with _PageRenderer(data, limits) as renderer:
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            if not text.strip():
                text = ocr_image(renderer.render(number - 1), filename, limits, f"page {number}")
            sections.extend(paragraphs(text, page=number))
    return sections


class _PageRenderer:
    """Renders pages with pdfium, which it opens on first use: most PDFs need no OCR."""

    def __init__(self, data: bytes, limits: IngestLimits) -> None:
        self._data = data
        self._max_pixels = limits.max_image_pixels
        self._document: pypdfium2.PdfDocument | None = None

    def __enter__(self) -> _PageRenderer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._document is not None:
            self._document.close()

    def render(self, index: int) -> Image:
        """Page `index` (0-based) as a greyscale PIL image, scaled down to the pixel limit."""
        import pypdfium2 as pdfium

        if self._document is None:
            self._document = pdfium.PdfDocument(self._data)
        page = self._document[index]
        try:
            width, height = page.get_size()
            scale = min(
                _RENDER_DPI / _POINTS_PER_INCH,
                math.sqrt(self._max_pixels / max(width * height, 1.0)),
            )
            # A copy, so the image outlives the page and the bitmap pdfium drew it into.
            return page.render(scale=scale, grayscale=True).to_pil().copy()
        finally:
            page.close()
