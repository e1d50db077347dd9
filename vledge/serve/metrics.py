"""The server's Prometheus metrics, in a registry of its own (two servers in one process never share counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("queue", "preprocess", "vision", "prefill", "decode")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    """Counters, gauges and histograms named ``vledge_serve_*``; :meth:`render` gives the text exposition."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("vledge_serve_requests", "Chat completion requests answered, by HTTP status.",
                                ["status"], registry=registry)
        self.errors = Counter("vledge_serve_errors", "Requests refused or failed, by error code.", ["code"],
                              registry=registry)
        self.cancelled = Counter("vledge_serve_cancelled", "Requests given up because the client disconnected "
                                 "or the deadline passed, by reason.", ["reason"], registry=registry)
        self.completion_tokens = Counter("vledge_serve_completion_tokens", "Tokens generated for answers.",
                                         registry=registry)
        self.queue_depth = Gauge("vledge_serve_queue_depth", "Requests waiting for a batch.", registry=registry)
        self.ready = Gauge("vledge_serve_ready", "1 once the model is loaded and warmed up.", registry=registry)
        self.batch_size = Histogram("vledge_serve_batch_size", "Rows per batched generation.",
                                    buckets=_BATCH_BUCKETS, registry=registry)
        self.stage_seconds = Histogram("vledge_serve_stage_seconds", "Seconds each request spent per stage "
                                       "(batch stages are shared by the batch's rows).", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=registry)
        self.request_seconds = Histogram("vledge_serve_request_seconds", "Seconds from a chat request's arrival "
                                         "to its last byte of answer.", buckets=_LATENCY_BUCKETS, registry=registry)
        for stage in STAGES:  # every stage shows up from the first scrape on
            self.stage_seconds.labels(stage=stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
