"""The Knowledge tab: knowledge bases (create, share, delete), documents (drop several files with
progress and errors per file, sync a folder, list, delete) and search."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from appliance.hashing import file_sha256
from appliance.webapp import render
from appliance.webapp.client import GatewayError
from appliance.webapp.context import WebContext, bind, gateway, signed_in, token_of

UPLOAD_HEADERS = ["File", "Status", "Details"]
_DOCUMENT_TYPES = [".pdf", ".docx", ".xlsx", ".csv", ".txt", ".md", ".markdown", ".html", ".htm"]
_IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"]
FILE_TYPES = _DOCUMENT_TYPES + _IMAGE_TYPES


@dataclass
class KnowledgeView:
    """What the app wires to sign-in: refresh the tab for the signed-in user."""

    on_sign_in: Callable[[Any], Any]


def _forget_upload(path: Path) -> None:
    """Uploaded files live in the web app's temporary folder only until sent to the gateway."""
    with contextlib.suppress(OSError):
        path.unlink()
        path.parent.rmdir()


def _reason(message: str, filename: str) -> str:
    """The gateway's refusal without the file name and verdict the row already shows."""
    for prefix in (f"{filename}: ", "refused: "):
        message = message.removeprefix(prefix)
    return message


def _kb_info(kb: dict[str, Any] | None) -> str:
    if kb is None:
        return "No knowledge base yet: create one below."
    readers = ", ".join(kb.get("readers") or []) or "nobody else"
    groups = ", ".join(kb.get("groups") or []) or "none"
    return (
        f"**{kb['name']}**: {kb.get('documents', 0)} documents; owner {kb.get('owner')}; "
        f"readers: {readers}; groups: {groups}"
    )


@dataclass
class KnowledgeComponents:
    """The Knowledge tab's components."""

    kb: gr.Dropdown
    refresh_btn: gr.Button
    info: gr.Markdown
    new_name: gr.Textbox
    new_readers: gr.Textbox
    new_groups: gr.Textbox
    create_btn: gr.Button
    files: gr.File
    upload_btn: gr.Button
    folder: gr.File
    sync_btn: gr.Button
    upload_status: gr.Dataframe
    documents: gr.Dataframe
    doc_pick: gr.Dropdown
    delete_doc_btn: gr.Button
    query: gr.Textbox
    search_btn: gr.Button
    hits: gr.Markdown
    share_readers: gr.Textbox
    share_groups: gr.Textbox
    share_btn: gr.Button
    confirm: gr.Textbox
    delete_kb_btn: gr.Button


def knowledge_components() -> KnowledgeComponents:
    with gr.Row():
        kb = gr.Dropdown(label="Knowledge base", choices=[], scale=3, elem_id="kb-select")
        refresh_btn = gr.Button("Refresh", size="sm", scale=1, min_width=80)
    info = gr.Markdown("", elem_id="kb-info")
    with gr.Accordion("New knowledge base", open=False, elem_id="kb-new"):
        with gr.Row():
            new_name = gr.Textbox(label="Name", max_lines=1, elem_id="kb-new-name")
            new_readers = gr.Textbox(label="Readers (user names)", max_lines=1)
            new_groups = gr.Textbox(label="Groups", max_lines=1)
        create_btn = gr.Button("Create", variant="primary", elem_id="kb-create")
    files = gr.File(
        label="Drop documents here (PDF, Word, Excel, CSV, text, Markdown, HTML, images)",
        file_count="multiple",
        file_types=FILE_TYPES,
        elem_id="kb-files",
    )
    upload_btn = gr.Button("Add to the knowledge base", variant="primary", elem_id="kb-upload")
    with gr.Accordion("Sync with a folder", open=False, elem_id="kb-sync-folder"):
        gr.Markdown(
            "The knowledge base will hold exactly this folder's files: new ones added, changed "
            "ones replaced, and documents that are not in the folder **removed**. The browser "
            "gives file names without their folders: use `appliance kb sync` for a folder "
            "with subfolders."
        )
        folder = gr.File(label="Choose a folder", file_count="directory", elem_id="kb-folder")
        sync_btn = gr.Button("Sync", variant="primary", elem_id="kb-sync")
    upload_status = gr.Dataframe(
        headers=UPLOAD_HEADERS, value=[], interactive=False, wrap=True, elem_id="kb-upload-status"
    )
    documents = gr.Dataframe(
        headers=render.DOCUMENT_HEADERS,
        value=[],
        interactive=False,
        elem_id="kb-documents",
        label="Documents",
    )
    with gr.Row():
        doc_pick = gr.Dropdown(label="Document", choices=[], scale=3, elem_id="kb-doc-select")
        delete_doc_btn = gr.Button(
            "Delete document", variant="stop", scale=1, min_width=120, elem_id="kb-doc-delete"
        )
    with gr.Row():
        query = gr.Textbox(
            label="Search",
            placeholder="Words or a question",
            scale=4,
            max_lines=1,
            elem_id="kb-query",
        )
        search_btn = gr.Button("Search", scale=1, min_width=80, elem_id="kb-search")
    hits = gr.Markdown("", elem_id="kb-hits")
    with gr.Accordion("Share or delete this knowledge base", open=False):
        with gr.Row():
            share_readers = gr.Textbox(
                label="Readers (user names)", max_lines=1, elem_id="kb-share-readers"
            )
            share_groups = gr.Textbox(label="Groups", max_lines=1, elem_id="kb-share-groups")
        share_btn = gr.Button("Share", elem_id="kb-share")
        confirm = gr.Textbox(label="Type the knowledge base's name to delete it", max_lines=1)
        delete_kb_btn = gr.Button("Delete knowledge base", variant="stop")
    return KnowledgeComponents(
        kb,
        refresh_btn,
        info,
        new_name,
        new_readers,
        new_groups,
        create_btn,
        files,
        upload_btn,
        folder,
        sync_btn,
        upload_status,
        documents,
        doc_pick,
        delete_doc_btn,
        query,
        search_btn,
        hits,
        share_readers,
        share_groups,
        share_btn,
        confirm,
        delete_kb_btn,
    )


async def refresh(ctx: WebContext, session, chosen):
    """The user's knowledge bases, the chosen one's details and its documents."""
    if not signed_in(session):
        return gr.Dropdown(choices=[], value=None), "", [], gr.Dropdown(choices=[], value=None)
    bases = await gateway(ctx.client.knowledge_bases(token_of(session)))
    names = [render.kb_ref(b, session.get("user")) for b in bases]
    chosen = chosen if chosen in names else (names[0] if names else None)
    current = next((b for b, n in zip(bases, names, strict=True) if n == chosen), None)
    docs = await gateway(ctx.client.documents(token_of(session), chosen)) if chosen else []
    filenames = [d["filename"] for d in docs]
    return (
        gr.Dropdown(choices=names, value=chosen),
        _kb_info(current),
        render.document_rows(docs),
        gr.Dropdown(choices=filenames, value=None),
    )


async def create(ctx: WebContext, session, name, readers, groups):
    name = name.strip()
    if not name:
        gr.Warning("Give the knowledge base a name.")
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    who, groups = render.split_names(readers), render.split_names(groups)
    await gateway(ctx.client.create_knowledge_base(token_of(session), name, who, groups))
    gr.Info(f"Knowledge base {name} created.")
    return gr.Dropdown(choices=[name], value=name), "", "", ""


async def upload(ctx: WebContext, session, chosen, paths):
    """Send the dropped files one by one, showing each file's progress and outcome."""
    if not chosen or not paths:
        gr.Warning(
            "Drop one or more files first."
            if chosen
            else "Choose or create a knowledge base first."
        )
        yield gr.skip(), gr.skip()
        return
    token = token_of(session)
    uploads = [Path(p) for p in paths]
    rows = [[p.name, "waiting", ""] for p in uploads]
    yield rows, gr.skip()
    try:
        for row, path in zip(rows, uploads, strict=True):
            row[1] = "uploading and reading"
            yield rows, gr.skip()
            try:
                result = await ctx.client.upload(token, chosen, path, path.name)
            except GatewayError as exc:
                row[1], row[2] = "refused", str(exc)
            else:
                for added in result.get("results", []):
                    row[1], row[2] = added["status"], f"{added['chunks']} passages"
                for error in result.get("errors", []):
                    row[1], row[2] = "refused", _reason(error["message"], path.name)
            finally:
                _forget_upload(path)
            yield rows, gr.skip()
    finally:
        for path in uploads:
            _forget_upload(path)
    yield rows, None


async def sync_folder(ctx: WebContext, session, chosen, paths):
    """Sync the knowledge base with the chosen folder as `appliance kb sync` does, the changed
    files sent one by one; each file's outcome, removed documents included."""
    if not chosen or not paths:
        gr.Warning(
            "Choose a folder first." if chosen else "Choose or create a knowledge base first."
        )
        yield gr.skip(), gr.skip()
        return
    token = token_of(session)
    uploads = [Path(p) for p in paths]
    try:
        files, rows = _folder_files(uploads)
        manifest = {name: file_sha256(path) for name, path in files.items()}
        yield list(rows.values()), gr.skip()
        try:
            for outcome in await ctx.client.sync(token, chosen, manifest, {}):
                rows[outcome["path"]] = _sync_row(outcome)
            yield list(rows.values()), gr.skip()
            for name, row in rows.items():
                if row[1] != "needed":
                    continue
                row[1] = "uploading and reading"
                yield list(rows.values()), gr.skip()
                for outcome in await ctx.client.sync(token, chosen, manifest, {name: files[name]}):
                    if outcome["path"] == name:
                        rows[name] = _sync_row(outcome)
                yield list(rows.values()), gr.skip()
        except GatewayError as exc:
            gr.Warning(f"The sync stopped: {exc}")
    finally:
        for path in uploads:
            _forget_upload(path)
    yield list(rows.values()), None


def _folder_files(uploads: list[Path]) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """The folder's files by name (hidden ones left out, as the CLI does), and a row for each;
    a name that comes twice (two subfolders) is refused, not guessed."""
    files: dict[str, Path] = {}
    rows: dict[str, list[str]] = {}
    for path in uploads:
        if path.name.startswith("."):
            continue
        if path.name in files:
            del files[path.name]
            message = "several files of this name in the folder: sync it with `appliance kb sync`"
            rows[path.name] = [path.name, "refused", message]
        elif path.name not in rows:
            files[path.name] = path
            rows[path.name] = [path.name, "waiting", ""]
    return files, rows


def _sync_row(outcome: dict[str, Any]) -> list[str]:
    return [outcome["path"], outcome["status"], outcome.get("message", "")]


async def delete_document(ctx: WebContext, session, chosen, filename):
    if not chosen or not filename:
        gr.Warning("Choose a document first.")
        return
    await gateway(ctx.client.delete_document(token_of(session), chosen, filename))
    gr.Info(f"{filename} deleted from {chosen}.")


async def search(ctx: WebContext, session, chosen, text):
    if not chosen:
        gr.Warning("Choose a knowledge base first.")
        return gr.skip()
    if not text.strip():
        return ""
    return render.hits_markdown(await gateway(ctx.client.query(token_of(session), chosen, text)))


async def share(ctx: WebContext, session, chosen, readers, groups):
    if not chosen:
        gr.Warning("Choose a knowledge base first.")
        return
    who, groups = render.split_names(readers), render.split_names(groups)
    await gateway(ctx.client.share_knowledge_base(token_of(session), chosen, who, groups))
    gr.Info(f"{chosen} is shared.")


async def delete_kb(ctx: WebContext, session, chosen, typed):
    if not chosen or typed.strip() != chosen:
        gr.Warning("Type the knowledge base's name exactly to delete it.")
        return gr.skip(), gr.skip()
    await gateway(ctx.client.delete_knowledge_base(token_of(session), chosen))
    gr.Info(f"{chosen} deleted.")
    return None, ""


def build_knowledge(ctx: WebContext) -> KnowledgeView:
    return wire_knowledge(ctx, knowledge_components())


def wire_knowledge(ctx: WebContext, c: KnowledgeComponents) -> KnowledgeView:
    """Connect the tab's components to its handlers; every change shows the tab afresh."""
    shown = [c.kb, c.info, c.documents, c.doc_pick]
    again = dict(fn=bind(ctx, refresh), inputs=[ctx.session, c.kb], outputs=shown)
    c.refresh_btn.click(**again)
    c.kb.input(**again)
    new = [c.new_name, c.new_readers, c.new_groups]
    c.create_btn.click(bind(ctx, create), [ctx.session, *new], [c.kb, *new]).then(**again)
    c.upload_btn.click(
        bind(ctx, upload), [ctx.session, c.kb, c.files], [c.upload_status, c.files]
    ).then(**again)
    c.sync_btn.click(
        bind(ctx, sync_folder), [ctx.session, c.kb, c.folder], [c.upload_status, c.folder]
    ).then(**again)
    document = [ctx.session, c.kb, c.doc_pick]
    c.delete_doc_btn.click(bind(ctx, delete_document), document, None).then(**again)
    gr.on(
        [c.search_btn.click, c.query.submit],
        bind(ctx, search),
        [ctx.session, c.kb, c.query],
        [c.hits],
    )
    sharing = [ctx.session, c.kb, c.share_readers, c.share_groups]
    c.share_btn.click(bind(ctx, share), sharing, None).then(**again)
    c.delete_kb_btn.click(
        bind(ctx, delete_kb), [ctx.session, c.kb, c.confirm], [c.kb, c.confirm]
    ).then(**again)

    def on_sign_in(dep):
        return dep.then(**again).then(
            lambda: ([], "", None, None), None, [c.upload_status, c.hits, c.files, c.folder]
        )

    return KnowledgeView(on_sign_in)
