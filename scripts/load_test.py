"""Load test for `semiar serve`: N concurrent greedy streams on 127.0.0.1 for a bounded time.

Starts `semiar serve` in a subprocess, takes each prompt's solo answer first, then keeps
--streams clients streaming chat completions for --seconds; every answer must equal its solo
answer (nothing lost, nothing mixed). Reports completed / failed / mismatched, p50 and p99
latency and time to first token, as one JSON line.

    python scripts/load_test.py --model smollm2-135m-instruct --streams 50 --seconds 60 --max-tokens 16
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time

import httpx

PROMPTS = ["Say hello.", "Name a color.", "What is 2+2?", "Write one word.", "Name a fruit.",
           "Give a number.", "Say yes or no.", "Name an animal."]


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


async def one(http, url, model, prompt, max_tokens):
    t0 = time.perf_counter()
    ttft, parts = None, []
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            text = ev["choices"][0]["delta"].get("content") if ev["choices"] else None
            if text:
                ttft = ttft or time.perf_counter() - t0
                parts.append(text)
    return "".join(parts), time.perf_counter() - t0, ttft


async def main(a):
    url = f"http://127.0.0.1:{a.port}"
    srv = subprocess.Popen([sys.executable, "-m", "semiar.cli", "serve", "--model", a.model, "--method", a.method,
                            "--port", str(a.port), "--max-queue", str(a.streams * 2)])
    try:
        async with httpx.AsyncClient(timeout=a.seconds + 120) as http:
            for _ in range(600):
                try:
                    if (await http.get(url + "/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.5)
            else:
                raise SystemExit("the server did not start")
            solo = {p: (await one(http, url, a.model, p, a.max_tokens))[0] for p in PROMPTS}
            stats = {"completed": 0, "failed": 0, "mismatched": 0}
            lat, ttfts = [], []
            end = time.monotonic() + a.seconds

            async def client(i):
                k = i
                while time.monotonic() < end:
                    p = PROMPTS[k % len(PROMPTS)]
                    k += 1
                    try:
                        text, dt, ttft = await one(http, url, a.model, p, a.max_tokens)
                    except Exception:  # noqa: BLE001 - counted, not fatal
                        stats["failed"] += 1
                        continue
                    stats["completed"] += 1
                    stats["mismatched"] += text != solo[p]
                    lat.append(dt)
                    ttfts.append(ttft or dt)

            t0 = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(a.streams)))
            wall = time.perf_counter() - t0
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    print(json.dumps({"model": a.model, "method": a.method, "streams": a.streams, "seconds": round(wall, 1),
                      **stats, "requests_per_s": round(stats["completed"] / wall, 3),
                      "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
                      "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99)}))
    return 0 if stats["failed"] == stats["mismatched"] == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--method", default="pld")
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60, help="no new request starts after this; running ones finish")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=8765)
    sys.exit(asyncio.run(main(ap.parse_args())))
