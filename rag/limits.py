"""Upper bounds on what one uploaded file may cost to parse, and the checks that enforce them."""

from __future__ import annotations

import io
import zipfile

from appliance.rag.errors import IngestError
from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024


class IngestLimits(BaseModel):
    """Bounds that keep a hostile or oversized file from exhausting memory, disk or CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_file_bytes: int = Field(default=50 * MiB, ge=1)
    """Largest accepted file, as uploaded."""

    max_pdf_pages: int = Field(default=2000, ge=1)
    """Most pages a PDF may have."""

    max_sheet_cells: int = Field(default=1_000_000, ge=1)
    """Most cells (empty ones inside the used range included) a spreadsheet or CSV file may
    have, all sheets together."""

    max_unzipped_bytes: int = Field(default=200 * MiB, ge=1)
    """Most bytes a DOCX or XLSX file (a zip archive) may expand to, all members together."""

    max_zip_ratio: float = Field(default=100.0, gt=1)
    """Highest compression ratio accepted for a zip member larger than 1 MiB unzipped. Office
    XML compresses about 10:1; zip bombs reach 1000:1."""

    max_image_pixels: int = Field(default=50_000_000, ge=1)
    """Most pixels of an image to OCR; rendered scanned PDF pages are scaled down to fit."""

    ocr_timeout_s: float = Field(default=60.0, gt=0)
    """Longest OCR of one image or PDF page before the file is refused."""


# Small members may compress far better than 100:1 (e.g. a sheet of identical empty cells)
# without being a danger; only a ratio that makes a large member is suspicious.
_RATIO_CHECK_MIN_BYTES = 1 * MiB


def check_file_size(filename: str, size: int, limits: IngestLimits) -> None:
    """Refuse empty files and files larger than the limit."""
    if size == 0:
        raise IngestError(filename, "the file is empty")
    if size > limits.max_file_bytes:
        raise IngestError(
            filename,
            f"the file is {_mib(size)}, more than the limit of {_mib(limits.max_file_bytes)}",
        )


def check_zip(filename: str, data: bytes, limits: IngestLimits) -> None:
    """Refuse an Office file whose members would expand too far (a zip bomb).

    The sizes checked are the ones the archive declares. That suffices because every reader
    used here (python-docx, openpyxl) unzips through `zipfile`, which stops at the declared size
    and fails the CRC check instead of producing more.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
    total = 0
    for member in members:
        total += member.file_size
        if total > limits.max_unzipped_bytes:
            raise IngestError(
                filename,
                f"the document expands to more than {_mib(limits.max_unzipped_bytes)} "
                "when unzipped (a zip bomb?)",
            )
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > _RATIO_CHECK_MIN_BYTES and ratio > limits.max_zip_ratio:
            raise IngestError(
                filename,
                f"its part {member.filename!r} is compressed {ratio:.0f}:1, more than the limit "
                f"of {limits.max_zip_ratio:.0f}:1 (a zip bomb?)",
            )


def check_pdf_pages(filename: str, pages: int, limits: IngestLimits) -> None:
    """Refuse a PDF with more pages than the limit."""
    if pages > limits.max_pdf_pages:
        raise IngestError(
            filename, f"the PDF has {pages} pages, more than the limit of {limits.max_pdf_pages}"
        )


def check_image_pixels(filename: str, width: int, height: int, limits: IngestLimits) -> None:
    """Refuse an image with more pixels than the limit (a decompression bomb or a poster)."""
    if width * height > limits.max_image_pixels:
        raise IngestError(
            filename,
            f"the image is {width}x{height} pixels, more than the limit of "
            f"{limits.max_image_pixels / 1e6:g} megapixels",
        )


class CellBudget:
    """Counts spreadsheet cells while they stream in and refuses the file past the limit."""

    def __init__(self, filename: str, limits: IngestLimits) -> None:
        self._filename = filename
        self._left = limits.max_sheet_cells
        self._limit = limits.max_sheet_cells

    def spend(self, cells: int) -> None:
        """Account for `cells` more cells; raises IngestError once the limit is passed."""
        self._left -= cells
        if self._left < 0:
            raise IngestError(
                self._filename, f"the spreadsheet has more than {self._limit:,} cells"
            )


def _mib(size: int) -> str:
    return f"{size / MiB:.1f}".removesuffix(".0") + " MiB" if size >= MiB else f"{size} bytes"
