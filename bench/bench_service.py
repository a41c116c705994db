"""What cross-tenant batching buys the service: requests/s and tokens/s with 1, 4 and 8 tenants.

    .venv/bin/python bench/bench_service.py [--steps 12] [--threads 1] [--part batching|fairness]

Two `lorafleet serve` processes on the embedded debug base (qwen3_moe, fp32, CPU), used one at
a time; the tenants live in this process, each a thread with its own unmodified Tinker SDK
client: a training loop (`forward_backward` of ``--batch`` datums of ``--seq`` tokens, then
`optim_step`) and, separately, a sampling loop (`sample` from the tenant's own adapter,
``--num-samples`` × ``--max-tokens``). Every configuration runs on both servers, interleaved
round-robin so both see the same machine load:

* **batched**: the service as shipped — ready requests of all tenants share one mixed
  `forward_backward` per step and one decode batch per sampling call;
* **one tenant per step**: ``lorafleet serve --one-tenant-per-step`` (each model's requests
  run alone: the Twinkle-style time-sharing of one base).

Printed: requests/s and tokens/s (training: input tokens; sampling: generated tokens) and the
batched / one-per-step ratio. The clients share the machine's cores with the server, so
absolute figures include their cost; the ratio is what batching buys.

**Fairness** (``--part fairness``; issue 14, finding 1): ``--small-tenants`` tenants each send
``--small-requests`` 1 × 2-token samples one after another, and their latency's p50 / p99 is
printed, side by side in one run, for: the small tenants alone; the same while one tenant floods
(``--flood-inflight`` samples of ``--flood-samples`` × ``--flood-tokens`` tokens, ``stop=[]``,
always that many in flight) against the default server (``--decode-chunk-tokens 32``), one with
``--decode-chunk-tokens 8``, and one with ``--decode-chunk-tokens 0`` (each sample decodes to its
end at once, as before issue 14; the fair shares still order what starts). The flood's own
generated tokens/s is printed twice: beside the small tenants (over the flood's whole run), and
alone (``--flood-inflight`` requests at once, nothing else), which is what the chunking costs it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

import torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", default="1,4,8")
    ap.add_argument("--steps", type=int, default=12, help="training iterations per tenant per run")
    ap.add_argument("--samples", type=int, default=4, help="sampling calls per tenant per run")
    ap.add_argument("--batch", type=int, default=4, help="datums per forward_backward")
    ap.add_argument("--seq", type=int, default=64, help="tokens per datum")
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the server")
    ap.add_argument("--part", choices=("all", "batching", "fairness"), default="all")
    ap.add_argument("--small-tenants", type=int, default=3)
    ap.add_argument("--small-requests", type=int, default=12, help="1 x 2-token samples per small tenant")
    ap.add_argument("--flood-samples", type=int, default=32, help="num_samples of each flooding request")
    ap.add_argument("--flood-tokens", type=int, default=1024, help="max_tokens of each flooding request")
    ap.add_argument("--flood-inflight", type=int, default=2, help="flooding requests kept in flight")
    return ap.parse_args(argv)


def run_tenants(url, keys, base, args, mode, warmup=False):
    """All tenants at once; returns (requests, tokens, seconds)."""
    import tinker
    from tinker import types

    clients = []
    for k in keys:
        sc = tinker.ServiceClient(base_url=url, api_key=k)
        if mode == "train":
            clients.append((sc, sc.create_lora_training_client(base_model=base, rank=8).result(60)))
        else:
            # each tenant samples its own adapter (weights saved from its own training client)
            tc = sc.create_lora_training_client(base_model=base, rank=8).result(60)
            clients.append((sc, tc.save_weights_and_get_sampling_client().result(60)))
    g = torch.Generator().manual_seed(0)
    data = [types.Datum(model_input=types.ModelInput.from_ints(torch.randint(3, 100, (args.seq,), generator=g).tolist()),
                        loss_fn_inputs={"target_tokens": torch.randint(3, 100, (args.seq,), generator=g).tolist(),
                                        "weights": [1.0] * args.seq}) for _ in range(args.batch)]
    prompt = types.ModelInput.from_ints(torch.randint(3, 100, (16,), generator=g).tolist())
    sp = types.SamplingParams(max_tokens=args.max_tokens, stop=[], temperature=1.0)
    counts = [[0, 0] for _ in keys]
    barrier = threading.Barrier(len(keys) + 1)

    def work(i):
        _, c = clients[i]
        barrier.wait()
        if mode == "train":
            for _ in range(1 if warmup else args.steps):
                fb = c.forward_backward(data, "cross_entropy")
                opt = c.optim_step(types.AdamParams(learning_rate=1e-4))
                fb.result(300), opt.result(300)
                counts[i][0] += 2
                counts[i][1] += args.batch * args.seq
        else:
            for _ in range(1 if warmup else args.samples):
                out = c.sample(prompt, num_samples=args.num_samples, sampling_params=sp).result(300)
                counts[i][0] += 1
                counts[i][1] += sum(len(s.tokens) for s in out.sequences)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for sc, _ in clients:
        sc.close("success").result(60)
    return sum(c[0] for c in counts), sum(c[1] for c in counts), dt


def start_server(port: int, keys: dict, slots: int, args, batched: bool, extra=()) -> subprocess.Popen:
    env = dict(os.environ, LORAFLEET_API_KEYS=",".join(f"{t}:{k}" for k, t in keys.items()))
    cmd = [sys.executable, "-m", "lorafleet.cli", "serve", "--port", str(port), "--data-dir",
           tempfile.mkdtemp(prefix="lf-bench-"), "--max-adapters", str(slots), "--max-rank", "8",
           "--base", "debug:qwen3_moe",  # the random-init base the docs/service.md table was measured on
           "--threads", str(args.threads)] + ([] if batched else ["--one-tenant-per-step"]) + list(extra)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {' '.join(cmd)}")
        time.sleep(0.2)


def main(argv=None):
    args = parse_args(argv)
    import logging

    logging.getLogger("tinker").setLevel(logging.ERROR)
    import tinker

    from lorafleet.service.server import free_port

    tenants = [int(x) for x in args.tenants.split(",")]
    n_keys = max(max(tenants), args.small_tenants + 1)
    keys = {f"tml-bench-{i:02d}": f"t{i}" for i in range(n_keys)}
    servers = []
    try:
        if args.part in ("all", "batching"):
            urls = {}
            for batched in (True, False):
                port = free_port()
                servers.append(start_server(port, keys, 2 * max(tenants) + 1, args, batched))
                urls[batched] = f"http://127.0.0.1:{port}"
            base = tinker.ServiceClient(base_url=urls[True], api_key=next(iter(keys))) \
                .get_server_capabilities().supported_models[0].model_name
            measure(args, tenants, keys, urls, base)
            for p in servers:
                p.kill()
            servers = []
        if args.part in ("all", "fairness"):
            urls = {}
            for chunk in (32, 8, 0):
                port = free_port()
                servers.append(start_server(port, keys, 4, args, True, ["--decode-chunk-tokens", str(chunk)]))
                urls[chunk] = f"http://127.0.0.1:{port}"
            measure_fairness(args, list(keys), urls)
    finally:
        for p in servers:
            p.kill()


def measure(args, tenants, keys, urls, base):
    print(f"torch {torch.__version__}, {args.threads} server thread(s) per server, {os.cpu_count()} cores, "
          f"loadavg {os.getloadavg()[0]:.2f}; base {base}; training: {args.steps} x (forward_backward "
          f"{args.batch}x{args.seq} tokens + optim_step) per tenant; sampling: {args.samples} x sample("
          f"{args.num_samples} x {args.max_tokens} tokens) per tenant; median of {args.rounds} interleaved rounds")
    rows = []
    for mode in ("train", "sample"):
        for n in tenants:
            res = {True: [], False: []}
            for batched in (True, False):  # warm-up, untimed
                run_tenants(urls[batched], list(keys)[:n], base, args, mode, warmup=True)
            for _ in range(args.rounds):
                for batched in (True, False):
                    res[batched].append(run_tenants(urls[batched], list(keys)[:n], base, args, mode))
            med = {b: (statistics.median(r[0] / r[2] for r in v), statistics.median(r[1] / r[2] for r in v))
                   for b, v in res.items()}
            rows.append((mode, n, med[True], med[False]))
            print(f"  done: {mode} {n} tenant(s)", file=sys.stderr)
    print()
    hdr = (f"{'workload':<9} {'tenants':>7} | {'batched req/s':>13} {'tok/s':>8} | {'1-per-step req/s':>16} "
           f"{'tok/s':>8} | {'batched / 1-per-step':>20}")
    print(hdr)
    print("-" * len(hdr))
    for mode, n, (rq, tk), (rq1, tk1) in rows:
        print(f"{mode:<9} {n:>7} | {rq:>13.2f} {tk:>8.0f} | {rq1:>16.2f} {tk1:>8.0f} | {tk / tk1:>19.2f}x")
    print(f"loadavg at end {os.getloadavg()[0]:.2f}")


# ---------------------------------------------------------------------------- fairness
def _sample_once(http, url, key, n, max_tokens) -> tuple[float, int]:
    """One base-model sample over raw HTTP (asample, then long polls): (seconds, tokens)."""
    t0 = time.perf_counter()
    r = http.post(f"{url}/api/v1/asample", headers={"X-API-Key": key}, json={
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 7, 9, 11, 13, 17, 19, 23]}]},
        "num_samples": n, "sampling_params": {"max_tokens": max_tokens, "stop": [], "temperature": 1.0}})
    r.raise_for_status()
    rid = r.json()["request_id"]
    while True:
        r = http.post(f"{url}/api/v1/retrieve_future", headers={"X-API-Key": key}, json={"request_id": rid})
        r.raise_for_status()
        if "protobuf" in r.headers.get("content-type", ""):
            return time.perf_counter() - t0, n * max_tokens  # stop=[]: every sample runs max_tokens
        body = r.json()
        if body.get("type") != "try_again":
            raise RuntimeError(f"sample failed: {body}")


def fairness_run(url, keys, args, flood: bool) -> tuple[list[float], float]:
    """Small tenants' latencies (s) while one tenant floods, or not; and the flood's generated
    tokens/s over its whole run (it ends with the small tenants' last request and its own in flight)."""
    small_keys, flood_key = keys[1:1 + args.small_tenants], keys[0]
    stop, lat, flood_tokens = threading.Event(), [], [0]
    lock = threading.Lock()

    def flooder():
        with httpx.Client(timeout=3600) as http:
            while not stop.is_set():
                _, n = _sample_once(http, url, flood_key, args.flood_samples, args.flood_tokens)
                with lock:
                    flood_tokens[0] += n

    def small(key):
        with httpx.Client(timeout=3600) as http:
            for _ in range(args.small_requests):
                dt, _ = _sample_once(http, url, key, 1, 2)
                with lock:
                    lat.append(dt)

    floods = [threading.Thread(target=flooder) for _ in range(args.flood_inflight if flood else 0)]
    t_flood = time.perf_counter()
    for t in floods:
        t.start()
    if flood:
        time.sleep(1.0)  # the flood is decoding before the first small request
    smalls = [threading.Thread(target=small, args=(k,)) for k in small_keys]
    for t in smalls:
        t.start()
    for t in smalls:
        t.join()
    stop.set()
    for t in floods:  # their last requests finish before the next configuration runs on the same cores
        t.join()
    return lat, flood_tokens[0] / (time.perf_counter() - t_flood)


def flood_alone(url, keys, args) -> float:
    """The flood by itself (``--flood-inflight`` requests sent at once, nothing else): tokens/s."""
    out = []

    def one():
        with httpx.Client(timeout=3600) as http:
            out.append(_sample_once(http, url, keys[0], args.flood_samples, args.flood_tokens)[1])

    threads = [threading.Thread(target=one) for _ in range(args.flood_inflight)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(out) / (time.perf_counter() - t0)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def measure_fairness(args, keys, urls):
    print(f"\nfairness: {args.small_tenants} small tenant(s) x {args.small_requests} sequential 1 x 2-token "
          f"samples; flood: 1 tenant keeps {args.flood_inflight} x ({args.flood_samples} x {args.flood_tokens} "
          f"tokens, stop=[]) in flight; loadavg {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    with httpx.Client(timeout=600) as http:  # warm-up, untimed
        for url in urls.values():
            _sample_once(http, url, keys[1], 1, 2)
    cols = [("alone", urls[32], False), ("flood, chunk 32", urls[32], True), ("flood, chunk 8", urls[8], True),
            ("flood, chunk 0", urls[0], True)]
    res, alone = {}, {}
    for name, url, flood in cols:
        res[name] = fairness_run(url, keys, args, flood)
        if flood:
            alone[name] = flood_alone(url, keys, args)
        print(f"  done: {name}", file=sys.stderr)
    print()
    print(f"{'small tenants':<22}" + "".join(f" | {n:>20}" for n, _, _ in cols))
    print("-" * (22 + 23 * len(cols)))
    for label, q in (("latency p50 (s)", 0.5), ("latency p99 (s)", 0.99)):
        print(f"{label:<22}" + "".join(f" | {_pct(res[n][0], q):>20.3f}" for n, _, _ in cols))
    print(f"{'flood tok/s':<22}" + "".join(f" | {res[n][1]:>20.0f}" if f else f" | {'-':>20}" for n, _, f in cols))
    print(f"{'flood alone tok/s':<22}" + "".join(f" | {alone[n]:>20.0f}" if f else f" | {'-':>20}" for n, _, f in cols))
    print(f"loadavg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
