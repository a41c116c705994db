"""Prometheus metrics of `lorafleet serve` (GET /metrics), with the maintained client library
(``prometheus_client``, in the ``serve`` extra; without it /metrics answers 501).

Request counters and latencies are kept per process, by route template (never a raw path) and
status; the scheduler's queue, slots and liveness are read from the service when scraped."""

from __future__ import annotations

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:  # the serve extra not installed: the service runs, /metrics says why not
    CollectorRegistry = None
    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

if CollectorRegistry is not None:
    REGISTRY = CollectorRegistry()
    REQUESTS = Counter("lorafleet_http_requests", "HTTP requests by route template, method and status",
                       ["route", "method", "status"], registry=REGISTRY)
    LATENCY = Histogram("lorafleet_http_request_seconds", "HTTP request latency by route template", ["route"],
                        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                        registry=REGISTRY)
    TENANT_REQUESTS = Counter("lorafleet_tenant_requests", "HTTP requests by tenant and status class",
                              ["tenant", "status_class"], registry=REGISTRY)


def observe_request(route: str, method: str, status: int, seconds: float, tenant: str) -> None:
    if CollectorRegistry is None:
        return
    REQUESTS.labels(route, method, str(status)).inc()
    LATENCY.labels(route).observe(seconds)
    if tenant != "-":
        TENANT_REQUESTS.labels(tenant, f"{status // 100}xx").inc()


class _ServiceCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        svc = self.service
        sch, fleet = svc.scheduler, svc.fleet
        live = sch.liveness()

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            return g

        yield gauge("lorafleet_scheduler_queue_depth", "operations waiting for the scheduler", live["queued"])
        yield gauge("lorafleet_scheduler_decoding", "sample requests in running decodes (also in the queue depth)",
                    live["decoding"])
        yield gauge("lorafleet_samples_waiting_for_slot", "samples waiting for a free adapter slot",
                    len(sch._slot_wait))
        yield gauge("lorafleet_pending_futures", "accepted requests not finished yet", svc.futures.pending_count())
        yield gauge("lorafleet_adapter_slots", "adapter slots (--max-adapters)", fleet.max_adapters)
        yield gauge("lorafleet_adapter_slots_used", "adapter slots holding weights", len(fleet.adapters))
        yield gauge("lorafleet_scheduler_heartbeat_age_seconds", "seconds since the scheduler showed life",
                    live["heartbeat_age_s"])
        yield gauge("lorafleet_scheduler_up", "1 while the scheduler thread runs", int(live["alive"]))
        yield gauge("lorafleet_jobs_running", "jobs holding a slot", len(getattr(svc.jobs, "running", {}) or {}))
        for k, v in sch.stats.items():
            if k.startswith("max_"):
                yield gauge(f"lorafleet_scheduler_{k}", f"scheduler: {k.replace('_', ' ')}", v)
            else:
                c = CounterMetricFamily(f"lorafleet_scheduler_{k}", f"scheduler: {k.replace('_', ' ')}")
                c.add_metric([], float(v))
                yield c


def render(service) -> bytes | None:
    """The exposition text, or None without prometheus_client."""
    if CollectorRegistry is None:
        return None
    per_service = CollectorRegistry()
    per_service.register(_ServiceCollector(service))
    return generate_latest(REGISTRY) + generate_latest(per_service)
