"""The `vod` command: run the platform (`vod up`), one tier (`vod edge …`), make API keys,
upload a video.

`vod up` runs one process per tier (control, origin, shield, edge, transcoder), so the five
event loops spread over every core; it supervises them, writes each one's output to
DATA/logs/{tier}.log, and on Ctrl-C/SIGTERM stops them gracefully (SIGTERM, then SIGKILL after a
grace period). If one tier dies, it stops the rest and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from vodcore import config

TIERS = ("origin", "shield", "edge", "control")


def _settings(args: argparse.Namespace) -> config.Settings:
    s = config.load(getattr(args, "config", None), data_dir=getattr(args, "data", None))
    port = getattr(args, "port", None)
    tier = getattr(args, "tier", None)
    if port and tier:
        s = dataclasses.replace(s, ports={**s.ports, tier: port})
    host = getattr(args, "host", None)
    if host and tier:  # each tier binds its own address (issue 11)
        s = dataclasses.replace(s, hosts={**s.hosts, tier: host})
    return s


def _upstreams(value: str | None, default: str) -> list[str]:
    return [u.strip().rstrip("/") for u in (value or default).split(",") if u.strip()]


# --- one tier -------------------------------------------------------------------------------


def cmd_tier(args: argparse.Namespace) -> int:
    from vodcore.server import run

    s = _settings(args)
    tier = args.tier
    if tier == "origin":
        from origin.app import make_app as origin_app

        app = origin_app(s, control_url=args.control)
    elif tier == "shield":
        from shield.app import make_app as shield_app

        app = shield_app(s, _upstreams(args.upstream, s.url("origin")), control_url=args.control)
    elif tier == "edge":
        from edge.app import make_app as edge_app

        app = edge_app(
            s,
            _upstreams(args.upstream, s.url("shield")),
            tokens=args.tokens == "on",
            control_url=args.control or (s.url("control") if args.tokens == "on" else None),
            fallback=_upstreams(args.origin, "") or None,
        )
    else:
        from control.app import make_app as control_app

        app = control_app(s)
    run(
        app,
        s.bind_host(tier),
        s.port(tier),
        tier=tier,
        access_log=args.access_log == "on",
        settings=s,
    )
    return 0


def cmd_transcoder(args: argparse.Namespace) -> int:
    import uvloop

    from transcoder.worker import run_pool
    from vodcore.server import configure_logging

    configure_logging()
    s = _settings(args)
    slots = args.slots or s.transcoder_slots
    if args.threads is not None:
        s = dataclasses.replace(s, ffmpeg_threads=args.threads)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_pool(s, slots, stop=stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return 0


# --- vod up ---------------------------------------------------------------------------------


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    import secrets

    from vodcore.nodes_cli import provision

    s = _settings(args)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    s.logs_dir.mkdir(parents=True, exist_ok=True)
    data = str(s.data_dir.resolve())
    base = [sys.executable, "-m", "vodcore.cli"]
    common = ["--data", data] + (["--config", args.config] if args.config else [])
    # Its own tiers authenticate to control with a node credential kept in DATA (made once,
    # reused while it is valid) and to each other with a tier secret (a fresh random one per
    # run unless one is configured); everything binds 127.0.0.1 unless configured otherwise.
    env = {
        **os.environ,
        **{f"VOD_{t.upper()}_PORT": str(s.port(t)) for t in TIERS},
        **{f"VOD_{t.upper()}_HOST": s.bind_host(t) for t in TIERS},
        "VOD_NODE_CREDENTIAL": s.node_credential or provision(s),
        "VOD_TIER_SECRET": s.tier_secret or secrets.token_urlsafe(32),
        "PYTHONUNBUFFERED": "1",
    }
    plan: list[tuple[str, list[str]]] = [
        ("control", [*base, "control", *common]),
        ("origin", [*base, "origin", *common, "--control", s.url("control")]),
        (
            "shield",
            [
                *base,
                "shield",
                *common,
                "--upstream",
                s.url("origin"),
                "--control",
                s.url("control"),
            ],
        ),
        (
            "edge",
            [*base, "edge", *common, "--upstream", s.url("shield"), "--origin", s.url("origin")],
        ),
    ]
    # The transcoder starts once control is healthy, i.e. after control has created the schema.
    transcoder = [*base, "transcoder", *common, "--slots", str(args.slots or s.transcoder_slots)]
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def stop_all(code: int) -> int:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return code

    def on_signal(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)

    def start(name: str, cmd: list[str]) -> None:
        with open(s.logs_dir / f"{name}.log", "ab") as log:  # the child keeps its own fd
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    try:
        for name, cmd in plan:
            start(name, cmd)
        for name in TIERS:
            if not _wait_healthy(s.url(name), procs[name], 30):
                print(
                    f"vod: {name} did not become healthy; see {s.logs_dir / (name + '.log')}",
                    file=sys.stderr,
                )
                return stop_all(1)
        start("transcoder", transcoder)
        print("vodstack is up:")
        print(f"  control     {s.url('control')}/v1")
        print(f"  edge        {s.url('edge')}   (players)")
        print(f"  shield      {s.url('shield')}")
        print(f"  origin      {s.url('origin')}")
        print(f"  transcoder  {args.slots or s.transcoder_slots} slot(s)")
        print(f"  data        {data}   logs in {s.logs_dir}")
        print("Create an API key with: vod keys create --data", data, "--role creator")
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            for name, p in procs.items():
                if p.poll() is not None:
                    print(f"vod: {name} exited with {p.returncode}; stopping", file=sys.stderr)
                    return stop_all(1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("vod: stopping…", flush=True)
        return stop_all(0)


def cmd_reindex(args: argparse.Namespace) -> int:
    from control.search import cmd_reindex as reindex

    return reindex(args)


# --- keys -----------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    from control.auth import create_key
    from vodcore.db.engine import create_schema, make_engine

    s = _settings(args)
    s.data_dir.mkdir(parents=True, exist_ok=True)

    async def main() -> str:
        engine = make_engine(s.db_url)
        try:
            await create_schema(engine)
            async with engine.begin() as conn:
                return await create_key(conn, args.role, time.time())
        finally:
            await engine.dispose()

    print(asyncio.run(main()))
    return 0


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vod",
        description="vodstack: video-on-demand platform with edge, shield and origin tiers.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--data",
            help="data directory (SQLite db, object store, keys, logs); default ./var or $VOD_DATA",
        )
        sp.add_argument("--config", help="TOML config file")

    up = sub.add_parser("up", help="run every tier on this machine (embedded defaults)")
    common(up)
    up.add_argument("--slots", type=int, help="transcoder slots (concurrent jobs)")
    up.set_defaults(func=cmd_up)

    for tier, desc in (
        ("control", "control API (/v1) on port 8000"),
        ("origin", "origin: serves the object store on port 8082"),
        ("shield", "shield cache tier on port 8081"),
        ("edge", "edge cache tier facing players on port 8080"),
    ):
        sp = sub.add_parser(tier, help=desc)
        common(sp)
        sp.add_argument("--port", type=int, help="listen port")
        sp.add_argument(
            "--host",
            help=f"address to bind (default: [hosts] {tier} in the config, "
            f"VOD_{tier.upper()}_HOST, else host = 127.0.0.1)",
        )
        sp.add_argument(
            "--access-log",
            choices=("on", "off"),
            default="on",
            help="one line per request on stdout (default on)",
        )
        if tier in ("shield", "edge"):
            sp.add_argument(
                "--upstream", help="upstream URL[,URL…] (edge → shields, shield → origin)"
            )
        if tier in ("shield", "edge", "origin"):
            sp.add_argument(
                "--control",
                help="control URL: the purge log (edges: also public signing keys; origin: "
                "refuse blocked and deleted videos)",
            )
        if tier == "edge":
            sp.add_argument(
                "--tokens",
                choices=("on", "off"),
                default="on",
                help="off: a plain RFC 9111 caching reverse proxy",
            )
            sp.add_argument(
                "--origin",
                help="origin URL[,URL…] asked directly when no "
                "upstream shield is usable (with a concurrency cap)",
            )
        sp.set_defaults(func=cmd_tier, tier=tier)

    tc = sub.add_parser("transcoder", help="run a transcoder pool pulling jobs from the queue")
    common(tc)
    tc.add_argument("--slots", type=int, help="concurrent jobs (default 1)")
    tc.add_argument("--threads", type=int, help="ffmpeg threads per slot (default: ffmpeg's own)")
    tc.set_defaults(func=cmd_transcoder)

    keys = sub.add_parser("keys", help="API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="create an API key and print it")
    common(kc)
    kc.add_argument("--role", choices=("creator", "operator"), required=True)
    kc.set_defaults(func=cmd_keys_create)
    from vodcore.keys_cli import add_key_parsers

    add_key_parsers(ksub, common)

    from vodcore.nodes_cli import add_nodes_parser

    add_nodes_parser(sub, common)

    ri = sub.add_parser("reindex", help="rebuild the search index from the event log")
    common(ri)
    ri.set_defaults(func=cmd_reindex)

    from vodcore.operator_cli import add_operator_parsers
    from vodcore.upload_cli import add_upload_parser

    add_upload_parser(sub)
    add_operator_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except config.ConfigError as e:  # a bad setting: one line, not a traceback
        print(f"vod: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
