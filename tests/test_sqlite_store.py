"""SQLiteStore and the request journal: what one process writes, the next one reads."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.service.futures import Failure, FutureStore, Lost, Result
from lorafleet.service.sqlite_store import SQLiteStore
from lorafleet.service.store import Job, Model, NotFound, Sampler, Session


def test_records_survive_reopen(tmp_path):
    db = tmp_path / "lorafleet.db"
    st = SQLiteStore(db)
    st.add_session(Session("s1", "alice"))
    m = Model("s1:train:0", "alice", "s1", "alice/s1:train:0", "debug:x", 4, {"rank": 4})
    st.add_model(m)
    st.add_sampler(Sampler("s1:sample:0", "alice", "s1", "debug:x", source=("peft", "/d"), adapter_key="k"))
    st.add_checkpoint("alice", "tinker://s1:train:0/weights/a", "s1:train:0", "weights", "/ck/a")
    st.add_checkpoint("alice", "tinker://s1:train:0/weights/b", "s1:train:0", "weights", "/ck/b")
    j = Job("job-1", "alice", "rev", {"adapter": {"name": "rev"}}, total_steps=5)
    st.add_job(j)
    for step in (1, 2, 3):
        st.add_metric("job-1", {"step": step, "loss": 1.0 / step})
    m.closed, j.status, j.step = True, "running", 3
    st.update(m)
    st.update(j)
    st.truncate_metrics("job-1", 2)
    st.close()

    st2 = SQLiteStore(db)
    assert st2.get_session("s1", "alice").tenant == "alice"
    with pytest.raises(NotFound):
        st2.get_session("s1", "bob")  # another tenant's id does not exist for it
    with pytest.raises(NotFound, match="closed"):
        st2.get_model("s1:train:0", "alice")
    assert st2.get_sampler("s1:sample:0", "alice").source == ("peft", "/d")
    assert st2.last_checkpoint("s1:train:0") == "tinker://s1:train:0/weights/b"
    j2 = st2.get_job("job-1", "alice")
    assert (j2.status, j2.step, j2.total_steps) == ("running", 3, 5)
    assert [r["step"] for r in st2.metrics("job-1")] == [1, 2]
    st2.close()


def test_journal_keeps_results_and_marks_unfinished_lost(tmp_path):
    st = SQLiteStore(tmp_path / "lorafleet.db")
    fut = FutureStore(journal=st)
    done = fut.create("alice", "optim_step", "m", 3)
    proto = fut.create("alice", "forward_backward", "m", 4)
    failed = fut.create("alice", "save_weights", "m", 5)
    pending = fut.create("alice", "sample")
    internal = fut.create("alice", "job", durable=False)
    fut.complete(done, Result(json={"metrics": {"loss:sum": 1.5}}))
    fut.complete(proto, Result(body=b"\x01\x02", content_type="application/x-protobuf"))
    fut.complete(failed, Failure("disk full", "server"))
    st.close()

    st2 = SQLiteStore(tmp_path / "lorafleet.db")
    assert st2.fail_pending("server restarted; send it again") == 1
    assert st2.max_seq("m") == 5
    fut2 = FutureStore(journal=st2)

    async def get(rid):
        return await fut2.wait(rid, 0.1)

    assert asyncio.run(get(done)).json == {"metrics": {"loss:sum": 1.5}}
    out = asyncio.run(get(proto))
    assert out.body == b"\x01\x02" and out.content_type == "application/x-protobuf"
    assert asyncio.run(get(failed)) == Failure("disk full", "server")
    with pytest.raises(Lost, match="send it again"):
        asyncio.run(get(pending))
    with pytest.raises(KeyError):
        asyncio.run(get(internal))  # internal work is not journaled
    assert fut2.owner(done) == "alice" and fut2.owner("nope") is None
    st2.close()


def test_corrupt_database_is_a_clear_error(tmp_path):
    db = tmp_path / "lorafleet.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a readable lorafleet database"):
        SQLiteStore(db)
    assert db.read_bytes().startswith(b"this is not sqlite")  # left as it was
