"""Every supported format parses into located sections; hostile files are refused clearly."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from appliance.rag.document import ParsedDocument, Section
from appliance.rag.errors import IngestError
from appliance.rag.ingest import parse_file, parse_many
from appliance.rag.limits import IngestLimits
from appliance.rag.sniff import DocType
from appliance.rag.uploads import safe_filename

from tests.unit.rag_samples import (
    docx_bytes,
    encrypted_pdf,
    image_bytes,
    text_pdf,
    xlsx_bytes,
    zip_bomb_docx,
)


def _texts(document: ParsedDocument) -> list[str]:
    return [section.text for section in document.sections]


def _refusal(data: bytes, filename: str, limits: IngestLimits | None = None) -> str:
    with pytest.raises(IngestError) as caught:
        parse_file(data, filename, limits)
    assert caught.value.filename == filename
    return str(caught.value)


# --- formats -------------------------------------------------------------------------------


def test_pdf_text_layer_page_by_page():
    document = parse_file(text_pdf([["Quarterly report", "Revenue grew"], ["Outlook"]]), "q.pdf")
    assert document.doc_type == DocType.PDF
    assert document.sections == [
        Section("Quarterly report\nRevenue grew", page=1),
        Section("Outlook", page=2),
    ]


def test_scanned_pdf_page_goes_through_ocr():
    scan = image_bytes(["Invoice number 4711", "Scanned archive copy"], "PDF")
    document = parse_file(scan, "scan.pdf")
    text = " ".join(_texts(document))
    assert "Invoice number 4711" in text and "Scanned archive copy" in text
    assert {section.page for section in document.sections} == {1}


def test_docx_headings_paragraphs_and_table_rows_in_order():
    document = parse_file(docx_bytes(), "guide.docx")
    assert [(s.kind, s.text, s.heading) for s in document.sections] == [
        ("heading", "Install", "Install"),
        ("paragraph", "Read this before installing.", "Install"),
        ("heading", "Linux", "Install > Linux"),
        ("paragraph", "Run the bootstrap script.", "Install > Linux"),
        ("table_row", "Tool: slurm; Version: 22.05", "Install > Linux"),
        ("table_row", "Tool: python", "Install > Linux"),  # the empty cell is left out
        ("heading", "Usage", "Usage"),
        ("paragraph", "Start the gateway.", "Usage"),
    ]


def test_xlsx_rows_with_headers_per_sheet():
    data = xlsx_bytes(
        {
            "Staff": [["Name", "Started", "Hours"], ["Ann", dt.datetime(2024, 3, 1), 37.5]],
            "Empty": [],
            "Sites": [[None, None], ["City", "Racks"], ["Oslo", 12], [None, None], ["Rome", 3]],
        }
    )
    document = parse_file(data, "plan.xlsx")
    assert [(s.sheet, s.kind, s.text) for s in document.sections] == [
        ("Staff", "table_row", "Name: Ann; Started: 2024-03-01; Hours: 37.5"),
        ("Sites", "table_row", "City: Oslo; Racks: 12"),
        ("Sites", "table_row", "City: Rome; Racks: 3"),
    ]


def test_csv_rows_with_headers():
    data = b'product;price;note\nlamp;12.50;"bright; warm"\nchair;40;\n'
    document = parse_file(data, "prices.csv")
    assert document.doc_type == DocType.CSV
    assert _texts(document) == [
        "product: lamp; price: 12.50; note: bright; warm",
        "product: chair; price: 40",
    ]


def test_text_paragraphs():
    data = b"First paragraph\nstill first.\r\n\r\nSecond one.\n\n\n"
    assert _texts(parse_file(data, "notes.txt")) == ["First paragraph\nstill first.", "Second one."]


def test_markdown_heading_paths_code_and_tables():
    data = b"""# Install

Read this first.

## Linux

Run `./bootstrap up`.

```bash
# not a heading
make
```

### Debian
| Package | Why |
|---|---|
| slurm-wlm | scheduler |

Usage
=====

Start it.
"""
    document = parse_file(data, "README.md")
    assert [(s.kind, s.text, s.heading) for s in document.sections] == [
        ("heading", "Install", "Install"),
        ("paragraph", "Read this first.", "Install"),
        ("heading", "Linux", "Install > Linux"),
        ("paragraph", "Run `./bootstrap up`.", "Install > Linux"),
        ("code", "# not a heading\nmake", "Install > Linux"),
        ("heading", "Debian", "Install > Linux > Debian"),
        ("table_row", "Package: slurm-wlm; Why: scheduler", "Install > Linux > Debian"),
        ("heading", "Usage", "Usage"),
        ("paragraph", "Start it.", "Usage"),
    ]


def test_html_text_headings_and_tables_without_scripts_or_navigation():
    data = b"""<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style></head>
<body><nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<h1>Prices</h1><p>Valid from <b>May</b>.</p>
<script>document.write("tracking");</script>
<h2>Hardware</h2>
<table><tr><th>Item</th><th>Price</th><th>Note</th></tr>
<tr><td>GPU</td><td>&euro; 30k</td><td></td></tr>
<tr><td>CPU</td><td></td><td>on request</td></tr></table>
<p>Prices exclude VAT.<br>Ask us.</p></body></html>"""
    document = parse_file(data, "prices.html")
    assert [(s.kind, s.text, s.heading) for s in document.sections] == [
        ("heading", "Prices", "Prices"),
        ("paragraph", "Valid from May.", "Prices"),
        ("heading", "Hardware", "Prices > Hardware"),
        ("table_row", "Item: GPU; Price: € 30k", "Prices > Hardware"),
        ("table_row", "Item: CPU; Note: on request", "Prices > Hardware"),
        ("paragraph", "Prices exclude VAT.", "Prices > Hardware"),
        ("paragraph", "Ask us.", "Prices > Hardware"),
    ]


def test_html_without_optional_end_tags():
    data = b"<html><head><title>T</title><body><p>Intro<table><tr><th>a<th>b<tr><td>1<td>2</table>"
    assert _texts(parse_file(data, "old.html")) == ["Intro", "a: 1; b: 2"]


def test_png_text_through_ocr():
    document = parse_file(image_bytes(["Rack 7 power budget"], "PNG"), "photo.png")
    assert document.doc_type == DocType.PNG
    assert "Rack 7 power budget" in " ".join(_texts(document))


def test_files_are_read_from_paths_under_their_own_name(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"Hello from disk.")
    document = parse_file(path)
    assert (document.filename, _texts(document)) == ("notes.txt", ["Hello from disk."])
    assert parse_file(path, "Shown Name.txt").filename == "Shown Name.txt"


# --- hostile and broken files --------------------------------------------------------------


def test_truncated_pdf_is_refused():
    data = text_pdf([["Hello"]])
    assert "the PDF is truncated" in _refusal(data[: len(data) // 2], "cut.pdf")


def test_malformed_pdf_is_refused():
    message = _refusal(b"%PDF-1.7\n1 0 obj << /Broken \nendobj\n%%EOF\n", "bad.pdf")
    assert message.startswith("bad.pdf: refused: a damaged or unreadable PDF file (")


def test_encrypted_pdf_is_refused():
    message = _refusal(encrypted_pdf("secret"), "locked.pdf")
    assert message == "locked.pdf: refused: encrypted PDF: remove the password first"


def test_pdf_with_empty_user_password_is_read():
    document = parse_file(encrypted_pdf(""), "restricted.pdf")
    assert _texts(document) == ["Secret plans"]


def test_pdf_page_limit():
    data = text_pdf([["one"], ["two"], ["three"]])
    message = _refusal(data, "long.pdf", IngestLimits(max_pdf_pages=2))
    assert "the PDF has 3 pages, more than the limit of 2" in message


def test_docx_zip_bomb_is_refused_before_unzipping(tmp_path: Path):
    bomb = zip_bomb_docx(tmp_path / "report.docx", unzipped_mib=300)
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(IngestError) as caught:
        parse_file(bomb)
    assert str(caught.value) == (
        "report.docx: refused: the document expands to more than 200 MiB when unzipped "
        "(a zip bomb?)"
    )


def test_docx_member_with_bomb_compression_ratio_is_refused(tmp_path: Path):
    bomb = zip_bomb_docx(tmp_path / "small-bomb.docx", unzipped_mib=20)
    with pytest.raises(IngestError, match=r"'word/document.xml' is compressed \d+:1, more than"):
        parse_file(bomb)


def test_spreadsheet_cell_limit_while_streaming():
    rows = [["a", "b", "c"]] + [[i, i, i] for i in range(40)]
    limits = IngestLimits(max_sheet_cells=100)
    xlsx = xlsx_bytes({"Big": rows})
    assert "the spreadsheet has more than 100 cells" in _refusal(xlsx, "big.xlsx", limits)
    csv = b"".join(b"%d,%d,%d\n" % (i, i, i) for i in range(40))
    assert "the spreadsheet has more than 100 cells" in _refusal(csv, "big.csv", limits)


def test_file_size_limit_is_enforced_without_reading_everything(tmp_path: Path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(IngestError, match="the file is 5000 bytes, more than the limit of 4096"):
        parse_file(b"x" * 5000, "big.txt", IngestLimits(max_file_bytes=4096))
    with pytest.raises(IngestError, match="more than the limit of 4096 bytes"):
        parse_file(path, limits=IngestLimits(max_file_bytes=4096))


def test_image_pixel_limit_is_checked_before_decoding():
    png = image_bytes(["Hello"], "PNG")  # 900 x 100 pixels
    message = _refusal(png, "huge.png", IngestLimits(max_image_pixels=50_000))
    assert "the image is 900x100 pixels, more than the limit of 0.05 megapixels" in message
    message = _refusal(png, "huger.png", IngestLimits(max_image_pixels=1_000))
    assert "the image is too large" in message  # Pillow's own guard, at twice the limit


def test_ocr_timeout_is_reported_per_page():
    scan = image_bytes(["Slow page"], "PDF")
    message = _refusal(scan, "slow.pdf", IngestLimits(ocr_timeout_s=0.001))
    assert "OCR of page 1 took longer than 0.001 s" in message


@pytest.mark.parametrize(
    ("data", "filename", "reason"),
    [
        (b"", "empty.txt", "the file is empty"),
        (b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 4, "invoice.pdf", "unsupported or binary"),
        (b"\n \n\t\n", "blank.txt", "no text found in it"),
    ],
)
def test_empty_binary_and_textless_files_are_refused(data: bytes, filename: str, reason: str):
    assert reason in _refusal(data, filename)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\Windows\\win.ini", "win.ini"),
        ("/abs/path/report.pdf", "report.pdf"),
        ("evil\u202egpj.exe", "evilgpj.exe"),
        ("new\nline\x00.txt", "newline.txt"),
        ("  spaced name.md ", "spaced name.md"),
    ],
)
def test_safe_filename_keeps_only_a_clean_last_component(name: str, safe: str):
    assert safe_filename(name) == safe


@pytest.mark.parametrize("name", ["", "../../", "dir/..", "\x00\x01", "a/."])
def test_safe_filename_refuses_names_that_end_up_empty(name: str):
    with pytest.raises(IngestError, match="the file name is empty"):
        safe_filename(name)


def test_path_traversal_name_is_only_a_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    document = parse_file(b"Harmless text.", "../../etc/passwd")
    assert document.filename == "passwd"
    assert list(tmp_path.iterdir()) == []


def test_parse_many_keeps_good_files_when_others_are_refused(tmp_path: Path):
    bomb = zip_bomb_docx(tmp_path / "bomb.docx", unzipped_mib=300)
    files = [
        (text_pdf([["Good PDF"]]), "good.pdf"),
        (encrypted_pdf("secret"), "locked.pdf"),
        bomb,
        (docx_bytes(), "good.docx"),
        (b"\x00\x01\x02\x03" * 64, "binary.pdf"),
        (b"", "empty.csv"),
        (b"Good text.", "../../good.txt"),
        (b"text", "../"),
        tmp_path / "missing.txt",
    ]
    documents, errors = parse_many(files)
    assert [d.filename for d in documents] == ["good.pdf", "good.docx", "good.txt"]
    assert [e.filename for e in errors] == [
        "locked.pdf",
        "bomb.docx",
        "binary.pdf",
        "empty.csv",
        "../",
        "missing.txt",
    ]
    assert "could not be read (No such file or directory)" in str(errors[-1])
