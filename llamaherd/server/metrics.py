"""Prometheus metrics in the text exposition format: counters, gauges read at scrape time, histograms."""

from __future__ import annotations

import bisect
import threading


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: le buckets, _sum, _count)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.total += value

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        running += self.counts[-1]
        lines += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {self.total}", f"{name}_count {running}"]
        return lines


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.requests_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.ttft = Histogram(_LATENCY)
        self.itl = Histogram(_LATENCY)
        self._lock = threading.Lock()

    def request_started(self, prompt_tokens: int) -> None:
        with self._lock:
            self.requests_total += 1
            self.prompt_tokens_total += prompt_tokens

    def request_finished(self, generated_tokens: int) -> None:
        with self._lock:
            self.generation_tokens_total += generated_tokens

    def render(self, engine) -> str:
        def metric(name: str, kind: str, help_text: str, value: float) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]

        lines = [
            *metric("herd_requests_running", "gauge", "Requests in the running batch.", engine.num_running),
            *metric("herd_requests_waiting", "gauge", "Requests waiting for a batch slot.", engine.num_waiting),
            *metric("herd_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.", round(engine.cache_usage(), 6)),
            *metric("herd_requests_total", "counter", "Generation requests received.", self.requests_total),
            *metric("herd_prompt_tokens_total", "counter", "Prompt tokens received.", self.prompt_tokens_total),
            *metric("herd_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens_total),
            *metric("herd_preemptions_total", "counter", "Sequences preempted for recomputation.", engine.stats["preemptions"]),
            *metric("herd_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
                    engine.stats["prefix_hit_tokens"]),
            *self.ttft.render("herd_time_to_first_token_seconds", "Time from request to first token."),
            *self.itl.render("herd_inter_token_latency_seconds", "Time between consecutive tokens of a stream."),
        ]
        return "\n".join(lines) + "\n"
