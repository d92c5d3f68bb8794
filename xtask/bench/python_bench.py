"""The Python side of `cargo xtask bench --compare-python`.

Runs the tooz-bench scenarios through Python tooz 9.1.0 against the same backend and
writes {"driver": ..., "scenarios": {"<name>": {"median_us", "p99_us", "ops_per_s",
"requests_per_op", "ratio_to_floor"}}, "notes": [...]} to --json-out.

There is no counting proxy on this side, so requests_per_op is null; floor_rtt is a raw
redis-py PING (Redis), a pymemcache get of a stored key (memcached), a sysv_ipc semaphore
acquire + release (ipc) or a `SELECT 1` of psycopg2 / PyMySQL (PostgreSQL, MySQL), and
ratio_to_floor is over that Python floor. A scenario Python tooz cannot run (or that
takes too long to set up, or that its driver does not implement; Python's SQL drivers
have locks only) has null figures and a note.
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid

import tooz
from tooz import coordination

HANDOFF_WAIT = 0.020
EVENT_TIMEOUT = 10.0
SETUP_BUDGET = 120.0  # seconds allowed to build the 1,000-member group


def percentile(sorted_us, q):
    if not sorted_us:
        return None
    rank = math.ceil(q * len(sorted_us))
    return sorted_us[min(max(rank, 1), len(sorted_us)) - 1]


def figures(samples, ops_per_sample=1):
    us = sorted(s * 1e6 / ops_per_sample for s in samples)
    total = sum(samples)
    ops = len(samples) * ops_per_sample
    return {
        "median_us": percentile(us, 0.5),
        "p99_us": percentile(us, 0.99),
        "ops_per_s": ops / total if total > 0 else None,
        "requests_per_op": None,
        "ratio_to_floor": None,
    }


def na():
    return {
        "median_us": None,
        "p99_us": None,
        "ops_per_s": None,
        "requests_per_op": None,
        "ratio_to_floor": None,
    }


class Bench:
    def __init__(self, url, quick):
        self.url = url
        self.run = uuid.uuid4().hex[:8]
        self.quick = quick
        self.notes = []

    def n(self, full):
        return max(full // 10, 5) if self.quick else full

    def name(self, what):
        return ("bench-py-%s-%s" % (self.run, what)).encode()

    def locks_only(self, scenario):
        """Python tooz's SQL drivers have locks only: the scenario is n/a."""
        scheme = self.url.split(":", 1)[0]
        if scheme in ("postgresql", "postgres", "mysql"):
            self.notes.append(
                "%s: n/a (Python tooz's %s driver has locks only)" % (scenario, scheme)
            )
            return True
        return False

    def coordinator(self, who):
        c = coordination.get_coordinator(self.url, self.name(who))
        c.start(start_heart=False)
        return c

    def floor_rtt(self):
        """One raw round trip with the driver's client library (redis-py PING)."""
        if self.url.startswith("memcached"):
            return self.memcached_floor()
        if self.url.startswith("ipc"):
            return self.ipc_floor()
        if self.url.split(":", 1)[0] in ("postgresql", "postgres", "mysql"):
            return self.sql_floor()
        if not self.url.startswith("redis"):
            self.notes.append("floor_rtt: measured on the Rust side only for this driver")
            return na()
        import redis

        client = redis.Redis.from_url(self.url.split("?", 1)[0])
        for _ in range(10):
            client.ping()
        samples = []
        for _ in range(self.n(2000)):
            start = time.perf_counter()
            assert client.ping()
            samples.append(time.perf_counter() - start)
        client.close()
        return figures(samples)

    def memcached_floor(self):
        """One pymemcache get of a stored key (Python tooz's memcached client)."""
        from urllib.parse import urlsplit

        from pymemcache.client.base import Client

        u = urlsplit(self.url)
        client = Client((u.hostname or "localhost", u.port or 11211))
        key = b"tooz-bench/" + self.name("floor-read")
        client.set(key, b"x", expire=300)
        for _ in range(10):
            client.get(key)
        samples = []
        for _ in range(self.n(2000)):
            start = time.perf_counter()
            got = client.get(key)
            samples.append(time.perf_counter() - start)
            assert got == b"x", got
        client.delete(key)
        client.close()
        self.notes.append(
            "floor_rtt: one pymemcache get of a stored key (text protocol `get`)"
        )
        return figures(samples)

    def ipc_floor(self):
        """One sysv_ipc acquire + release of a private semaphore (Python tooz's IPC client)."""
        import sysv_ipc

        sem = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, initial_value=1)
        sem.undo = True
        try:
            for _ in range(10):
                sem.acquire()
                sem.release()
            samples = []
            for _ in range(self.n(2000)):
                start = time.perf_counter()
                sem.acquire()
                sem.release()
                samples.append(time.perf_counter() - start)
        finally:
            sem.remove()
        self.notes.append(
            "floor_rtt: one sysv_ipc acquire + release (SEM_UNDO) of a private semaphore"
        )
        return figures(samples)

    def sql_floor(self):
        """One `SELECT 1` with Python tooz's client library (psycopg2, PyMySQL)."""
        from urllib.parse import unquote, urlsplit

        u = urlsplit(self.url)
        if u.scheme == "mysql":
            import pymysql

            conn = pymysql.connect(
                host=u.hostname or "localhost",
                port=u.port or 3306,
                user=unquote(u.username or ""),
                password=unquote(u.password or ""),
                database=u.path.lstrip("/"),
            )
        else:
            import psycopg2

            conn = psycopg2.connect(
                host=u.hostname,
                port=u.port,
                user=unquote(u.username or ""),
                password=unquote(u.password or ""),
                dbname=u.path.lstrip("/"),
            )
            conn.autocommit = True
        cur = conn.cursor()
        for _ in range(10):
            cur.execute("SELECT 1")
            cur.fetchone()
        samples = []
        for _ in range(self.n(2000)):
            start = time.perf_counter()
            cur.execute("SELECT 1")
            cur.fetchone()
            samples.append(time.perf_counter() - start)
        conn.close()
        self.notes.append("floor_rtt: one `SELECT 1` (%s)" % u.scheme)
        return figures(samples)

    # -- scenarios -----------------------------------------------------------------------

    def lock_pair(self):
        c = self.coordinator("lock-pair")
        lock = c.get_lock(self.name("lock-pair"))
        for _ in range(10):
            assert lock.acquire(blocking=True)
            lock.release()
        samples = []
        for _ in range(self.n(2000)):
            start = time.perf_counter()
            assert lock.acquire(blocking=True)
            assert lock.release()
            samples.append(time.perf_counter() - start)
        c.stop()
        return figures(samples)

    def lock_handoff(self):
        a = self.coordinator("handoff-a")
        b = self.coordinator("handoff-b")
        la = a.get_lock(self.name("handoff"))
        lb = b.get_lock(self.name("handoff"))
        samples = []
        try:
            for _ in range(self.n(200)):
                assert la.acquire(blocking=True)
                got = {}

                def wait():
                    got["ok"] = lb.acquire(blocking=True)
                    got["at"] = time.perf_counter()

                t = threading.Thread(target=wait)
                t.start()
                time.sleep(HANDOFF_WAIT)
                if "at" in got:
                    self.notes.append(
                        "lock_handoff: B acquired while A held the lock (Python tooz's "
                        "%s locks do not exclude two coordinators of one process): n/a"
                        % self.url.split(":", 1)[0]
                    )
                    t.join()
                    lb.release()
                    la.release()
                    return na()
                assert la.release()
                released = time.perf_counter()
                t.join()
                assert got["ok"]
                samples.append(max(got["at"] - released, 0.0))
                lb.release()
        finally:
            a.stop()
            b.stop()
        return figures(samples)

    def join_leave(self):
        if self.locks_only("join_leave"):
            return na()
        group = self.name("join-leave")
        owner = self.coordinator("join-leave-owner")
        owner.create_group(group).get()
        j = self.coordinator("join-leave")
        for _ in range(10):
            j.join_group(group).get()
            j.leave_group(group).get()
        samples = []
        for _ in range(self.n(1000)):
            start = time.perf_counter()
            j.join_group(group).get()
            j.leave_group(group).get()
            samples.append(time.perf_counter() - start)
        j.stop()
        try:
            owner.delete_group(group).get()
        except Exception:
            pass
        owner.stop()
        return figures(samples)

    def get_members_1000(self):
        if self.locks_only("get_members_1000"):
            return na()
        members = 1000
        group = self.name("members")
        reader = self.coordinator("members-reader")
        reader.create_group(group).get()
        coords = []
        started = time.monotonic()
        result = None
        try:
            for i in range(members):
                if time.monotonic() - started > SETUP_BUDGET:
                    self.notes.append(
                        "get_members_1000: only %d of %d members joined within %.0f s: n/a"
                        % (i, members, SETUP_BUDGET)
                    )
                    return na()
                c = self.coordinator("m%04d" % i)
                coords.append(c)
                c.join_group(group).get()
                if self.url.startswith("memcached"):
                    # The test server takes 1,024 connections: close this member's
                    # (pymemcache reconnects lazily for stop()); it stays a member while
                    # its liveness key lives (membership_timeout, 30 s).
                    c.client.close()
            print(
                "python_bench: %d members joined in %.1f s"
                % (members, time.monotonic() - started),
                file=sys.stderr,
            )
            got = len(reader.get_members(group).get())
            assert got == members, got
            samples = []
            for _ in range(self.n(200)):
                start = time.perf_counter()
                got = reader.get_members(group).get()
                samples.append(time.perf_counter() - start)
                assert len(got) == members
            result = figures(samples)
        finally:
            # Each stop() joins its executor's threads, which takes a while; stop in parallel.
            with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
                list(pool.map(lambda c: c.stop(), coords))
            try:
                reader.delete_group(group).get()
            except Exception:
                pass
            reader.stop()
        return result

    def heartbeat_100(self):
        if self.locks_only("heartbeat_100"):
            return na()
        h = self.coordinator("heartbeat")
        locks = []
        groups = [self.name("hb-g%03d" % i) for i in range(100)]
        for i, g in enumerate(groups):
            h.create_group(g).get()
            h.join_group(g).get()
            lock = h.get_lock(self.name("hb-l%03d" % i))
            assert lock.acquire(blocking=False)
            locks.append(lock)
        samples = []
        for _ in range(self.n(200)):
            start = time.perf_counter()
            h.heartbeat()
            samples.append(time.perf_counter() - start)
        for lock in locks:
            lock.release()
        for g in groups:
            h.leave_group(g).get()
            try:
                h.delete_group(g).get()
            except Exception:
                pass
        h.stop()
        return figures(samples)

    def watch_latency(self):
        if self.locks_only("watch_latency"):
            return na()
        group = self.name("watch")
        w = self.coordinator("watcher")
        w.create_group(group).get()
        j = self.coordinator("watch-joiner")
        me = j._member_id
        seen = {"join": False, "leave": False}

        def on_join(event):
            if event.member_id == me:
                seen["join"] = True

        def on_leave(event):
            if event.member_id == me:
                seen["leave"] = True

        w.watch_join_group(group, on_join)
        w.watch_leave_group(group, on_leave)
        w.run_watchers()

        def wait(kind):
            deadline = time.monotonic() + EVENT_TIMEOUT
            while not seen[kind]:
                if time.monotonic() > deadline:
                    raise RuntimeError("no %s event within %ss" % (kind, EVENT_TIMEOUT))
                w.run_watchers()
            seen[kind] = False

        samples = []
        for _ in range(self.n(200)):
            start = time.perf_counter()
            j.join_group(group).get()
            wait("join")
            samples.append(time.perf_counter() - start)
            j.leave_group(group).get()
            wait("leave")
        self.notes.append(
            "watch_latency: the watcher polls run_watchers() back to back (Python tooz has no "
            "event stream)"
        )
        j.stop()
        w.unwatch_join_group(group, on_join)
        w.unwatch_leave_group(group, on_leave)
        try:
            w.delete_group(group).get()
        except Exception:
            pass
        w.stop()
        return figures(samples)

    def partition_lookup(self):
        if self.locks_only("partition_lookup"):
            return na()
        group = self.name("partition")
        coords = []
        parts = []
        for i in range(10):
            c = self.coordinator("p%d" % i)
            coords.append(c)
            parts.append(c.join_partitioned_group(group, weight=1, partitions=32))
        # The last one joined after the others, so its ring holds all ten.
        p = parts[-1]
        assert len(p.ring.nodes) == 10, p.ring.nodes
        keys = ["object-%d" % i for i in range(4096)]
        run_for = 0.2 if self.quick else 1.0
        batch = 1000
        samples = []
        k = 0
        started = time.perf_counter()
        while time.perf_counter() - started < run_for:
            start = time.perf_counter()
            for _ in range(batch):
                p.members_for_object(keys[k])
                k = (k + 1) % len(keys)
            samples.append(time.perf_counter() - start)
        for c, part in zip(coords, parts):
            c.leave_partitioned_group(part)
            c.stop()
        return figures(samples, batch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    scratch = None
    if args.url.startswith("file://"):
        scratch = args.url[len("file://"):]
        os.makedirs(scratch, exist_ok=True)
    bench = Bench(args.url, args.quick)
    scenarios = {}
    failed = []
    try:
        for name in (
            "floor_rtt",
            "lock_pair",
            "lock_handoff",
            "join_leave",
            "get_members_1000",
            "heartbeat_100",
            "watch_latency",
            "partition_lookup",
        ):
            try:
                scenarios[name] = getattr(bench, name)()
            except tooz.NotImplemented as e:
                bench.notes.append(
                    "%s: not implemented by Python tooz's %s driver (%s)" % (name, args.driver, e)
                )
                scenarios[name] = na()
            except Exception as e:  # report and go on: one scenario must not hide the rest
                failed.append(name)
                bench.notes.append("%s failed: %r" % (name, e))
                scenarios[name] = na()
            m = scenarios[name]["median_us"]
            print(
                "python_bench: %s: %s: median %s µs"
                % (args.driver, name, "n/a" if m is None else "%.2f" % m),
                file=sys.stderr,
            )
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    floor = scenarios.get("floor_rtt", {}).get("median_us")
    if floor:
        for fig in scenarios.values():
            if fig["median_us"] is not None:
                fig["ratio_to_floor"] = fig["median_us"] / floor
    bench.notes.append(
        "python: requests_per_op not counted (no proxy on this side); ratio_to_floor is "
        "over Python's own floor_rtt where there is one"
    )
    doc = {"driver": args.driver, "scenarios": scenarios, "notes": bench.notes}
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print("python_bench: wrote %s" % args.json_out, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
