"""shmig serve driven as QEMU is: the qemu.qmp library against the two monitors (issue 19)."""

from __future__ import annotations

import json
import os
import random
import socket
import time

import numpy as np
import pytest

qmp_legacy = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is in the dev extra")

from shmig import uffd
from shmig.vm import Pair, settings_to_config

BASE = {"ram": 8 * 1024**2, "vcpus": 1, "workload": "random", "deadline": 60.0}


def client(path: str) -> "qmp_legacy.QEMUMonitorProtocol":
    c = qmp_legacy.QEMUMonitorProtocol(path)
    c.connect(negotiate=True)
    return c


def wait_event(c, status: str, timeout: float = 30.0) -> list[str]:
    """MIGRATION statuses seen until ``status`` (fails naming what it saw)."""
    seen: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ev = c.pull_event(wait=max(0.01, end - time.monotonic()))
        if ev is None:
            continue
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        if ev["event"] == "MIGRATION":
            seen.append(ev["data"]["status"])
            if ev["data"]["status"] in (status, "failed"):
                break
    assert seen and seen[-1] == status, f"waited for MIGRATION {status}, saw {seen}"
    return seen


def hostile(path: str, n: int) -> None:
    """n lines of garbage, commands in the wrong state, and a truncated one; then gone."""
    rng = random.Random(n)
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    lines = [b'{"execute": "qmp_capabilities"}', b'{"execute": "migrate-recover", "arguments": {"uri": "tcp:1:1"}}',
             b'{"execute": "migrate-incoming", "arguments": {"uri": "tcp:1:1"}}', b'{"execute": "cont"}',
             b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": 1}}']
    for _ in range(n):
        s.sendall(rng.choice(lines + [bytes(rng.randrange(33, 127) for _ in range(20)).translate(None, b'{}[]"')])
                  + b"\n")
    s.sendall(b'{"execute": "query-mig')
    s.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(BASE, f"unix:{tmp_path}/src.sock", f"unix:{tmp_path}/dst.sock")
    yield p, str(tmp_path)
    p.close()
    assert not os.path.exists(f"{tmp_path}/src.sock")


def setup_both(src, dst, postcopy_bandwidth: int = 0) -> None:
    caps = [{"capability": c, "state": True} for c in ("events", "postcopy-ram", "postcopy-preempt",
                                                        "postcopy-blocktime", "return-path")]
    for c in (src, dst):
        assert c.cmd("migrate-set-capabilities", capabilities=caps) == {}
    assert src.cmd("migrate-set-parameters", **{"max-bandwidth": 32 << 20, "max-postcopy-bandwidth": postcopy_bandwidth,
                                                    "downtime-limit": 1}) == {}
    assert dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:4444") == {}
    assert src.cmd("migrate", uri="tcp:127.0.0.1:4444") == {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # as QEMU's tests wait for a second pass before postcopy
        ram = src.cmd("query-migrate").get("ram", {})
        if ram.get("dirty-sync-count", 0) >= 2:
            break
        time.sleep(0.05)
    else:
        pytest.fail("dirty-sync-count never reached 2")
    assert src.cmd("migrate-start-postcopy") == {}


def compare_ram(src, dst, tmp: str) -> None:
    for c, name in ((src, "src"), (dst, "dst")):
        assert c.cmd("pmemsave", val=0, size=BASE["ram"], filename=f"{tmp}/{name}.ram") == {}
    a = np.fromfile(f"{tmp}/src.ram", np.uint8).reshape(-1, 4096)
    b = np.fromfile(f"{tmp}/dst.ram", np.uint8).reshape(-1, 4096)
    assert a.size == BASE["ram"] and b.size == BASE["ram"]
    # the guest runs on after the switch and stamps its own words (8 bytes a vCPU at the head of a
    # page, pattern.py) on the destination only: everything else of every page came over intact
    head = 8 * 64
    assert np.array_equal(a[:, head:], b[:, head:])


@pytest.mark.timeout(90)
def test_postcopy_preempt_migration(pair):
    p, tmp = pair
    src, dst = client(f"{tmp}/src.sock"), client(f"{tmp}/dst.sock")
    setup_both(src, dst)
    hostile(f"{tmp}/dst.sock", 200)  # while the migration runs: it goes on and completes intact
    # QEMU 10.2's order on each side (status.path): the source's device and postcopy-device, the
    # destination's postcopy-device while it loads the package
    assert wait_event(src, "completed") == ["setup", "active", "device", "postcopy-device", "postcopy-active",
                                            "completed"]
    assert wait_event(dst, "completed") == ["setup", "active", "postcopy-device", "postcopy-active", "completed"]
    info = dst.cmd("query-migrate")
    assert info["status"] == "completed"
    assert info["postcopy-blocktime"] >= 0 and len(info["postcopy-latency-dist"]) > 0
    s = src.cmd("query-migrate")
    assert s["status"] == "completed" and s["ram"]["dirty-sync-count"] >= 2
    assert p.report is not None and p.report.integrity["ok"] and p.report.config["mode"] == "preempt-full"
    compare_ram(src, dst, tmp)
    for c in (src, dst):
        c.cmd("quit")
        c.close()
    assert p.done.is_set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("version, src_path, dst_path", [
    ("8.0", ["setup", "active", "postcopy-active", "completed"], ["active", "postcopy-active", "completed"]),
    ("9.2", ["setup", "active", "postcopy-active", "completed"], ["setup", "active", "postcopy-active", "completed"]),
    ("10.0.1", ["setup", "active", "device", "postcopy-active", "completed"],
     ["setup", "active", "postcopy-active", "completed"]),
])
def test_the_events_follow_the_release_the_monitors_claim(tmp_path, version, src_path, dst_path):
    """MIGRATION events in the order of the QEMU the monitors say they are: the destination's setup
    only from 8.2, the source's device from 10.0 (postcopy-device from 10.2: above)."""
    p = Pair(BASE, f"unix:{tmp_path}/src.sock", f"unix:{tmp_path}/dst.sock", qemu_version=version)
    src, dst = client(f"{tmp_path}/src.sock"), client(f"{tmp_path}/dst.sock")
    try:
        setup_both(src, dst)
        assert wait_event(src, "completed") == src_path
        assert wait_event(dst, "completed") == dst_path
    finally:
        for c in (src, dst):
            c.close()
        p.close()


@pytest.mark.timeout(90)
@pytest.mark.skipif(bool(uffd.refused()), reason=uffd.refused())
def test_pmemsave_of_a_uffd_destination_while_postcopy_runs(tmp_path):
    """With --fault-backend uffd a page not placed yet must stay a hole: pmemsave reads the
    destination by pread (a read through a mapping would fill the hole with zeros for the vCPU,
    which then never faults on it, and the integrity check fails)."""
    p = Pair(dict(BASE, ram=16 * 1024**2, fault_backend="uffd"), f"unix:{tmp_path}/src.sock", f"unix:{tmp_path}/dst.sock")
    src, dst = client(f"{tmp_path}/src.sock"), client(f"{tmp_path}/dst.sock")
    try:
        setup_both(src, dst, postcopy_bandwidth=4 << 20)  # postcopy lasts a few seconds
        wait_event(src, "postcopy-active")
        for i in range(3):
            assert dst.cmd("pmemsave", val=0, size=16 * 1024**2, filename=f"{tmp_path}/dst{i}.ram") == {}
        wait_event(src, "completed")
        assert p.report is not None and p.report.fault_backend == "uffd" and p.report.integrity["ok"], p.report.integrity
        assert p.report.postcopy_latency_us["count"] > 0
    finally:
        for c in (src, dst):
            c.close()
        p.close()


@pytest.mark.timeout(90)
def test_pause_and_recover(pair):
    p, tmp = pair
    src, dst = client(f"{tmp}/src.sock"), client(f"{tmp}/dst.sock")
    setup_both(src, dst, postcopy_bandwidth=4 << 20)  # postcopy lasts about 2 s: time to pause it
    wait_event(src, "postcopy-active")
    assert src.cmd("migrate-pause") == {}
    wait_event(src, "postcopy-paused")
    deadline = time.monotonic() + 20
    while p.mig is not None and not p.mig._all_paused() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dst.cmd("migrate-recover", uri="tcp:127.0.0.1:4445") == {}
    assert src.cmd("migrate", uri="tcp:127.0.0.1:4445", resume=True) == {}
    wait_event(src, "completed")
    assert p.report is not None and p.report.integrity["ok"] and p.report.postcopy_pauses >= 1
    compare_ram(src, dst, tmp)


@pytest.mark.timeout(30)
def test_protocol_errors_and_hostile_clients(pair):
    _, tmp = pair
    path = f"{tmp}/src.sock"
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(path)
    f = raw.makefile("rwb")
    greeting = json.loads(f.readline())
    assert greeting["QMP"]["version"]["qemu"] == {"major": 10, "minor": 2, "micro": 50}

    def ask(line: bytes) -> dict:
        f.write(line + b"\n")
        f.flush()
        return json.loads(f.readline())

    assert ask(b'{"execute": "query-status", "id": 1}')["error"] == {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert ask(b'{"execute": "qmp_capabilities", "id": "x"}') == {"return": {}, "id": "x"}
    assert ask(b'{"execute": "nope", "id": 2}') == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 2}
    assert ask(b'{"execute": "pmemsave", "arguments": {"val": "0", "size": 1, "filename": "x"}}')["error"]["desc"] \
        == "Invalid parameter type for 'val', expected: integer"
    assert ask(b'{"execute": "pmemsave", "arguments": {"size": 1, "filename": "x"}}')["error"]["desc"] \
        == "Parameter 'val' is missing"
    assert ask(b'[1]')["error"]["desc"] == "QMP input must be a JSON object"
    assert ask(b'{"arguments": {}}')["error"]["desc"] == "QMP input lacks member 'execute'"
    assert ask(b'{"execute": "migrate_cancel"}') == {"return": {}}  # nothing to cancel
    assert ask(b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities":'
               b' [{"capability": "postcopy-preempt", "state": true}]}}')["error"]["desc"] \
        == "Postcopy preempt requires postcopy-ram"
    rng = random.Random(7)
    words = [b'{"execute": "migrate", "arguments": {"uri": 5}}', b'{"execute": "migrate-start-postcopy"}',
             b'{"execute": "migrate-recover", "arguments": {"uri": "tcp:1:1"}}', b'{"execute": 3}',
             b'{"execute": "query-migrate", "arguments": []}', b'"str"', b'{"execute": "stop", "x": 1}',
             b'{"execute": "pmemsave", "arguments": {"val": 0, "size": -1, "filename": "/"}}', b'}', b'1e999x']
    plain = bytes(c for c in range(33, 127) if c not in b'{}[]"')
    replies = 0
    for i in range(1000):  # every value gets a reply; garbage without brackets is a run of stray tokens
        if i % 2:
            f.write(rng.choice(words) + b"\n")
            replies += 1
        else:
            f.write(bytes(rng.choice(plain) for _ in range(rng.randrange(1, 20))) + b"\n")
            replies += 1
    f.write(b'{"execute": "query-status", "id": "sync"}\n')
    f.flush()
    got = 0
    while True:
        r = json.loads(f.readline())
        if r.get("id") == "sync":
            break
        assert "error" in r, r
        got += 1
    assert got == replies
    for i in range(50):  # truncated values: the client that sent one is alone in waiting, then dropped
        t = socket.socket(socket.AF_UNIX)
        t.connect(path)
        t.sendall(rng.choice(words)[:rng.randrange(1, 12)])
        t.close()
    c = client(path)  # the server still serves a second client
    assert c.cmd("query-status")["status"] == "running"
    s2 = socket.socket(socket.AF_UNIX)
    s2.connect(path)
    s2.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-migrate"}')  # and vanishes mid-command
    s2.close()
    assert c.cmd("query-version")["qemu"]["major"] == 10
    c.close()
    raw.close()


def test_mode_follows_capabilities():
    caps = {"postcopy-ram": True, "postcopy-preempt": True}
    assert settings_to_config(caps, {}, "10.2.50") == {"mode": "preempt-full", "page_hint": True,
                                                       "qemu_version": "10.2"}
    assert settings_to_config(caps, {}, "10.0") == {"mode": "preempt-full", "page_hint": False, "qemu_version": "10.0"}
    assert settings_to_config(caps, {}, "7.2") == {"mode": "preempt", "qemu_version": "7.2"}
    assert settings_to_config({"postcopy-ram": True}, {}, "10.2")["mode"] == "vanilla"
    multifd = {"postcopy-ram": True, "multifd": True}
    assert settings_to_config(multifd, {}, "10.1")["multifd_channels"] == 2  # QEMU's default
    assert settings_to_config(multifd, {"multifd-channels": 5}, "10.1")["multifd_channels"] == 5
    assert "multifd_channels" not in settings_to_config({"postcopy-ram": True}, {"multifd-channels": 5}, "10.1")
    assert settings_to_config({}, {"max-bandwidth": 1 << 20, "downtime-limit": 100}, "10.2") == {
        "mode": "precopy", "max_bandwidth": float(1 << 20), "downtime_limit": 0.1, "qemu_version": "10.2"}
    # a release shmig does not emulate runs as the mode's newest
    assert settings_to_config(caps, {}, "11.0")["qemu_version"] is None


@pytest.mark.timeout(60)
def test_serve_cli_with_qmp_shell(tmp_path):
    """``shmig serve`` as a user starts it; qmp-shell (shipped with qemu.qmp) talks to both monitors;
    quit on both ends it, the sockets removed."""
    import shutil
    import subprocess
    import sys
    shell = shutil.which("qmp-shell") or os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    if not os.path.exists(shell):
        pytest.skip("qmp-shell is not installed (it comes with qemu.qmp)")
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    serve = subprocess.Popen([sys.executable, "-m", "shmig", "serve", "--qmp-src", f"unix:{src}",
                              "--qmp-dst", f"unix:{dst}", "--ram", "8MiB", "--qemu-version", "7.2"],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (src.exists() and dst.exists()):
            assert serve.poll() is None, serve.stderr.read()
            assert time.monotonic() < deadline, "shmig serve did not listen within 20 s"
            time.sleep(0.05)
        out = subprocess.run([shell, str(src)], input="query-version\nquery-status\n"
                             "migrate-set-capabilities capabilities=[{\"capability\":\"postcopy-preempt\",\"state\":true}]\n"
                             "quit\n", capture_output=True, text=True, timeout=20, check=False).stdout
        assert '"major": 7' in out and '"minor": 2' in out, out
        assert '"status": "running"' in out, out
        assert "Postcopy preempt requires postcopy-ram" in out, out
        subprocess.run([shell, str(dst)], input="quit\n", capture_output=True, text=True, timeout=20, check=False)
        assert serve.wait(20) == 0, serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert not src.exists() and not dst.exists()


@pytest.mark.timeout(60)
def test_serve_ctrl_c_mid_migration(tmp_path):
    """Ctrl-C while a migration runs: every child reaped, sockets removed, nothing in /dev/shm
    (conftest checks that), exit 130 with a one-line message."""
    import signal
    import subprocess
    import sys
    src, dst = tmp_path / "src.sock", tmp_path / "dst.sock"
    serve = subprocess.Popen([sys.executable, "-m", "shmig", "serve", "--qmp-src", f"unix:{src}",
                              "--qmp-dst", f"unix:{dst}", "--ram", "16MiB"],
                             stderr=subprocess.PIPE, text=True,  # a shell's background job ignores SIGINT: not this one
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    try:
        deadline = time.monotonic() + 20
        while not (src.exists() and dst.exists()):
            assert serve.poll() is None and time.monotonic() < deadline, "shmig serve did not listen"
            time.sleep(0.05)
        s, d = client(str(src)), client(str(dst))
        caps = [{"capability": "postcopy-ram", "state": True}]
        s.cmd("migrate-set-capabilities", capabilities=caps)
        d.cmd("migrate-set-capabilities", capabilities=caps)
        d.cmd("migrate-incoming", uri="unix:/x")
        s.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})  # precopy lasts seconds
        s.cmd("migrate", uri="unix:/x")
        while s.cmd("query-migrate")["status"] == "setup":
            time.sleep(0.05)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(30) == 130
        assert serve.stderr.read().strip().splitlines()[-1] == "shmig: interrupted"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert not src.exists() and not dst.exists()


@pytest.mark.timeout(30)
def test_multifd_with_postcopy_is_refused_before_10_1(tmp_path):
    p = Pair(BASE, f"unix:{tmp_path}/src.sock", f"unix:{tmp_path}/dst.sock", qemu_version="9.2")
    try:
        src = client(f"{tmp_path}/src.sock")
        caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "multifd")]
        with pytest.raises(Exception, match="Postcopy is not yet compatible with multifd"):
            src.cmd("migrate-set-capabilities", capabilities=caps)
        assert src.cmd("migrate-set-capabilities", capabilities=caps[1:]) == {}  # multifd alone is fine
        src.close()
    finally:
        p.close()
