"""`appliance kb sync KB DIR`: keep a knowledge base in step with a folder, through the gateway.

The folder is read here: its manifest (relative path -> sha256) goes to the gateway's
`/v1/knowledge_bases/{kb}/sync`, which removes what is gone and answers which files changed;
only those are sent, in batches under the gateway's upload limit.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import click

from appliance.cli.api import gateway_call
from appliance.cli.context import CliContext, pass_ctx
from appliance.hashing import file_sha256

# Per request: the gateway takes 100 files, and bounds the whole body (rag.max_upload_bytes).
_FILES_PER_BATCH = 100
# Bytes of a request besides its files' content: the multipart framing of the manifest.
_REQUEST_OVERHEAD = 1024
# And of each file: its part's headers.
_PART_OVERHEAD = 512


@click.group("kb")
def kb_group() -> None:
    """Knowledge bases, through the gateway (APPLIANCE_API_KEY)."""


@kb_group.command("sync")
@click.argument("kb")
@click.argument(
    "folder", type=click.Path(exists=True, file_okay=False, path_type=Path, resolve_path=True)
)
@click.option("--quiet", is_flag=True, help="Print only changes and refusals, not unchanged files.")
@pass_ctx
def sync(ctx: CliContext, kb: str, folder: Path, quiet: bool) -> None:
    """Make knowledge base KB hold exactly the files of FOLDER: new files added, changed ones
    (by content) replaced, gone ones removed. Hidden files and folders and symbolic links are
    left out. Safe to repeat, and to run on a schedule; exits 1 if a file was refused."""
    limit = ctx.settings.rag.max_upload_bytes
    files, refused = _folder(folder)
    manifest = json.dumps(files).encode()
    path = f"/v1/knowledge_bases/{quote(kb, safe='/')}/sync"
    outcomes = {o["path"]: o for o in _call(ctx, path, manifest, folder, [])}
    needed = [p for p, o in outcomes.items() if o["status"] == "needed"]
    for batch in _batches(folder, needed, limit - len(manifest) - _REQUEST_OVERHEAD, refused):
        # The answer covers the whole manifest: only the batch's files are news.
        sent = set(batch)
        results = _call(ctx, path, manifest, folder, batch)
        outcomes.update((o["path"], o) for o in results if o["path"] in sent)
    outcomes.update(refused)
    for name, outcome in sorted(outcomes.items()):
        if not (quiet and outcome["status"] == "unchanged"):
            reason = f": {outcome['message']}" if outcome.get("message") else ""
            click.echo(f"{outcome['status']:9} {name}{reason}")
    counts = Counter(o["status"] for o in outcomes.values())
    click.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no files")
    if counts["refused"] or counts["needed"]:
        raise SystemExit(1)


def _folder(folder: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """The manifest of the folder's files, and the files refused before sending (names that
    are not UTF-8, unreadable files)."""
    files: dict[str, str] = {}
    refused: dict[str, dict] = {}
    for path in _walk(folder):
        name = path.relative_to(folder).as_posix()
        try:
            name.encode()
        except UnicodeEncodeError:
            shown = os.fsencode(name).decode("ascii", "backslashreplace")
            refused[shown] = _refusal(shown, "the path is not valid UTF-8")
            continue
        try:
            files[name] = file_sha256(path)
        except OSError as exc:
            refused[name] = _refusal(name, f"could not be read ({exc.strerror or exc})")
    return files, refused


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):  # symbolic links to folders are not followed
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root, name)
            if not name.startswith(".") and not path.is_symlink() and path.is_file():
                yield path


def _batches(
    folder: Path, names: list[str], budget: int, refused: dict[str, dict]
) -> Iterator[list[str]]:
    """The names in groups that fit one request; a file too large alone is refused."""
    batch: list[str] = []
    size = 0
    for name in names:
        length = (folder / name).stat().st_size + len(name.encode()) + _PART_OVERHEAD
        if length > budget:
            refused[name] = _refusal(name, "larger than the gateway's upload limit")
            continue
        if batch and (size + length > budget or len(batch) == _FILES_PER_BATCH):
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += length
    if batch:
        yield batch


def _call(
    ctx: CliContext, path: str, manifest: bytes, folder: Path, names: list[str]
) -> list[dict]:
    with ExitStack() as stack:
        parts: list = [("manifest", ("manifest.json", manifest, "application/json"))]
        parts += [
            ("files", (name, stack.enter_context((folder / name).open("rb")))) for name in names
        ]
        return gateway_call(ctx, "POST", path, timeout=600, files=parts)["results"]


def _refusal(name: str, message: str) -> dict:
    return {"path": name, "status": "refused", "message": message}


COMMANDS = [kb_group]
