#!/usr/bin/env python3
"""Load generator for `kvplan serve` (python3 standard library only, so it runs on the device as is).

K client threads send streaming completions back to back until N requests are done, and print one line: requests/s,
output tokens/s (from the server's /metrics), and p50/p99 of request latency and of time to first token (the first
event carrying text), with the count of failed requests.
"""
import argparse
import http.client
import json
import math
import threading
import time
import urllib.parse
import urllib.request

PROMPTS = [
    "git-show(1)", "git-log(1) shows the commit logs.", "NAME\n    git-diff - Show changes between commits",
    "git-rebase(1)", "SYNOPSIS\n    git commit [-a | --interactive | --patch]", "git-branch(1)",
    "DESCRIPTION\n    Incorporates changes from the named commits", "git-status(1)",
]


def metric(url, name):
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)  # nearest rank
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def one_request(host, port, index, max_tokens):
    body = json.dumps({"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "stream": True,
                       "temperature": 0.7, "seed": index})
    start = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=300)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    done = False
    for raw in response:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: ") and first is None and json.loads(line[6:])["choices"][0].get("text"):
            first = time.perf_counter() - start
    connection.close()
    ok = response.status == 200 and done
    return ok, time.perf_counter() - start, first


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    parsed = urllib.parse.urlparse(args.url)
    tokens_before = metric(args.url, "kvplan_completion_tokens_total")

    lock = threading.Lock()
    next_index = [0]
    latencies, first_tokens, failures = [], [], [0]

    def worker():
        while True:
            with lock:
                index = next_index[0]
                if index >= args.requests:
                    return
                next_index[0] += 1
            try:
                ok, latency, first = one_request(parsed.hostname, parsed.port, index, args.max_tokens)
            except OSError:
                ok, latency, first = False, 0.0, None
            with lock:
                if not ok:
                    failures[0] += 1
                    continue
                latencies.append(latency)
                if first is not None:
                    first_tokens.append(first)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    tokens = metric(args.url, "kvplan_completion_tokens_total") - tokens_before
    print(f"{args.label:<16} clients {args.clients:3d}  requests {len(latencies):4d} ok {failures[0]:3d} failed  "
          f"{len(latencies) / elapsed:8.2f} req/s  {tokens / elapsed:9.1f} tok/s  "
          f"latency p50 {percentile(latencies, 0.5) * 1e3:8.1f} ms p99 {percentile(latencies, 0.99) * 1e3:8.1f} ms  "
          f"TTFT p50 {percentile(first_tokens, 0.5) * 1e3:7.1f} ms p99 {percentile(first_tokens, 0.99) * 1e3:7.1f} ms",
          flush=True)


if __name__ == "__main__":
    main()
