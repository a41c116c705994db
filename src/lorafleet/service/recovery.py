"""What a restarted service does with the records of the process before it.

The store (SQLite) says what existed; the checkpoint directories hold the only training state
that survives a process. So, on start-up:

* requests that were accepted but never finished are marked lost: polling them answers
  HTTP 410 with a message saying to send them again (the SDK treats 410 as retryable);
  finished requests keep their results;
* open sessions stay open (their heartbeat clock restarts);
* open training models keep their ids and their ``seq_id`` order (it continues after the last
  seq_id the journal saw), but their in-memory weights and moments are gone: each is marked
  ``lost`` with its last checkpoint, and every training call on it answers a 400 saying
  which checkpoint to ``load_state`` — nothing rewinds silently;
* samplers whose weights are on disk come back (loaded into a slot on first use);
* jobs are resumed by the `JobRunner` from their last checkpoint (service/jobs.py).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("lorafleet.service")


def recover(service) -> dict:
    store, sched = service.store, service.scheduler
    lost = store.fail_pending("the server restarted before this request finished, so it was not completed; "
                              "send it again")
    sessions = models = samplers = 0
    for s in store.sessions():
        if not s.finished:
            s.last_seen = time.time()
            sessions += 1
    for m in store.models():
        if m.closed:
            continue
        if m.lost is None:
            m.lost = store.last_checkpoint(m.model_id, "weights") or ""
            store.update(m)
        sched.open_model(m.model_id, first_seq=store.max_seq(m.model_id) + 1)
        models += 1
    for s in store.samplers():
        if s.source is not None and s.source[0] == "pending":
            s.source = ("lost",)
            store.update(s)
        elif s.source is not None and s.source[0] in ("peft", "state") and s.adapter_key:
            service._register_loader(s)
            samplers += 1
    out = {"lost_requests": lost, "sessions": sessions, "models": models, "samplers": samplers}
    if any(out.values()):
        log.warning("recovered from a previous run: %s", out)
    return out
