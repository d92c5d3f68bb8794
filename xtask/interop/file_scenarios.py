#!/usr/bin/env python3
"""Python tooz side of `cargo xtask interop --driver file`.

Each subcommand performs one Python tooz operation against a backend URL and prints its
result on stdout (JSON for queries, one status word for actions), so the Rust driver of the
scenarios (xtask/src/interop/file.rs) can compare it with what the `tooz` CLI sees.

Ids are passed to tooz as `str`. Python tooz returns ids in the type they were stored in:
`str` for ids written by Python (`encoded: true`), `bytes` for ids written by Rust
(`encoded: false`), so every id is normalised to `str` before printing, and the stored
type is reported next to it.

Long-lived subcommands (`join`, `hold-lock`) print a line once they hold what they took
("joined", "held"), keep it until their standard input is closed, then give it back and
print "left" / "released". `hold-lock` also prints "acquiring" just before it blocks.
A watchdog ends them after --max-hold seconds regardless.
"""

import argparse
import json
import os
import sys
import threading

from tooz import coordination
from tooz import partitioner


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def _id_type(value):
    return "bytes" if isinstance(value, bytes) else type(value).__name__


def _jsonable(value):
    """Capabilities as JSON: bytes become text, containers are walked."""
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, dict):
        return {str(_text(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return value


def _emit(value):
    if isinstance(value, str):
        print(value)
    else:
        print(json.dumps(value, sort_keys=True, ensure_ascii=False))
    sys.stdout.flush()


def _coordinator(args, start_heart=False):
    coord = coordination.get_coordinator(args.url, args.member)
    coord.start(start_heart=start_heart)
    return coord


def _wait_for_stdin_eof(max_hold, on_tick=None, tick=1.0):
    """Blocks until stdin reaches EOF or `max_hold` seconds pass, calling `on_tick`
    every `tick` seconds meanwhile."""
    closed = threading.Event()

    def reader():
        try:
            sys.stdin.read()
        finally:
            closed.set()

    threading.Thread(target=reader, daemon=True).start()
    waited = 0.0
    while not closed.wait(tick):
        waited += tick
        if waited >= max_hold:
            print("watchdog: max hold reached", file=sys.stderr)
            return
        if on_tick is not None:
            on_tick()


def cmd_groups(args):
    coord = _coordinator(args)
    groups = coord.get_groups().get()
    _emit(sorted(_text(g) for g in groups))


def cmd_create_group(args):
    coord = _coordinator(args)
    try:
        coord.create_group(args.group).get()
        _emit("created")
    except coordination.GroupAlreadyExist:
        _emit("exists")


def cmd_delete_group(args):
    coord = _coordinator(args)
    coord.delete_group(args.group).get()
    _emit("deleted")


def cmd_members(args):
    coord = _coordinator(args)
    out = {}
    for member in coord.get_members(args.group).get():
        caps = coord.get_member_capabilities(args.group, member).get()
        out[_text(member)] = {
            "capabilities": _jsonable(caps),
            "id_type": _id_type(member),
        }
    _emit(out)


def cmd_join(args):
    coord = _coordinator(args)
    if args.create:
        try:
            coord.create_group(args.group).get()
        except coordination.GroupAlreadyExist:
            pass
    if args.caps is None:
        coord.join_group(args.group).get()
    else:
        coord.join_group(args.group, capabilities=json.loads(args.caps)).get()
    _emit("joined")
    # Heartbeat every second rather than every `timeout` seconds (what tooz's own heart
    # thread does), so the member never drops out of the staleness window mid-scenario.
    _wait_for_stdin_eof(args.max_hold, on_tick=coord.heartbeat)
    coord.leave_group(args.group).get()
    coord.stop()
    _emit("left")


def cmd_hold_lock(args):
    coord = _coordinator(args)
    # The file driver takes lock names as bytes (it calls `name.decode()`).
    lock = coord.get_lock(args.name.encode("utf-8"))
    _emit("acquiring")
    if not lock.acquire(blocking=True):
        print("blocking acquire returned False", file=sys.stderr)
        sys.exit(1)
    _emit("held")
    _wait_for_stdin_eof(args.max_hold)
    released = lock.release()
    coord.stop()
    _emit("released" if released else "release-returned-false")


def cmd_try_lock(args):
    coord = _coordinator(args)
    # The file driver takes lock names as bytes (it calls `name.decode()`).
    lock = coord.get_lock(args.name.encode("utf-8"))
    acquired = lock.acquire(blocking=False)
    if acquired:
        lock.release()
    coord.stop()
    _emit({"acquired": bool(acquired)})


def cmd_partition(args):
    coord = _coordinator(args)
    part = partitioner.Partitioner(coord, args.group)
    owners = {}
    for obj in args.objects:
        members = part.members_for_object(obj, replicas=args.replicas)
        owners[obj] = sorted(_text(m) for m in members)
    part.stop()
    _emit({
        "ring_nodes": sorted(_text(n) for n in part.ring.nodes),
        "weights": {_text(n): w for n, w in part.ring.nodes.items()},
        "owners": owners,
    })


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, *positional):
        p = sub.add_parser(name)
        p.add_argument("url")
        p.add_argument("member")
        for arg in positional:
            p.add_argument(arg)
        p.set_defaults(func=func)
        return p

    add("groups", cmd_groups)
    add("create-group", cmd_create_group, "group")
    add("delete-group", cmd_delete_group, "group")
    add("members", cmd_members, "group")
    p = add("join", cmd_join, "group")
    p.add_argument("--caps", help="capabilities as JSON (default: tooz's b'')")
    p.add_argument("--create", action="store_true")
    p.add_argument("--max-hold", type=float, default=120.0)
    p = add("hold-lock", cmd_hold_lock, "name")
    p.add_argument("--max-hold", type=float, default=120.0)
    add("try-lock", cmd_try_lock, "name")
    p = add("partition", cmd_partition, "group")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("objects", nargs="+")

    args = parser.parse_args(argv)
    args.func(args)
    # tooz's executor threads take about a second to notice interpreter shutdown; the
    # command's work is done and flushed, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
