"""Prometheus metrics on a registry of the app's own (several apps in one process never clash).

Engine counts are read from `AsyncLLM.stats()` at scrape time by a collector (a counter cannot be
set, and copying totals on every step would cost the engine thread); what only the server sees —
time to first token, finished requests, end-to-end latency — is observed per request.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from minicpm4.engine import AsyncLLM, RequestOutput

PREFIX = "minicpm4"
# Seconds. CPU decoding of a small model answers in milliseconds, an 8B prefill of a long prompt in minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector:
    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    def collect(self):
        s = self.llm.stats()
        gauges = (("requests_running", "requests the scheduler is running", s.running),
                  ("requests_waiting", "requests queued for admission", s.waiting),
                  ("kv_blocks_used", "KV cache pages held by requests", s.kv_blocks_used),
                  ("kv_blocks_total", "KV cache pages in the pool", s.kv_blocks_total),
                  # tokens the last engine step produced per second of that step; 0 when idle
                  ("generation_tokens_per_second", "decode throughput of the last engine step",
                   self.llm.last_step_tokens_per_s if s.running else 0.0))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = (("prompt_tokens", "prompt tokens computed (prefix-cache hits excluded)", s.prompt_tokens_total),
                    ("generation_tokens", "tokens generated", s.generated_tokens_total),
                    ("prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                     s.prefix_cache_hit_tokens_total),
                    ("preemptions", "requests preempted for lack of KV pages", s.preemptions_total),
                    ("engine_steps", "engine steps run", s.steps_total),
                    # speculative decoding: mean accepted length = spec_emitted_tokens / spec_verifications
                    ("spec_verifications", "draft trees verified (one per request and step)", s.spec_verify_total),
                    ("spec_emitted_tokens", "tokens emitted by verifications (accepted + bonus)", s.spec_tokens_total),
                    ("spec_draft_tokens", "draft nodes verified", s.spec_draft_nodes_total))
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, llm: AsyncLLM) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm))
        self.time_to_first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                                             "arrival in the engine to first generated token", buckets=TTFT_BUCKETS,
                                             registry=self.registry)
        self.request_latency = Histogram(f"{PREFIX}_request_latency_seconds", "arrival to finish, per engine request",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests_finished = Counter(f"{PREFIX}_requests_finished", "engine requests finished",
                                         ["finish_reason"], registry=self.registry)
        self.http_errors = Counter(f"{PREFIX}_http_errors", "API calls answered with an error", ["status"],
                                   registry=self.registry)

    def observe_finished(self, out: RequestOutput) -> None:
        self.requests_finished.labels(out.finish_reason or "unknown").inc()
        m = out.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.time_to_first_token.observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.finished_time is not None:
            self.request_latency.observe(max(0.0, m.finished_time - m.arrival_time))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
