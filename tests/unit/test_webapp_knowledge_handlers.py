"""The Knowledge tab's handlers without a browser: what the tab shows, uploads file by file with
their outcomes, and refusals."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from appliance.webapp import knowledge
from appliance.webapp.client import GatewayError
from tests.unit.webapp_fakes import USER, FakeClient, context, given, run

BASES = [
    {"name": "plant", "documents": 1, "owner": "bob", "readers": ["alice"], "groups": []},
    {"name": "office", "documents": 0, "owner": "bob"},
]
DOCS = [{"filename": "pump.pdf", "chunks": 3, "pages": 2, "added_at": "2026-01-01"}]


def test_refresh_shows_the_chosen_knowledge_base_or_the_first():
    client = FakeClient(knowledge_bases=BASES, documents=DOCS)
    picked, info, rows, documents = run(knowledge.refresh(context(client), USER, "gone"))
    assert given(picked) == {"choices": ["plant", "office"], "value": "plant"}
    assert info.startswith("**plant**: 1 documents; owner bob; readers: alice; groups: none")
    assert len(rows) == 1 and given(documents) == {"choices": ["pump.pdf"], "value": None}
    assert client.called("documents") == [("t-bob", "plant")]
    signed_out = run(knowledge.refresh(context(client), {}, None))
    assert signed_out[1:3] == ("", [])


def test_shared_knowledge_bases_are_named_with_their_owner():
    """Alice's "plant" shared with Bob sits beside his own "plant" as "alice/plant"."""
    shared = {"id": "alice/plant", "name": "plant", "owner": "alice", "documents": 2}
    client = FakeClient(knowledge_bases=[*BASES, shared], documents=DOCS)
    picked, info, *_ = run(knowledge.refresh(context(client), USER, "alice/plant"))
    assert given(picked) == {"choices": ["plant", "office", "alice/plant"], "value": "alice/plant"}
    assert "2 documents; owner alice" in info
    assert client.called("documents") == [("t-bob", "alice/plant")]


def test_create_asks_for_a_name_and_splits_readers_and_groups():
    client = FakeClient()
    with pytest.warns(UserWarning, match="Give the knowledge base a name"):
        assert run(knowledge.create(context(client), USER, " ", "", "")) == (gr.skip(),) * 4
    picked, *cleared = run(
        knowledge.create(context(client), USER, " plant ", "alice, carol", "ops")
    )
    assert given(picked)["value"] == "plant" and cleared == ["", "", ""]
    assert client.called("create_knowledge_base") == [
        ("t-bob", "plant", ["alice", "carol"], ["ops"])
    ]


def test_upload_shows_each_files_outcome_and_forgets_the_uploads(tmp_path):
    good, bad, down = (
        tmp_path / d / name for d, name in (("1", "a.txt"), ("2", "b.png"), ("3", "c.md"))
    )
    for path in (good, bad, down):
        path.parent.mkdir()
        path.write_text("x")

    def upload(token, kb, path, filename):
        if filename == "c.md":
            raise GatewayError(503, "the gateway cannot be reached")
        if filename == "b.png":
            return {"results": [], "errors": [{"message": "b.png: refused: no text found"}]}
        return {"results": [{"status": "added", "chunks": 4}], "errors": []}

    client = FakeClient(upload=upload)
    shown = run(knowledge.upload(context(client), USER, "plant", [str(good), str(bad), str(down)]))
    rows, cleared = shown[-1]
    assert rows == [
        ["a.txt", "added", "4 passages"],
        ["b.png", "refused", "no text found"],
        ["c.md", "refused", "the gateway cannot be reached"],
    ]
    assert cleared is None  # the file box empties
    assert not any(p.exists() or p.parent.exists() for p in (good, bad, down))


def test_upload_needs_a_knowledge_base_and_files():
    with pytest.warns(UserWarning, match="Choose or create a knowledge base first"):
        assert run(knowledge.upload(context(FakeClient()), USER, None, ["x"])) == [
            (gr.skip(), gr.skip())
        ]


def test_search_delete_and_share_check_what_was_chosen():
    hits = [{"filename": "pump.pdf", "page": 2, "score": 0.9, "text": "part XK-4471"}]
    client = FakeClient(query=hits)
    ctx = context(client)
    assert run(knowledge.search(ctx, USER, "plant", "  ")) == ""
    assert "pump.pdf" in run(knowledge.search(ctx, USER, "plant", "part"))
    with pytest.warns(UserWarning, match="exactly"):
        assert run(knowledge.delete_kb(ctx, USER, "plant", "plan")) == (gr.skip(), gr.skip())
    assert run(knowledge.delete_kb(ctx, USER, "plant", "plant ")) == (None, "")
    run(knowledge.share(ctx, USER, "plant", "alice", ""))
    assert client.called("share_knowledge_base") == [("t-bob", "plant", ["alice"], [])]
    refused = context(FakeClient(delete_document=GatewayError(404, "no such document")))
    with pytest.raises(gr.Error, match="no such document"):
        run(knowledge.delete_document(refused, USER, "plant", "x.pdf"))


def test_folder_sync_sends_only_needed_files_and_shows_every_outcome(tmp_path):
    paths = []
    for folder, name, text in [
        ("1", "same.txt", "s"),
        ("2", "new.md", "n"),
        ("3", "twice.txt", "a"),
        ("4", "twice.txt", "b"),
        ("5", ".hidden", "h"),
    ]:
        path = tmp_path / folder / name
        path.parent.mkdir()
        path.write_text(text)
        paths.append(str(path))

    def sync(token, kb, manifest, files):
        if not files:  # the plan: one document gone, one unchanged, one to send
            return [
                {"path": "gone.txt", "status": "removed", "message": ""},
                {"path": "same.txt", "status": "unchanged", "message": ""},
                {"path": "new.md", "status": "needed", "message": ""},
            ]
        return [{"path": name, "status": "added", "message": ""} for name in files]

    client = FakeClient(sync=sync)
    yielded = run(knowledge.sync_folder(context(client), USER, "plant", paths))
    rows, cleared = yielded[-1]
    assert cleared is None
    assert sorted(map(tuple, rows)) == [
        ("gone.txt", "removed", ""),
        ("new.md", "added", ""),
        ("same.txt", "unchanged", ""),
        (
            "twice.txt",
            "refused",
            "several files of this name in the folder: sync it with `appliance kb sync`",
        ),
    ]
    [plan, send] = client.called("sync")
    assert sorted(plan[2]) == ["new.md", "same.txt"] and plan[3] == {}
    assert list(send[3]) == ["new.md"]
    assert not any(Path(p).exists() for p in paths)  # the uploads are forgotten
