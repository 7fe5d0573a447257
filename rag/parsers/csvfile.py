"""CSV: each row labelled with the header row, like a spreadsheet's."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from appliance.rag.document import Section
from appliance.rag.limits import CellBudget, IngestLimits
from appliance.rag.parsers.tables import row_sections
from appliance.rag.sniff import csv_dialect, decode_text


def parse(data: bytes, filename: str, limits: IngestLimits) -> list[Section]:
    """The rows of a CSV file (any delimiter the sniffer recognised), counted against the limit."""
    text = decode_text(data)
    dialect = csv_dialect(text) or csv.excel
    return row_sections(_rows(text, dialect, CellBudget(filename, limits)))


def _rows(text: str, dialect: type[csv.Dialect], budget: CellBudget) -> Iterator[list[str]]:
    for row in csv.reader(io.StringIO(text, newline=""), dialect):
        budget.spend(len(row))
        yield row
