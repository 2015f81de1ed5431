"""``shmig run --trace``: one Chrome/Perfetto trace with every process's events.

Pinned here: the document follows the Trace Event format as Chrome and Perfetto read it (every
event has ph/ts/pid/tid; slices nest per thread; every flow has one start and one end, in time
order, each step inside a slice of its thread); every shmig process has its track; one fault can
be followed by flow arrows from the vCPU through the fault thread, the source's return thread and
the frame that carried the page to its placement and the vCPU's wake-up; and the trace agrees with
the report it came with (requests, faults, preemptions, bytes per channel).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest

from shmig import cli, uffd
from shmig.config import Config
from shmig.controller import Migration
from shmig.events import Arena, K, Recorder



def _ns(x: float) -> int:
    return round(x * 1000)


def check_schema(doc: dict[str, Any]) -> dict[tuple[int, int], list[tuple[int, int, str]]]:
    """Assert the Trace Event format rules; return each thread's slices as (start ns, end ns, name)."""
    events = doc["traceEvents"]
    assert events
    slices: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    open_b: dict[tuple[int, int], list[int]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["ts"]):
        for key in ("ph", "ts", "pid", "tid"):
            assert key in e, f"{key} missing in {e}"
        assert isinstance(e["ts"], (int, float)) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
            slices[(e["pid"], e["tid"])].append((_ns(e["ts"]), _ns(e["ts"]) + _ns(e["dur"]), e["name"]))
        elif e["ph"] == "B":
            open_b[(e["pid"], e["tid"])].append(_ns(e["ts"]))
        elif e["ph"] == "E":
            assert open_b[(e["pid"], e["tid"])], f"E without B: {e}"
            open_b[(e["pid"], e["tid"])].pop()
        else:
            assert e["ph"] in "iCMstf", e
    assert not any(open_b.values()), "B without E"
    for track, sl in slices.items():  # perfect nesting on every thread
        sl.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple[int, int, str]] = []
        for s in sl:
            while stack and stack[-1][1] <= s[0]:
                stack.pop()
            assert not stack or s[1] <= stack[-1][1], f"{s} overlaps {stack[-1]} on {track}"
            stack.append(s)
    return slices


def flows(doc: dict[str, Any], slices: dict) -> dict[int, list[dict[str, Any]]]:
    """Assert every flow is one s, steps, one f, in time order, each inside a slice of its
    thread; return the flows by id, each as its events with the slice ("slice") they bind to."""
    by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] in "stf":
            by_id[e["id"]].append(e)
    for fid, evs in by_id.items():
        phs = "".join(e["ph"] for e in evs)
        assert phs[0] == "s" and phs[-1] == "f" and set(phs[1:-1]) <= {"t"}, f"flow {fid}: {phs}"
        assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs), f"flow {fid} goes back in time"
        assert len({(e["cat"], e["name"]) for e in evs}) == 1
        for e in evs:
            ts = _ns(e["ts"])
            inside = [s for s in slices[(e["pid"], e["tid"])] if s[0] <= ts <= s[1]]
            assert inside, f"flow {fid}: {e} is in no slice of its thread"
            e["slice"] = min(inside, key=lambda s: s[1] - s[0])[2]  # the innermost
    return by_id


def check_frames(doc: dict[str, Any]) -> None:
    """Every placed frame is matched to the source's send of it: same channel, bytes and pages."""
    procs, _ = tracks(doc)
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    sent = {(e["name"].split()[1], e["args"]["frame"]): e["args"] for e in xs if e["name"].startswith("send ")
            and "frame" in e.get("args", {})}
    placed = [e for e in xs if e["name"].startswith("place")]
    assert placed
    for e in placed:
        ch = "precopy" if procs[e["pid"]] == "mig/dst/listen" else "postcopy"
        s = sent[(ch, e["args"]["frame"])]
        assert (s["bytes"], s["pages"], s["first_page"]) == (e["args"]["bytes"], e["args"]["pages"],
                                                            e["args"]["first_page"]), (s, e)


def tracks(doc: dict[str, Any]) -> tuple[dict[int, str], dict[tuple[int, int], str]]:
    procs, threads = {}, {}
    for e in doc["traceEvents"]:
        if e["ph"] == "M" and e["name"] == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e["ph"] == "M" and e["name"] == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return procs, threads


@pytest.mark.timeout(90)
def test_run_trace_follows_a_fault_across_every_process(capsys, tmp_path):
    path = tmp_path / "t.json"
    code = cli.main(["run", "--ram", "32MiB", "--mode", "preempt", "--bandwidth", "100MiB/s",
                     "--trace", str(path), "--json", str(tmp_path / "r.json"), "-q"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(path.read_text())
    rep = json.loads((tmp_path / "r.json").read_text())
    slices = check_schema(doc)
    check_frames(doc)
    procs, threads = tracks(doc)
    pid = {name: p for p, name in procs.items()}
    for title in ("mig/src", "mig/dst/listen", "mig/dst/preempt", "guest/vcpu0"):
        assert any(e["pid"] == pid[title] and e["ph"] in "Xi" for e in doc["traceEvents"]), f"nothing from {title}"
    names = {(procs[p], n) for (p, _), n in threads.items() if p in procs}
    assert {("mig/src", "migration"), ("mig/src", "return"), ("mig/dst/listen", "listen"),
            ("mig/dst/listen", "fault"), ("mig/dst/preempt", "preempt"), ("guest/vcpu0", "vcpu0")} <= names

    # one fault, followed from the vCPU to the page's placement and the vCPU's wake-up
    def where(e: dict[str, Any]) -> tuple[str, str, str]:
        return procs[e["pid"]], threads[(e["pid"], e["tid"])], e["slice"]

    chains = [[where(e) for e in evs] for evs in flows(doc, slices).values()]
    assert len(chains) == rep["postcopy_latency_us"]["count"]  # one flow per resolved fault
    whole = [c for c in chains if c[0][:2] == ("guest/vcpu0", "vcpu0") and c[0][2].startswith("fault hp")
             and ("mig/dst/listen", "fault") == c[1][:2] and c[1][2].startswith("FAULT hp")
             and any(w[:2] == ("mig/src", "return") and w[2].startswith("REQ_PAGES") for w in c)
             and any(w[0] == "mig/src" and w[2].startswith("send") for w in c)
             and any(w[0].startswith("mig/dst") and w[2].startswith("place") for w in c)
             and c[-1] == ("guest/vcpu0", "vcpu0", "woken: page present")]
    assert whole, f"no fault followed end to end; chains: {chains[:5]}"

    # the trace agrees with the report
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    count = lambda prefix: sum(e["name"].startswith(prefix) for e in xs)  # noqa: E731
    assert count("REQ_PAGES") == rep["postcopy_requests"]
    assert count("fault hp") == rep["postcopy_latency_us"]["count"]
    assert count("hp ") == rep["preemptions"]  # "hp N preempted"
    for ch in ("precopy", "postcopy"):
        sent = sum(e["args"]["bytes"] for e in xs if e["name"].startswith(f"send {ch}"))
        placed = sum(e["args"]["bytes"] for e in xs if e["name"].startswith("place")
                     and procs[e["pid"]] == ("mig/dst/listen" if ch == "precopy" else "mig/dst/preempt"))
        assert 0 < sent == placed == rep["ram"]["channel_bytes"][ch]
    assert [e["name"] for e in xs if e["pid"] == pid["shmig controller (preempt)"] and e["cat"] == "phase"] \
        == [p[0] for p in rep["phases"]]
    counters = {e["name"] for e in doc["traceEvents"] if e["ph"] == "C"}
    assert {"socket queue precopy (bytes)", "socket queue postcopy (bytes)", "pages left to send",
            "faults outstanding", "guest accesses"} <= counters


@pytest.mark.timeout(90)
@pytest.mark.skipif(bool(uffd.refused()), reason=uffd.refused())
def test_a_uffd_runs_faults_are_followed_from_the_vcpus_track(capsys, tmp_path):
    """With --fault-backend uffd the vCPU records nothing while the kernel holds it: its faults are
    the fault thread's rows (the event's read to the placement), drawn on its track, and each is
    followed through the request to the frame that brought its page, as with the bitmap backend."""
    path = tmp_path / "t.json"
    code = cli.main(["run", "--ram", "32MiB", "--mode", "preempt", "--bandwidth", "100MiB/s", "--fault-backend",
                     "uffd", "--trace", str(path), "--json", str(tmp_path / "r.json"), "-q"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(path.read_text())
    rep = json.loads((tmp_path / "r.json").read_text())
    slices = check_schema(doc)
    procs, _ = tracks(doc)
    pid = {name: p for p, name in procs.items()}
    faults = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].startswith("fault hp")]
    assert len(faults) == rep["postcopy_latency_us"]["count"] > 0
    assert {e["pid"] for e in faults} == {pid["guest/vcpu0"]}
    chains = [[(procs[e["pid"]], e["slice"]) for e in evs] for evs in flows(doc, slices).values()]
    assert len(chains) == len(faults)
    assert any(c[0][0] == "guest/vcpu0" and c[1][1].startswith("FAULT hp") and any(w[1].startswith("REQ_PAGES") for w in c)
               and any(w[0].startswith("mig/dst") and w[1].startswith("place") for w in c) for c in chains), chains[:5]


@pytest.mark.timeout(60)
def test_trace_of_a_recovered_migration(tmp_path):
    """A broken channel: the source's pause is a slice until its recovery, and the frames lost with
    the channel do not confuse which frame carried a page (frames are named by their send time)."""
    path = tmp_path / "t.json"
    cfg = Config.from_strings(ram="16MiB", mode="preempt", bandwidth="100MiB/s",
                              inject_faults=["postcopy-channel@50%"])
    rep = Migration(cfg, trace=str(path)).start().wait()
    assert rep.ok and rep.recoveries == 1, rep.error
    doc = json.loads(path.read_text())
    slices = check_schema(doc)
    check_frames(doc)
    assert len(flows(doc, slices)) == rep.postcopy_latency_us["count"]
    procs, threads = tracks(doc)
    paused = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"] == "postcopy paused"]
    assert len(paused) == rep.postcopy_pauses
    assert {(procs[e["pid"]], threads[(e["pid"], e["tid"])]) for e in paused} == {("mig/src", "migration")}
    assert paused[0]["args"]["reason"] == "injected fault postcopy-channel@50%"


@pytest.mark.timeout(60)
def test_trace_of_a_failed_run(tmp_path):
    """A run that fails (here at its deadline, in precopy) still has the trace of what every process
    did until it was stopped: the events are in memory the controller reads after the children die."""
    path = tmp_path / "t.json"
    cfg = Config.from_strings(ram="32MiB", mode="preempt", bandwidth="20MiB/s", deadline="300ms")
    rep = Migration(cfg, trace=str(path)).start().wait()
    assert not rep.ok and "deadline" in (rep.error or "")
    doc = json.loads(path.read_text())
    check_schema(doc)
    procs, _ = tracks(doc)
    names = {(procs[e["pid"]], e["name"]) for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] in procs}
    assert ("mig/src", "send precopy") in names and ("mig/dst/listen", "place") in names
    assert doc["otherData"]["error"] == rep.error


def test_recorder_slots_per_thread():
    """Each thread writes its own slot of the shared arena (no lock); a full slot drops and counts;
    the controller reads slots, thread names and interned strings back."""
    import threading

    arena = Arena(3, slot_rows=1000)
    try:
        tr = Recorder("mig/src", arena, 2)
        tr.put(K.SEND, 1, 2, 3, 4, 5, 6, 7, 8, 9)
        assert tr.intern("postcopy_paused") == 0 and tr.intern("") == 1 and tr.intern("postcopy_paused") == 0
        t = threading.Thread(target=lambda: [tr.put(K.REQUEST, i, i + 1, i) for i in range(1500)], name="return")
        t.start()
        t.join()
        got = arena.collect()
        assert list(got) == [2]
        assert got[2]["names"] == ["postcopy_paused", " "]
        threads = {name: (r, dropped) for _, name, r, dropped in got[2]["threads"]}
        assert threads["migration"][0].tolist() == [(1, 2, K.SEND, 3, 4, 5, 6, 7, 8, 9, 0, 0)]
        ret, dropped = threads["return"]
        assert len(ret) == 1000 and dropped == 500 and (ret["a"] == range(1000)).all()
    finally:
        arena.close()


def test_tracing_is_off_unless_asked():
    m = Migration(Config(ram=4 << 20))
    assert m.trace is None and m.arena is None
    from shmig.process import Child, Shared

    assert Child.tr is None and Shared.arena is None
