"""The Models tab's handlers without a browser: the catalog for everyone, instances and
start/stop for administrators."""

from __future__ import annotations

import gradio as gr
import pytest

from appliance.webapp import models_view
from tests.unit.webapp_fakes import ADMIN, REFUSED, USER, FakeClient, context, given, run

MODELS = [
    {"id": "tiny-chat", "kind": "chat", "installed": True, "state": "running", "instances": 1},
    {"id": "big", "kind": "chat", "installed": False, "state": "stopped"},
]
LIVE = [{"job_id": 12, "model": "tiny-chat", "state": "ready", "node": "n1"}]


def test_users_see_the_catalog_and_their_usage_only():
    client = FakeClient(models=MODELS, my_usage=[], instances=LIVE)
    catalog, box, instances, _, _, usage = run(models_view.refresh(context(client), USER))
    assert [row[0] for row in catalog] == ["tiny-chat", "big"]
    assert given(box) == {"visible": False} and instances == []
    assert usage == "**Your usage.** No requests yet."
    assert client.called("instances") == []


def test_administrators_see_instances_and_what_they_can_start_and_stop():
    client = FakeClient(models=MODELS, my_usage=[], instances=LIVE)
    _, box, instances, startable, jobs, _ = run(models_view.refresh(context(client), ADMIN))
    assert given(box) == {"visible": True} and instances[0][:4] == [12, "tiny-chat", "ready", "n1"]
    assert given(startable)["choices"] == ["tiny-chat"]  # installed models only
    assert given(jobs)["choices"] == [("12 (tiny-chat on n1)", 12)]
    # Instances that cannot be listed leave the rest of the tab as it is.
    failing = FakeClient(models=MODELS, my_usage=[], instances=REFUSED)
    assert run(models_view.refresh(context(failing), ADMIN))[2] == []


def test_a_refused_refresh_keeps_the_tab_and_start_stop_need_a_choice():
    assert run(models_view.refresh(context(FakeClient(models=REFUSED)), USER)) == (gr.skip(),) * 6
    client = FakeClient(start_model={"job_id": 13})
    with pytest.warns(UserWarning, match="Choose a model"):
        run(models_view.start(context(client), ADMIN, None))
    run(models_view.start(context(client), ADMIN, "tiny-chat"))
    run(models_view.stop(context(client), ADMIN, "12"))
    assert client.called("start_model") == [("t-alice", "tiny-chat")]
    assert client.called("stop_instance") == [("t-alice", 12)]
