"""Serving latency and throughput against quality: h2po at S = 1, 4, 10 beside EASE and the two-tower (and EASE +
intent), all served the same way by `h2po serve` (Ray Serve, serve.batch, loopback HTTP), in one run.

Run:  nice -n 5 python benchmarks/serve_latency.py --checkpoint runs/g_intent10/h2po.safetensors [--steps 1 4 10]
      [--clients 1 10 100] [--seconds 10] [--out serving.json] [key=value ...]

For every row:
- quality: NDCG@10 of the served method's lists on the test requests of the checkpoint's run (`app.pipeline.
  examples(ws, "test")`, eval.test_draws draws per user, families A and B; `evaluation.metrics.ranking_metrics`),
  computed in this process by the same listers the replicas run (`serving.lists`): greedy sampling, so the served
  lists are these lists;
- load: at each offered load of C concurrent clients, C closed-loop clients on loopback each POST one test request
  (k = requests.k), wait for the answer, and POST the next, for --seconds; the loop stops by itself. Latency is the
  client's wall time per answered request (p50/p95/p99); lists/s = answered requests / seconds; shed = 503s;
- floor (model rows): `flops_per_list` of benchmarks/sampler.py (one forward pass's matmul arithmetic per step,
  times S, for the mean context length of the test requests) over the FLOP rate of a large float32 matmul in the
  replica's thread count (with serve.replica_gpus > 0: of a larger one on the GPU, in bf16 under serve.bf16): no
  implementation on this machine lists faster than that, batching aside.
`serve.replica_gpus=1` serves the model (and computes its quality) on the GPU, in bf16 unless `serve.bf16=false`.
The client shares the machine with the server (on 2 cores it costs them CPU), as any loopback load test does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import socket
import time
from pathlib import Path

import aiohttp
import numpy as np
import torch
from harness import format_rows, machine, output_file, write_result
from sampler import flops_per_list, matmul_rate

from app import pipeline
from catalog.requests import request_to_json
from evaluation.metrics import item_mask, ranking_metrics
from learner.checkpoint import config_from_checkpoint
from serving.launch import reload, replica_threads, start
from serving.lists import load_policy, load_rival

DEFAULT_CHECKPOINT = "runs/g_intent10/h2po.safetensors"
RIVAL_NAMES = ("EASE", "EASE + intent", "two-tower")  # serving.lists.RIVALS


def quality(lister, examples: list, n_items: int) -> dict[str, float]:
    """Mean NDCG@10 per family of the lister's lists on `examples`."""
    lists = np.stack(lister.lists([e.request for e in examples]))
    ndcg = ranking_metrics(lists, item_mask([e.targets for e in examples], n_items), [10])["ndcg@10"]
    families = np.array([e.family for e in examples])
    return {family: float(ndcg[families == family].mean()) for family in sorted(set(families))}


async def offer_load(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """`clients` closed-loop clients POSTing `bodies` in turn for `seconds`.  -> latency percentiles (ms), lists/s,
    shed and failed counts"""
    latencies: list[float] = []
    counts = {"shed": 0, "failed": 0}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def client(session: aiohttp.ClientSession, c: int) -> None:
        n = c
        while loop.time() < deadline:
            begin = time.perf_counter()
            try:
                async with session.post(url, json=bodies[n % len(bodies)]) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError):  # counted as failed, never retried
                status = -1
            if status == 200:
                latencies.append(time.perf_counter() - begin)
            else:
                counts["shed" if status in (429, 503) else "failed"] += 1
            n += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start_time = loop.time()
        await asyncio.gather(*(client(session, c) for c in range(clients)))
        elapsed = loop.time() - start_time
    ms = np.array(latencies) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "lists_per_s": len(ms) / elapsed, "answered": len(ms), **counts}


def measure(url: str, bodies: list[dict], clients: list[int], seconds: float) -> dict[int, dict]:
    """The load cells of one served method, after a warm-up."""
    asyncio.run(offer_load(url, bodies, 2, 2.0))
    return {c: asyncio.run(offer_load(url, bodies, c, seconds)) for c in clients}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="trained checkpoint (default %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 10], help="sampler steps S of the h2po rows")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100], help="offered loads")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load cell")
    parser.add_argument("--rivals", nargs="+", default=["EASE", "two-tower", "EASE + intent"], choices=RIVAL_NAMES)
    parser.add_argument("--out", type=output_file, default=None, help="write the results as JSON")
    parser.add_argument("overrides", nargs="*", help="serve.* (and eval.test_draws) overrides key=value")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    checkpoint = Path(args.checkpoint)
    cfg = config_from_checkpoint(checkpoint, None, args.overrides, rewards=False)
    serve_cfg = dataclasses.replace(cfg.serve, port=free_port(), rivals=args.rivals, max_queued=1000,
                                    watch_s=0.0)
    ws = pipeline.prepare(cfg)
    test = pipeline.examples(ws, "test")
    n_items = ws.data.catalog.n_items
    bodies = [request_to_json(ws.data.catalog, test[i].request)
              for i in np.random.default_rng(0).permutation(len(test))]
    threads = replica_threads(serve_cfg)
    torch.set_num_threads(threads)
    device = "cuda" if serve_cfg.replica_gpus else "cpu"  # where the replicas put the model (serve.replica_gpus)
    half = serve_cfg.bf16 and device == "cuda"
    dtype = torch.bfloat16 if half else torch.float32
    rate = matmul_rate(1024 if device == "cpu" else 8192, device=device, dtype=dtype)
    context = float(np.mean([len(e.request.seeds) + len(e.request.negatives) + len(e.request.constraints)
                             for e in test]))
    mc, k = cfg.model, cfg.requests.k
    where = f"{threads} threads" if device == "cpu" else f"the GPU, {'bf16' if half else 'fp32'}"
    print(f"{len(test)} test requests; matmul rate {rate / 1e9:.1f} GFLOP/s on {where}", flush=True)

    rows: list[dict] = []
    server = start(checkpoint, dataclasses.replace(serve_cfg, steps=args.steps[0]))
    try:
        for steps in args.steps:
            server.cfg = dataclasses.replace(serve_cfg, steps=steps)
            reload(server, checkpoint)
            scores = quality(load_policy(checkpoint, steps, ws.data.catalog, device, half), test, n_items)
            floor = flops_per_list(mc.d_model, mc.n_layers, n_items, k, steps, context) / rate * 1000
            rows.append({"method": f"h2po S={steps}", "ndcg": scores, "floor_ms": floor,
                         "load": measure(f"{server.url}retrieve", bodies, args.clients, args.seconds)})
            print(done(rows[-1]), flush=True)
        for name, url in server.rival_urls().items():
            scores = quality(load_rival(name, checkpoint, serve_cfg.ease_lambda), test, n_items)
            rows.append({"method": name, "ndcg": scores, "floor_ms": None,
                         "load": measure(f"{url}retrieve", bodies, args.clients, args.seconds)})
            print(done(rows[-1]), flush=True)
    finally:
        server.stop()
    print_table(rows, args.clients)
    write_result(args.out, {"machine": machine(), "checkpoint": str(checkpoint), "test_requests": len(test),
                            "serve": dataclasses.asdict(serve_cfg), "seconds": args.seconds,
                            "load_average": os.getloadavg(), "rows": rows})


def done(row: dict) -> str:
    """A row's figures on one line, printed as soon as it is measured: a run cut short still shows the rows it did."""
    cells = [f"C={c} p50/p95/p99 {cell['p50']:.0f}/{cell['p95']:.0f}/{cell['p99']:.0f} ms {cell['lists_per_s']:.0f} "
             f"lists/s shed {cell['shed'] + cell['failed']}" for c, cell in row["load"].items()]
    ndcg = " ".join(f"{family} {value:.3f}" for family, value in row["ndcg"].items())
    return f"{row['method']} done: NDCG@10 {ndcg} | " + "; ".join(cells)


def print_table(rows: list[dict], clients: list[int]) -> None:
    header = ["method", "NDCG@10 A", "NDCG@10 B", "floor ms"]
    for c in clients:
        header += [f"C={c} p50", "p95", "p99", "lists/s", "shed"]
    table = []
    for row in rows:
        cells = [row["method"], f"{row['ndcg']['A']:.3f}", f"{row['ndcg']['B']:.3f}",
                 "-" if row["floor_ms"] is None else f"{row['floor_ms']:.2f}"]
        for c in clients:
            cell = row["load"][c]
            cells += [f"{cell['p50']:.0f}", f"{cell['p95']:.0f}", f"{cell['p99']:.0f}", f"{cell['lists_per_s']:.0f}",
                      str(cell["shed"] + cell["failed"])]
        table.append(cells)
    print(format_rows(header, table))


if __name__ == "__main__":
    main()
