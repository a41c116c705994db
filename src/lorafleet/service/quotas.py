"""Per-tenant quotas: what one tenant may hold at once, so it cannot take the server from others.

| quota (serve flag) | counts | default |
|---|---|---|
| ``--max-slots-per-tenant`` | adapter slots the tenant holds: open training clients + running jobs | 0 (none) |
| ``--max-sessions-per-tenant`` | open (unfinished) sessions | 256 |
| ``--max-jobs-per-tenant`` | queued + running jobs | 64 |
| ``--max-queued-per-tenant`` | accepted requests not finished yet (training, sampling, control) | 1024 |

A request over a quota answers **429** with a ``Retry-After`` header and a JSON body naming the
quota, its limit and the flag; nothing is created and, for a training call, its ``seq_id`` is not
consumed (the SDK retries the same request on 429). A queued job whose tenant is at its slot
quota stays queued and lets other tenants' jobs start first. Sampler weights are not counted:
they are evicted least-recently-used whenever a slot is needed, so they never keep a slot from
anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

RETRY_AFTER_S = {"slots": 30, "sessions": 60, "jobs": 60, "queued_requests": 1}
FLAGS = {"slots": "--max-slots-per-tenant", "sessions": "--max-sessions-per-tenant",
         "jobs": "--max-jobs-per-tenant", "queued_requests": "--max-queued-per-tenant"}


class QuotaExceeded(Exception):
    """HTTP 429: ``quota`` is one of `FLAGS`."""

    def __init__(self, tenant: str, quota: str, limit: int, what: str):
        self.quota, self.limit, self.retry_after = quota, limit, RETRY_AFTER_S[quota]
        super().__init__(f"tenant {tenant!r} is at its {quota} quota: {what} (limit {limit}, the server's "
                         f"{FLAGS[quota]}); retry after {self.retry_after} s")

    def body(self) -> dict:
        return {"error": str(self), "detail": str(self), "quota": self.quota, "limit": self.limit,
                "retry_after_s": self.retry_after}


@dataclass
class Quotas:
    """Counts read from the service's store, futures and job runner (cheap: one pass each)."""

    service: object

    @property
    def _cfg(self):
        return self.service.config

    def slots_held(self, tenant: str) -> int:
        svc = self.service
        models = sum(1 for m in svc.store.models() if m.tenant == tenant and not m.closed)
        jobs = sum(1 for j in svc.store.jobs(tenant) if j.status == "running")
        return models + jobs

    def slot_limit(self) -> int:
        n = self._cfg.max_slots_per_tenant
        return n if n > 0 else self._cfg.max_adapters

    def check_slot(self, tenant: str) -> None:
        """Before a new training client (create_model, create_training_client_from_state)."""
        if self._cfg.max_slots_per_tenant <= 0:  # no per-tenant quota: the pool-full error says it
            return
        held, limit = self.slots_held(tenant), self.slot_limit()
        if held >= limit:
            raise QuotaExceeded(tenant, "slots", limit, f"it holds {held} adapter slot(s) (training clients and "
                                "running jobs); close a training client's session or cancel a job")

    def may_start_job(self, tenant: str) -> bool:
        return self._cfg.max_slots_per_tenant <= 0 or self.slots_held(tenant) < self.slot_limit()

    def check_session(self, tenant: str) -> None:
        limit = self._cfg.max_sessions_per_tenant
        if limit <= 0:
            return
        open_ = sum(1 for s in self.service.store.sessions() if s.tenant == tenant and not s.finished)
        if open_ >= limit:
            raise QuotaExceeded(tenant, "sessions", limit, f"{open_} open session(s); close some "
                                "(ServiceClient.close, or they end after --session-timeout-s without heartbeats)")

    def check_job(self, tenant: str) -> None:
        limit = self._cfg.max_jobs_per_tenant
        if limit <= 0:
            return
        live = sum(1 for j in self.service.store.jobs(tenant) if j.status in ("queued", "running"))
        if live >= limit:
            raise QuotaExceeded(tenant, "jobs", limit, f"{live} queued or running job(s)")

    def check_queue(self, tenant: str) -> None:
        """Before accepting a request that will be queued for the scheduler."""
        limit = self._cfg.max_queued_per_tenant
        if limit <= 0:
            return
        n = self.service.futures.pending_of(tenant)
        if n >= limit:
            raise QuotaExceeded(tenant, "queued_requests", limit, f"{n} accepted request(s) not finished yet")
