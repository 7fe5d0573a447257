"""Sample files for the RAG ingestion tests, built in memory: no files are checked in."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # from fonts-dejavu-core
DOCX_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Override PartName="/word/document.xml" ContentType="application/'
    'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
)


def text_pdf(pages: list[list[str]]) -> bytes:
    """A PDF with a text layer: each page shows its lines in Helvetica."""
    count = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(count))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, lines in enumerate(pages):
        shown = " T* ".join(f"({line}) Tj" for line in lines)
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {shown} ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def encrypted_pdf(password: str) -> bytes:
    """A text PDF that opens only with `password`."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf([["Secret plans"]]))))
    writer.encrypt(user_password=password, algorithm="AES-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def text_image(lines: list[str]) -> Image.Image:
    """Black text on white, large enough for Tesseract to read reliably."""
    font = ImageFont.truetype(str(_FONT), 32) if _FONT.exists() else ImageFont.load_default(size=32)
    image = Image.new("L", (900, 40 + 60 * len(lines)), 255)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((30, 25 + 60 * i), line, font=font, fill=0)
    return image


def image_bytes(lines: list[str], fmt: str) -> bytes:
    """`text_image` saved as PNG or JPEG; as "PDF" it is an image-only, scanned-looking PDF."""
    buffer = io.BytesIO()
    text_image(lines).save(buffer, fmt)
    return buffer.getvalue()


def docx_bytes() -> bytes:
    """A Word document with nested headings, paragraphs and a table."""
    import docx

    document = docx.Document()
    document.add_heading("Install", level=1)
    document.add_paragraph("Read this before installing.")
    document.add_heading("Linux", level=2)
    document.add_paragraph("Run the bootstrap script.")
    rows = [("Tool", "Version"), ("slurm", "22.05"), ("python", "")]
    table = document.add_table(rows=len(rows), cols=2)
    for row, values in zip(table.rows, rows, strict=True):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_heading("Usage", level=1)
    document.add_paragraph("Start the gateway.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def xlsx_bytes(sheets: dict[str, list[list[object]]]) -> bytes:
    """A workbook with one worksheet per entry, rows as given."""
    import openpyxl

    workbook = openpyxl.Workbook()
    workbook.remove(workbook.active)
    for title, rows in sheets.items():
        sheet = workbook.create_sheet(title)
        for row in rows:
            sheet.append(row)
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def zip_bomb_docx(path: Path, unzipped_mib: int) -> Path:
    """A "DOCX" whose document part is `unzipped_mib` MiB of zeros (about 1 KiB each zipped).

    Written to disk in 1 MiB steps, so the test never holds the unzipped data in memory.
    """
    zero_mib = bytes(1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", DOCX_CONTENT_TYPES)
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            for _ in range(unzipped_mib):
                member.write(zero_mib)
    return path


PPMD = 98  # a compression method Python's zipfile cannot read
ENCRYPTED = 0x1  # general purpose flag bit 0


def patched(data: bytes, member: str, *, method: int | None = None, flags: int = 0) -> bytes:
    """`data` with `member`'s compression method and flags changed in both of its headers, the
    local one and the central directory's, as a hostile client could send them."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        local = archive.getinfo(member).header_offset
    _patch(out, local, flags_at=6, method_at=8, method=method, flags=flags)
    central = out.find(b"PK\x01\x02")
    while central != -1:
        (name_len,) = struct.unpack_from("<H", out, central + 28)
        if bytes(out[central + 46 : central + 46 + name_len]) == member.encode():
            _patch(out, central, flags_at=8, method_at=10, method=method, flags=flags)
        central = out.find(b"PK\x01\x02", central + 4)
    return bytes(out)


def _patch(out: bytearray, at: int, *, flags_at: int, method_at: int, method, flags) -> None:
    (old_flags,) = struct.unpack_from("<H", out, at + flags_at)
    struct.pack_into("<H", out, at + flags_at, old_flags | flags)
    if method is not None:
        struct.pack_into("<H", out, at + method_at, method)
