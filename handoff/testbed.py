"""Test hosts on one machine: a deployment spread over hosts, tried before a real cluster.

Each host is a Linux network namespace with one interface, joined to the others by a veth pair
and a bridge (in a namespace of its own: nothing is added to this machine's own network). A
process runs on a host with `ip netns exec`, so it talks to the others over the virtual network
only, never over loopback. Faults are the network's: a host's cable pulled (its switch port
down), nft rules dropping traffic between two hosts, random loss on a host's link, and latency
from `DelayProxy`, a small TCP proxy on a host of its own that holds every chunk for a while
(this kernel has no `netem`).

```
python -m handoff.testbed up server chains agent1 agent2 starter   # 10.77.0.1, .2, ...
ip netns exec hb-server handoff server --ip 10.77.0.1 --db ''
ip netns exec hb-chains env TEMPORAL_ADDRESS=10.77.0.1:7233 handoff worker --chains
python -m handoff.testbed cut agent1      # pull agent1's cable; `restore agent1` puts it back
python -m handoff.testbed down
```

A prefix (`--prefix`, default `hb`: letters and digits) names one bed, and every namespace named
`<prefix>-...` is that bed's: `up` replaces whatever bed the prefix had, and `down` removes every
namespace of the prefix, whatever `up` recorded, and nothing else.

It needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2, and nftables for the drop rules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "hb"
SUBNET = "10.77.0"
FAULT_TABLE = "handoff_bed"
STATE = Path("/run/handoff-testbed")
"""Where `up` writes the hosts it made, for `status`, `cut`, `block`... run later from a shell
(`down` goes by the namespaces themselves)."""


class BedError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise BedError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): the reason a test skips with."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{PREFIX}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"the kernel refused a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def nft_unavailable() -> str | None:
    return None if shutil.which("nft") else "nftables' `nft` is not installed"


def _checked(prefix: str) -> str:
    # no dash in a prefix, so a namespace `<prefix>-...` belongs to one prefix only
    # (`hb-x` is `hb`'s, `hbx-keep` is `hbx`'s)
    if not prefix.isalnum() or len(prefix) > 20:
        raise BedError(f"a bed's prefix is letters and digits, at most 20: {prefix!r}")
    return prefix


def namespaces(prefix: str = PREFIX) -> list[str]:
    """The namespaces named `<prefix>-...` on this machine, whatever made them."""
    mine = f"{_checked(prefix)}-"
    listed = (re.sub(r" \(id: \d+\)$", "", line) for line in _ip("netns", "list").stdout.splitlines())
    return [ns for ns in listed if ns.startswith(mine)]


def remove_bed(prefix: str = PREFIX) -> None:
    """Remove every namespace of `prefix` (their interfaces go with them) and the record of its
    hosts; processes still running on a host are the caller's to stop first."""
    for ns in namespaces(prefix):
        _ip("netns", "del", ns, check=False)
    (STATE / f"{prefix}.json").unlink(missing_ok=True)


@dataclass
class Host:
    name: str
    ip: str
    ns: str
    port: str  # its interface's other end, on the switch

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.ns, *argv]


@dataclass
class Bed:
    """Hosts `names` on one bridge, at `SUBNET`.1, .2, ... in the order given."""

    names: Sequence[str]
    prefix: str = PREFIX
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _checked(self.prefix)
        if len(self.names) > 200 or len(set(self.names)) != len(self.names):
            raise BedError("give at most 200 distinct host names")
        for i, name in enumerate(self.names, start=1):
            if not name.replace("-", "").isalnum() or len(name) > 20:
                raise BedError(f"a host name is letters, digits and dashes, at most 20: {name!r}")
            self.hosts[name] = Host(name, f"{SUBNET}.{i}", f"{self.prefix}-{name}", f"p{i}")

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

    def __getitem__(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise BedError(f"no host {name!r} on this bed: {', '.join(self.hosts)}") from None

    def up(self) -> Bed:
        """Make the hosts, in place of any bed the prefix had; when one cannot be made, no
        namespace of the prefix is left."""
        self.down()
        try:
            self._make()
        except BedError:
            self.down()
            raise
        return self

    def _make(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts.values():
            _ip("netns", "add", host.ns)
            _ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")

    def down(self) -> None:
        """`remove_bed` of this bed's prefix: its hosts and any other namespace of the prefix."""
        remove_bed(self.prefix)

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self[host].argv(argv), **kwargs)

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self[host].argv(argv), **kwargs)

    # -- faults -------------------------------------------------------------------------------

    def cut(self, host: str) -> None:
        """Pull the host's cable: its switch port goes down (the host's own link stays up, as
        when a switch or a cable between fails: its connections hang rather than reset)."""
        _ip("-n", self.switch, "link", "set", self[host].port, "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self[host].port, "up")

    def _nft(self, host: str, script: str) -> None:
        proc = self.run(host, ["nft", "-f", "-"], input=script, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BedError(f"nft on {host}: {proc.stderr.strip()}")

    def _rules(self, host: str, rules: list[str]) -> None:
        chains = "\n".join(
            f"  chain {hook} {{ type filter hook {hook} priority 0; policy accept;\n"
            + "".join(f"    {r.format(dir='saddr' if hook == 'input' else 'daddr', iface='iifname' if hook == 'input' else 'oifname')}\n"
                      for r in rules)
            + "  }" for hook in ("input", "output"))
        self._nft(host, f"table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n"
                        f"table inet {FAULT_TABLE} {{\n{chains}\n}}\n")

    def block(self, host: str, *peers: str) -> None:
        """Drop every packet between `host` and each of `peers` (both ways, on `host`), silently:
        a partition between them, the rest of the network untouched."""
        self._rules(host, [f"ip {{dir}} {self[p].ip} drop" for p in peers])

    def lossy(self, host: str, percent: int) -> None:
        """Drop `percent` % of the packets in and out of `host`'s link, at random."""
        if not 0 < percent < 100:
            raise BedError("loss is a percentage between 1 and 99")
        self._rules(host, [f"{{iface}} eth0 numgen random mod 100 < {percent} drop"])

    def heal(self, host: str) -> None:
        """Remove the host's drop rules."""
        self._nft(host, f"table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n")

    # -- a bed made from a shell, found again -------------------------------------------------

    def save(self) -> None:
        STATE.mkdir(parents=True, exist_ok=True)
        (STATE / f"{self.prefix}.json").write_text(json.dumps({"names": list(self.names)}))

    @classmethod
    def load(cls, prefix: str = PREFIX) -> Bed:
        try:
            names = json.loads((STATE / f"{_checked(prefix)}.json").read_text())["names"]
        except (OSError, ValueError, KeyError) as err:
            raise BedError(f"no bed {prefix!r} is up (python -m handoff.testbed up NAMES...)") from err
        return cls(names, prefix=prefix)


# -- latency ----------------------------------------------------------------------------------


class DelayProxy:
    """A TCP proxy that holds each chunk `delay_s` before passing it on, both ways, in order:
    a link with that much latency each way, for a gRPC connection as for any other."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
        self.listen, self.target, self.delay_s = listen, target, delay_s

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, chunk = await held.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(release())
        try:
            while chunk := await reader.read(65536):
                held.put_nowait((loop.time() + self.delay_s, chunk))
            held.put_nowait((0.0, b""))
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
        finally:
            writer.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer),
                             return_exceptions=True)

    async def serve_forever(self) -> None:
        server = await asyncio.start_server(self._serve, *self.listen)
        async with server:
            await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def wait_port(bed: Bed, from_host: str, ip: str, port: int, timeout_s: float = 30.0) -> None:
    """Wait until `ip:port` accepts a connection from `from_host`."""
    probe = f"import socket; socket.create_connection(({ip!r}, {port}), timeout=0.5).close()"
    deadline = time.monotonic() + timeout_s
    while bed.run(from_host, [sys.executable, "-c", probe], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise BedError(f"{ip}:{port} did not accept a connection from {from_host} within {timeout_s:g}s")
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handoff.testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default=PREFIX, help="namespace name prefix (default hb)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="make the hosts").add_argument("names", nargs="+")
    commands.add_parser("down", help="remove the hosts")
    commands.add_parser("status", help="the hosts and their addresses")
    for name in ("cut", "restore", "heal"):
        commands.add_parser(name).add_argument("host")
    block = commands.add_parser("block", help="drop traffic between HOST and PEERS")
    block.add_argument("host")
    block.add_argument("peers", nargs="+")
    lossy = commands.add_parser("lossy", help="drop PERCENT % of HOST's packets at random")
    lossy.add_argument("host")
    lossy.add_argument("percent", type=int)
    delay = commands.add_parser("delay", help="run a delaying TCP proxy (run it on a host)")
    delay.add_argument("--listen", type=_address, required=True)
    delay.add_argument("--to", type=_address, required=True)
    delay.add_argument("--ms", type=float, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            if reason := unavailable():
                raise BedError(reason)
            bed = Bed(args.names, prefix=args.prefix).up()
            bed.save()
            for host in bed.hosts.values():
                print(f"{host.name}\t{host.ip}\tip netns exec {host.ns} ...")
        elif args.command == "delay":
            asyncio.run(DelayProxy(args.listen, args.to, args.ms / 1000).serve_forever())
        elif args.command == "down":
            remove_bed(args.prefix)
        else:
            bed = Bed.load(args.prefix)
            if args.command == "status":
                for host in bed.hosts.values():
                    print(f"{host.name}\t{host.ip}\t{host.ns}")
            elif args.command == "block":
                bed.block(args.host, *args.peers)
            elif args.command == "lossy":
                bed.lossy(args.host, args.percent)
            else:
                getattr(bed, args.command)(args.host)
    except BedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
