"""Model store loading on a GPU machine: host tier, page cache and cold disk, plaintext and
encrypted, against safetensors and raw reads of the same files measured in the same run.

Builds a Llama-architecture bf16 checkpoint of about 8 GiB in 4 shards (random weights, made here,
nothing downloaded), imports it into a plaintext and an encrypted store, then times each path
(median of --repeats; cold runs drop the page cache first, which needs root). Ends with the time
to first token of the model built from the store vs `from_pretrained` of the checkpoint.
Run: python -m benchmarks.store_load [--work DIR] [--layers 40] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from appliance.security.keys import generate_key_file
from appliance.security.policy import (
    LoadPolicy,
    generate_signing_key,
    load_signing_key,
    sign_policy,
)

from appliance.store.importer import import_checkpoint
from appliance.store.loader import (
    PinnedRing,
    load_from_host,
    load_to_gpu,
    load_to_host,
)
from appliance.store.model import AccessRequest, StoredModel

GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    for p in paths:
        with p.open("rb") as f:
            while f.read(64 << 20):
                pass


def gpu_free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def timed(fn, repeats: int, before=None) -> tuple[float, list[float]]:
    """Median seconds of fn() over repeats; `before` runs untimed ahead of each repeat."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        gpu_free()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    gpu_free()
    return statistics.median(times), times


def build_checkpoint(path: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """A random Llama checkpoint (bf16, 4 shards) and its config; returns its weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        vocab_size=vocab,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
    )
    cfg.save_pretrained(path)
    kv = cfg.num_key_value_heads * 128
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    names = list(shapes)
    weight_map = {}
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    per_shard = total / 4
    shard, size, n = {}, 0, 1
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in names:
        t = torch.randn(shapes[name], generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        shard[name] = t.cpu()
        size += t.numel() * 2
        weight_map[name] = f"model-{n:05d}-of-00004.safetensors"
        if size >= per_shard * n or name == names[-1]:
            save_file(shard, str(path / weight_map[name]), {"format": "pt"})
            shard, n = {}, n + 1
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def raw_read(paths: list[Path], threads: int, ring: PinnedRing, direct: bool) -> int:
    """Bytes read by `threads` threads with pread into pinned buffers, nothing else done."""
    from concurrent.futures import ThreadPoolExecutor

    unit = ring.unit_bytes
    jobs = [(p, off) for p in paths for off in range(0, p.stat().st_size, unit)]
    fds = {p: os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0)) for p in paths}
    try:

        def run(t: int) -> int:
            slot = ring.slots[t][0]
            view = memoryview(slot.numpy())
            done = 0
            for p, off in jobs[t::threads]:
                n = min(unit, p.stat().st_size - off)
                n_aligned = (n + 4095) // 4096 * 4096 if direct else n
                got = os.preadv(fds[p], [view[:n_aligned]], off)
                done += min(got, n)
            return done

        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(run, range(threads)))
    finally:
        for fd in fds.values():
            os.close(fd)


def first_token_s(build) -> float:
    """Seconds from nothing to the first generated token of the model `build()` returns."""
    gpu_free()
    t0 = time.perf_counter()
    model = build()
    ids = torch.tensor([[1, 15043, 29892, 920]], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits
        _ = int(logits[0, -1].argmax())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del model, logits
    gpu_free()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/store-bench"))
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold-repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/store_load.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model: check the paths work")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.inter, args.vocab = 2, 512, 1024, 1000
        args.repeats = args.cold_repeats = 1
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "errors": {}}

    def save() -> None:
        res["machine"] = {
            "gpu": torch.cuda.get_device_name(0),
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }
        res["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")

    src = work / "ckpt"
    t0 = time.perf_counter()
    nbytes = build_checkpoint(src, args.layers, args.hidden, args.inter, args.vocab)
    res["checkpoint_bytes"] = nbytes
    log(f"checkpoint {nbytes / 2**30:.2f} GiB built in {time.perf_counter() - t0:.1f} s")
    shards = sorted(src.glob("*.safetensors"))

    keys = work / "keys"
    keys.mkdir(exist_ok=True)
    for f in keys.iterdir():
        f.unlink()
    kek = generate_key_file(keys / "kek.key")
    pub = generate_signing_key(keys / "sign.key")
    policy = sign_policy(
        LoadPolicy(model_id="enc", issuer="bench", issued_at=dt.datetime.now(dt.UTC)),
        load_signing_key(keys / "sign.key"),
    )
    store = work / "store"
    timings = {}
    for name, k, pol, chunk in (
        ("plain", None, None, 4 << 20),
        ("enc", kek, policy, 4 << 20),
    ):
        t0 = time.perf_counter()
        import_checkpoint(
            src, store, name, kek=k, policy=pol, chunk_bytes=chunk, progress=False, replace=True
        )
        timings[name] = time.perf_counter() - t0
        log(f"import {name}: {timings[name]:.1f} s (write + bit-for-bit verification)")
    res["import_s"] = timings
    who = AccessRequest(user="bench", host="any", trusted_signers=[pub])
    plain = StoredModel.open(store / "plain", kek=None, access=who)
    enc = StoredModel.open(store / "enc", kek=kek, access=who)
    data_bytes = plain.data_bytes
    ring = PinnedRing(args.threads, 16 << 20)
    ring32 = PinnedRing(args.threads, 32 << 20)

    # GPU decryption: the first use compiles the kernels (then cached on disk).
    from appliance.store.gpu_decrypt import GpuDecryptor

    try:
        t0 = time.perf_counter()
        GpuDecryptor(enc, "cuda").close()
        res["gpu_decrypt_first_setup_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        GpuDecryptor(enc, "cuda").close()
        res["gpu_decrypt_setup_s"] = round(time.perf_counter() - t0, 3)
        log(
            f"GPU decryption set up in {res['gpu_decrypt_first_setup_s']} s (compiling), "
            f"then {res['gpu_decrypt_setup_s']} s"
        )
    except Exception as exc:  # the other paths still get measured
        res["errors"]["gpu_decrypt_setup"] = repr(exc)
        log(f"GPU decryption setup FAILED {exc!r}")

    # Correctness on the GPU before any timing: every tensor equals its source, on every path.
    from safetensors.torch import load_file

    source = {k: v for shard in shards for k, v in load_file(str(shard), device="cuda").items()}
    for label, load in (
        ("plain", lambda: load_to_gpu(plain, ring=ring)),
        ("enc gpu", lambda: load_to_gpu(enc, ring=ring)),
        ("enc cpu threads", lambda: load_to_gpu(enc, ring=ring, gpu_decrypt=False)),
    ):
        try:
            flat, views = load()
            for name, t in source.items():
                assert torch.equal(views[name], t), (label, name)
            del flat, views
        except Exception as exc:  # recorded; that path's timings then fail the same way
            res["errors"][f"verify {label}"] = repr(exc)
            log(f"verify {label}: FAILED {exc!r}")
        gpu_free()
    del source
    gpu_free()
    log("GPU loads verified against the source tensors")

    def gbps(seconds: float, n: int = data_bytes) -> float:
        return round(n / seconds / GB, 2)

    def measure(key: str, fn, repeats: int, before=None, n: int = data_bytes) -> float | None:
        try:
            med, all_t = timed(fn, repeats, before)
        except Exception as exc:  # keep going: one broken path must not lose the others
            res["errors"][key] = repr(exc)
            log(f"{key}: FAILED {exc!r}")
            return None
        res[key + "_GBps"] = gbps(med, n)
        res[key + "_runs_s"] = [round(t, 3) for t in all_t]
        log(f"{key}: {gbps(med, n):.2f} GB/s ({med:.3f} s)")
        save()
        return res[key + "_GBps"]

    # The GCM kernels alone, on ciphertext already in device memory (a fresh copy each run).
    try:
        import numpy as np

        sealed = torch.from_numpy(np.fromfile(enc.data_path, dtype=np.uint8)).cuda()
        work_buf = torch.empty_like(sealed)
        decryptor = GpuDecryptor(enc, "cuda")

        def kernels_only():
            decryptor.acc.zero_()
            decryptor.decrypt(work_buf, 0, torch.cuda.current_stream())
            decryptor.verify(work_buf)

        measure(
            "gpu_decrypt_kernels", kernels_only, args.repeats, before=lambda: work_buf.copy_(sealed)
        )
        decryptor.close()
        sealed = work_buf = None
        gpu_free()
    except Exception as exc:
        res["errors"]["gpu_decrypt_kernels"] = repr(exc)
        log(f"gpu_decrypt_kernels FAILED {exc!r}")

    # Baselines.
    def h2d(host: torch.Tensor) -> torch.Tensor:
        dev = torch.empty(data_bytes, dtype=torch.uint8, device="cuda")
        return dev.copy_(host, non_blocking=True)

    host = torch.empty(data_bytes, dtype=torch.uint8, pin_memory=True)
    measure("h2d_pinned", lambda h=host: h2d(h), args.repeats)
    del host

    def st_load():
        return [load_file(str(s), device="cuda") for s in shards]

    warm(shards)
    st_warm = measure("safetensors_warm", st_load, args.repeats, n=nbytes)
    can_drop = drop_caches()
    res["cold_runs_dropped_caches"] = can_drop
    measure("safetensors_cold", st_load, args.cold_repeats, before=drop_caches, n=nbytes)

    # Host tier: decrypted bytes in page-locked memory, one copy to the GPU.
    for name, m in (("plain", plain), ("enc", enc)):
        t0 = time.perf_counter()
        host_flat, _ = load_to_host(m, threads=args.threads, pin=True)
        res[f"host_tier_fill_{name}_GBps"] = gbps(time.perf_counter() - t0)
        measure(f"host_tier_{name}", lambda m=m, h=host_flat: load_from_host(m, h), args.repeats)
        del host_flat
        gc.collect()

    # Page cache: plaintext; encrypted decrypted on the GPU (the default with a GPU), by threads
    # of this process; 32 MiB staging units.
    for key, m, load in (
        ("page_cache_plain", plain, lambda: load_to_gpu(plain, ring=ring, threads=args.threads)),
        ("page_cache_enc", enc, lambda: load_to_gpu(enc, ring=ring)),
        ("page_cache_enc_gpu_32MiB", enc, lambda: load_to_gpu(enc, ring=ring32)),
        ("page_cache_plain_32MiB", plain, lambda: load_to_gpu(plain, ring=ring32)),
        ("page_cache_enc_threads", enc, lambda: load_to_gpu(enc, ring=ring, gpu_decrypt=False)),
    ):
        warm([m.data_path])
        measure(key, load, args.repeats, before=lambda m=m: warm([m.data_path]))
    warm([plain.data_path])
    measure(
        "raw_read_page_cache",
        lambda: raw_read([plain.data_path], args.threads, ring, direct=False),
        args.repeats,
        before=lambda: warm([plain.data_path]),
    )

    # Cold disk.
    if can_drop:
        for direct in (False, True):
            tag = "direct" if direct else "buffered"
            measure(
                f"raw_read_cold_{tag}",
                lambda d=direct: raw_read([plain.data_path], args.threads, ring, direct=d),
                args.cold_repeats,
                before=drop_caches,
            )
            for name, m, on_gpu in (("plain", plain, True), ("enc_threads", enc, False)):
                measure(
                    f"disk_cold_{name}_{tag}",
                    lambda m=m, d=direct, g=on_gpu: load_to_gpu(
                        m, ring=ring, direct=d, gpu_decrypt=g
                    ),
                    args.cold_repeats,
                    before=drop_caches,
                )
        for direct in (False, True):
            tag = "direct" if direct else "buffered"
            measure(
                f"disk_cold_enc_gpu_{tag}",
                lambda d=direct: load_to_gpu(enc, ring=ring, direct=d),
                args.cold_repeats,
                before=drop_caches,
            )

    # Time to first token: from_pretrained vs the store (page cache warm for both).
    try:
        from transformers import AutoConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        warm(shards)
        res["ttft_from_pretrained_s"] = round(
            first_token_s(
                lambda: LlamaForCausalLM.from_pretrained(
                    src, torch_dtype=torch.bfloat16, device_map="cuda"
                )
            ),
            3,
        )

        def from_store(load):
            def build():
                config = AutoConfig.from_pretrained(src)
                with torch.device("meta"):
                    model = LlamaForCausalLM(config).to(torch.bfloat16)
                _, views = load()
                model.load_state_dict(views, assign=True, strict=True)
                # Non-persistent buffers are not in a checkpoint: make them on the GPU.
                model.model.rotary_emb = LlamaRotaryEmbedding(config, device="cuda")
                return model.eval()

            return build

        for key, m, load in (
            ("ttft_store_enc_s", enc, lambda: load_to_gpu(enc, ring=ring)),
            (
                "ttft_store_enc_threads_s",
                enc,
                lambda: load_to_gpu(enc, ring=ring, gpu_decrypt=False),
            ),
            ("ttft_store_plain_s", plain, lambda: load_to_gpu(plain, ring=ring)),
        ):
            warm([m.data_path])
            try:
                res[key] = round(first_token_s(from_store(load)), 3)
            except Exception as exc:
                res["errors"][key] = repr(exc)
        log(
            f"TTFT from_pretrained {res.get('ttft_from_pretrained_s')} s, store plain "
            f"{res.get('ttft_store_plain_s')} s, store encrypted {res.get('ttft_store_enc_s')} s"
        )
    except Exception as exc:
        res["errors"]["ttft"] = repr(exc)
        log(f"ttft: FAILED {exc!r}")

    # The keys, as ratios measured in this run.
    def ratio(a: str, b: str) -> float | None:
        x, y = res.get(a), res.get(b)
        return round(x / y, 3) if x and y else None

    res["host_tier_GBps"] = res.get("host_tier_plain_GBps")
    res["host_tier_vs_safetensors_warm"] = ratio("host_tier_plain_GBps", "safetensors_warm_GBps")
    res["page_cache_GBps"] = res.get("page_cache_plain_GBps")
    res["page_cache_vs_safetensors_warm"] = ratio("page_cache_plain_GBps", "safetensors_warm_GBps")
    best_raw = max(
        (res.get(k) or 0 for k in ("raw_read_cold_buffered_GBps", "raw_read_cold_direct_GBps")),
        default=0,
    )
    best_cold = max(
        (res.get(k) or 0 for k in ("disk_cold_plain_buffered_GBps", "disk_cold_plain_direct_GBps")),
        default=0,
    )
    best_cold_enc = max(
        res.get(f"disk_cold_enc_{k}_GBps") or 0 for k in ("gpu_buffered", "gpu_direct")
    )
    res["disk_vs_raw_read"] = round(best_cold / best_raw, 3) if best_raw else None
    # The loader's default for an encrypted model on a GPU: decryption on the GPU.
    page_enc = res.get("page_cache_enc_GBps") or 0
    enc_ratios = {
        "host_tier": ratio("host_tier_enc_GBps", "host_tier_plain_GBps"),
        "page_cache": round(page_enc / res["page_cache_GBps"], 3)
        if res.get("page_cache_GBps")
        else None,
        "disk_cold": round(best_cold_enc / best_cold, 3) if best_cold else None,
    }
    res["encrypted_vs_plaintext"] = enc_ratios
    present = [v for v in enc_ratios.values() if v is not None]
    res["encrypted_vs_plaintext_min"] = min(present) if present else None
    if res.get("ttft_store_enc_s") and res.get("ttft_from_pretrained_s"):
        res["ttft_store_vs_from_pretrained"] = round(
            res["ttft_store_enc_s"] / res["ttft_from_pretrained_s"], 3
        )
    res["safetensors_warm_GBps_baseline"] = st_warm
    save()
    rows = [
        ("host tier (pinned) -> GPU", "host_tier_plain_GBps", "host_tier_enc_GBps"),
        ("page cache -> GPU (default)", "page_cache_plain_GBps", "page_cache_enc_GBps"),
        ("page cache -> GPU, CPU threads decrypt", None, "page_cache_enc_threads_GBps"),
        ("cold disk, buffered", "disk_cold_plain_buffered_GBps", "disk_cold_enc_gpu_buffered_GBps"),
        ("cold disk, O_DIRECT", "disk_cold_plain_direct_GBps", "disk_cold_enc_gpu_direct_GBps"),
        ("cold disk, buffered, CPU threads decrypt", None, "disk_cold_enc_threads_buffered_GBps"),
        ("raw parallel read, cold buffered", "raw_read_cold_buffered_GBps", None),
        ("raw parallel read, cold O_DIRECT", "raw_read_cold_direct_GBps", None),
        ("raw parallel read, page cache", "raw_read_page_cache_GBps", None),
        ("safetensors load_file cuda, warm", "safetensors_warm_GBps", None),
        ("safetensors load_file cuda, cold", "safetensors_cold_GBps", None),
        ("pinned host-to-GPU copy", "h2d_pinned_GBps", None),
    ]
    print(f"\nstore_load ({nbytes / 2**30:.2f} GiB bf16, {res['machine']['gpu']})")
    print(f"  {'path':44s} {'plaintext GB/s':>15s} {'encrypted GB/s':>15s}")
    for label, a, b in rows:
        fa = res.get(a) if a else None
        fb = res.get(b) if b else None
        cells = ["-" if v is None else v for v in (fa, fb)]
        print(f"  {label:44s} {cells[0]:>15} {cells[1]:>15}")
    for k in (
        "host_tier_vs_safetensors_warm",
        "page_cache_vs_safetensors_warm",
        "disk_vs_raw_read",
        "encrypted_vs_plaintext",
        "encrypted_vs_plaintext_min",
        "gpu_decrypt_first_setup_s",
        "gpu_decrypt_setup_s",
        "gpu_decrypt_kernels_GBps",
        "page_cache_enc_gpu_32MiB_GBps",
        "page_cache_plain_32MiB_GBps",
        "ttft_from_pretrained_s",
        "ttft_store_plain_s",
        "ttft_store_enc_s",
        "ttft_store_enc_threads_s",
    ):
        print(f"  {k}: {res.get(k)}")
    print(f"errors: {res['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
