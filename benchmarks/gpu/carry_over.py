"""Seeds a lease's results.json with the parts an earlier lease measured on the same GPU model.

A lease is too short to measure every part again. Parts that stand alone (no ratio against a
baseline of another part) are carried from the committed result file, each with the date its
lease measured it (`measured_at`), and only where this machine's GPU is the one they ran on.

    python3 -m benchmarks.gpu.carry_over [--work /tmp/gpu-serving] [--parts throughput]
"""

import argparse
import json
import sys
from pathlib import Path

from benchmarks.gpu_serving import gpu_name, load, save

RESULTS = Path(__file__).resolve().parents[1] / "results"
# Parts that need nothing from another part (throughput: the gateway against direct vLLM in
# the same run; sleep and kept: vLLM by hand). Never the baseline nor the cold starts: their
# ratio needs both from one lease.
STANDALONE_PARTS = ("throughput", "sleep", "kept_engine")


def carry_over(committed: dict, results: dict, parts: list[str], gpu: str | None) -> list[str]:
    """The parts copied from `committed` (a report's JSON) into `results`; none on another GPU."""
    if gpu is None or committed.get("gpu") != gpu:
        return []
    details = committed.get("details", {})
    when = details.get("measured_at", {})
    carried = []
    for part in parts:
        if part in STANDALONE_PARTS and part in details and part not in results:
            results[part] = details[part]
            results.setdefault("measured_at", {})[part] = when.get(part, "an earlier lease")
            carried.append(part)
    return carried


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-serving"))
    ap.add_argument("--parts", nargs="*", default=["throughput"], choices=STANDALONE_PARTS)
    ap.add_argument("--result-name", default="gpu_serving")
    args = ap.parse_args(argv)
    path = RESULTS / f"{args.result_name}.json"
    committed = json.loads(path.read_text()) if path.exists() else {}
    results = load(args.work)
    gpu = gpu_name()
    carried = carry_over(committed, results, args.parts, gpu)
    save(args.work, results)
    print(f"carried over from {path.name} ({committed.get('gpu')}) to {gpu}: {carried or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
