"""Preemptible serving and live migration on a real local cluster: a batch job preempts the
instance that is streaming an answer, or an admin drains its node; the client's answer goes on
from another instance and equals an undisturbed run's (greedy decoding)."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import pytest

from appliance.lines import iter_sse_lines
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import (
    InstanceEngine,
    local_cluster_settings,
    running_gateway,
    running_local_cluster,
)
from tests import near_ties
from tests.slurm_fixtures import require_local_slurm, stack_settings, tiny_catalog, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]

GRACE_S = 150
BODY = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
    "stream": True,
    "temperature": 0,
    "seed": 7,
    "max_tokens": 300,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-node cluster of its own, with a long grace time: on a 2-core machine a new instance
    takes up to a minute to start, and the test must see the batch job start within the grace."""
    require_local_slurm()
    settings = local_cluster_settings(
        tmp_path_factory.mktemp("mig-slurm"), nodes=2, cluster={"preempt_grace_s": GRACE_S}
    )
    with running_local_cluster(settings):
        yield settings


@pytest.fixture(scope="module")
def stack(cluster, tiny_model_dir, tmp_path_factory):
    catalog = tiny_catalog(tiny_model_dir, "").replace(
        "    max_model_len: 512\n",
        "    max_model_len: 512\n    max_instances: 2\n"
        "    idle_timeout_s: 0\n    preemptible: true\n",
    )
    settings = stack_settings(
        cluster,
        tmp_path_factory.mktemp("mig"),
        catalog,
        gateway={"preemption_poll_interval_s": 0.5, "keepalive_interval_s": 1.0},
    )
    with running_gateway(settings) as url:
        yield settings, url


def instances(url: str) -> list[dict]:
    return httpx.get(url + "/admin/instances", timeout=10).json()["instances"]


def slurm(cluster) -> SlurmClient:
    return SlurmClient(LocalRunner(), cluster.slurm_conf)


class SlowReader(threading.Thread):
    """A client that reads a stream, calls `on_start` once `start_after` events have come
    (the answer is under way), and from then on reads slowly (a person's terminal, a slow
    link)."""

    def __init__(
        self, url: str, delay_s: float, body: dict = BODY, on_start=None, start_after: int = 20
    ):
        super().__init__(daemon=True)
        self.url, self.delay_s, self.body, self.on_start = url, delay_s, body, on_start
        self.start_after = start_after
        self.text, self.events, self.error = "", [], None
        self.instance: int | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url + "/v1/chat/completions", json=self.body, timeout=600
            ) as resp:
                self.instance = int(resp.headers["x-appliance-instance"])
                for line in iter_sse_lines(resp):
                    if not line.startswith("data: "):
                        continue
                    self.events.append(line[6:])
                    if line[6:] != "[DONE]":
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        for choice in chunk["choices"]:
                            self.text += choice["delta"].get("content") or ""
                    if len(self.events) == self.start_after:
                        if self.on_start is not None:
                            self.on_start()
                        self.started.set()
                    if self.started.is_set():
                        time.sleep(self.delay_s)
        except Exception as exc:  # reported by the test
            self.error = exc
            self.started.set()


def answer_pieces(url: str, body: dict = BODY) -> list[str]:
    """The text of each event of an undisturbed answer."""
    pieces = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        for line in iter_sse_lines(resp):
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                pieces.append("".join(c["delta"].get("content") or "" for c in choices))
    return pieces


def undisturbed_answer(url: str, body: dict = BODY) -> str:
    return "".join(answer_pieces(url, body))


def logprobs_reply(url: str, body: dict) -> dict:
    """The undisturbed answer with its two best candidates per token (tests/near_ties.py)."""
    ask = {**body, "stream": False, "logprobs": True, "top_logprobs": 2}
    ask.pop("stream_options", None)
    return httpx.post(url + "/v1/chat/completions", json=ask, timeout=300).json()


def checkable_length(url: str, body: dict, moved_after_chars: int) -> int:
    """Characters of the undisturbed answer that a moved one must reproduce: up to the first
    near-tie after the move point (all of it when there is none)."""
    return near_ties.checkable_length(logprobs_reply(url, body), moved_after_chars)


def instance_url(url: str, job_id: int) -> str:
    return next(i for i in instances(url) if i["job_id"] == job_id)["url"]


def moves(url: str) -> int:
    """Times the gateway's recent requests went on on another instance."""
    records = httpx.get(url + "/admin/monitoring/requests?limit=2000", timeout=30).json()
    return sum(r["moves"] for r in records["requests"])


def test_a_batch_job_preempts_a_streaming_instance_and_the_answer_goes_on(cluster, stack):
    settings, url = stack
    pieces = answer_pieces(url)  # starts the first (preemptible) instance
    expected = "".join(pieces)
    assert len(expected) > 200
    # The engine stalls at the 20th event, so the move comes after it.
    cut = checkable_length(url, BODY, len("".join(pieces[:20])))
    [first] = [i for i in instances(url) if i["state"] == "ready"]
    assert first["preemptible"]

    moved_before = moves(url)
    engine = InstanceEngine(instance_url(url, first["job_id"]))
    reader = SlowReader(url, delay_s=0.05, on_start=engine.stall)
    reader.start()
    assert reader.started.wait(120) and reader.error is None
    assert reader.instance == first["job_id"]
    # Ordinary batch work that needs the whole node the instance runs on.
    submitted = time.time()
    batch = slurm(cluster).submit(
        "#!/bin/bash\n"
        f"#SBATCH --job-name={cluster.cluster.name}-batch\n"
        f"#SBATCH --partition={cluster.cluster.batch_partition}\n"
        f"#SBATCH --nodelist={first['node']}\n#SBATCH --exclusive\n"
        f"#SBATCH --output={settings.log_dir}/batch-%j.out\n"
        "sleep 2\n"
    )
    try:
        job = wait_for(
            lambda: (j := slurm(cluster).job(batch)) and j.start_time and j,
            GRACE_S + 30,
            "the batch job to start",
        )
        reader.join(timeout=300)
        assert not reader.is_alive() and reader.error is None, reader.error
    finally:
        engine.go_on()
        subprocess.run(["scancel", str(batch)], env={"SLURM_CONF": str(cluster.slurm_conf)})
    assert job.start_time - submitted < GRACE_S
    assert reader.events[-1] == "[DONE]"
    assert reader.text[:cut] == expected[:cut] and len(reader.text) >= cut
    assert moves(url) == moved_before + 1
    # The answer came from a second instance, on the other node, after the first was released.
    assert first["job_id"] not in [i["job_id"] for i in instances(url)]


def late_stop_string(pieces: list[str], after_events: int, before: int) -> str:
    """A stop string that first occurs after the first `after_events` events of the answer and
    ends before character `before`, as late as there is one. The tiny model's answers often
    repeat themselves (how depends on the build, which trains for a fixed time): then only the
    first round of the repetition has strings that occur there first."""
    answer, early = "".join(pieces), len("".join(pieces[:after_events]))
    for start in range(min(len(answer), before) - 12, early - 1, -1):
        stop = answer[start : start + 12]
        if answer.find(stop) == start and stop.strip():
            return stop
    raise AssertionError(
        f"no string occurs first between {early} and {before} characters in {answer!r}"
    )


def stall_and_stop(pieces: list[str], reply: dict) -> tuple[int, str]:
    """Where to stall the engine (an event, the 8th or later) and a stop string that begins 12
    events after it (the gateway holds back up to 11 characters) and ends before the first
    near-tie after it (beyond it a moved answer may differ): the earliest stall with one. Where
    the near-ties fall depends on the tiny model's build, which trains for a fixed time."""
    for stall in range(8, len(pieces) - 12):
        cut = near_ties.checkable_length(reply, len("".join(pieces[:stall])))
        try:
            return stall, late_stop_string(pieces, after_events=stall + 12, before=cut)
        except AssertionError:
            continue
    raise AssertionError(f"no stall point with a stop string before a near-tie: {pieces!r}")


def test_draining_a_node_moves_its_streams(cluster, stack):
    # With a stop string that first occurs after the move: the gateway holds back what could
    # start one, so the stop string ends the moved answer where it ends the undisturbed one
    # (one that spans the move: tests/unit).
    _, url = stack
    full = answer_pieces(url)
    stall, stop = stall_and_stop(full, logprobs_reply(url, BODY))
    body = {**BODY, "stop": [stop]}
    expected = undisturbed_answer(url, body)
    assert expected == "".join(full)[: "".join(full).index(body["stop"][0])]
    moved_before = moves(url)
    [serving] = [i for i in instances(url) if i["state"] == "ready"]
    engine = InstanceEngine(instance_url(url, serving["job_id"]))
    reader = SlowReader(url, delay_s=0.05, body=body, on_start=engine.stall, start_after=stall)
    reader.start()
    assert reader.started.wait(120) and reader.error is None
    assert reader.instance == serving["job_id"]
    node = serving["node"]
    env = {"SLURM_CONF": str(cluster.slurm_conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    subprocess.run(
        ["scontrol", "update", f"nodename={node}", "state=drain", "reason=maintenance"],
        env=env,
        check=True,
    )
    try:
        wait_for(
            lambda: reader.instance not in [i["job_id"] for i in instances(url)],
            240,
            "the instance on the drained node to go",
        )
        reader.join(timeout=300)
        assert not reader.is_alive() and reader.error is None, reader.error
    finally:
        engine.go_on()
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=env)
    assert reader.events[-1] == "[DONE]"
    assert reader.text == expected
    assert moves(url) == moved_before + 1  # the stop string came after the move
    assert all(i["node"] != node for i in instances(url))
