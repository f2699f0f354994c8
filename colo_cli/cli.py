"""The command line: a click group and its commands.  The only place that exits.

Each command checks its arguments, builds its options object
(``options.ServeOptions``, ``options.ReplayOptions``; the defaults shown
in --help are theirs and ``Config``'s) and calls one ``run``, which
returns the exit status: ``serve.run``, ``replay.run`` (``learn.run`` for
--learn-noise).

Exit status, like diff(1)/cmp(1): 0 same (or a clean stop), 1 divergence
found, 2 trouble (usage, unreadable input, bind/connect failure), 130
interrupted.  Every error is one line on stderr (``errors.ColoError``,
caught in :func:`main`); a traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import click

from . import __version__
from .core import Config
from .errors import EXIT_INTERRUPTED, EXIT_SAME, EXIT_TROUBLE, ColoError, one_line
from .options import ReplayOptions, ServeOptions
from .outputs import Terminated, same_file, silence_stdout, stdout_guard, write_atomically

MIB = 1024 * 1024

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _tune_gc() -> None:
    """Before a long run: the objects made so far (modules, click, rich) are
    moved out of the collector's sight, and young-generation collections
    are made rarer.  The per-frame objects rarely form cycles (a frame's
    object is freed by reference counting when it leaves its queue), while
    full collections scanning every queued frame cost about a fifth of the
    time on the hot path (measured with py-spy on serve, and in-process:
    250k -> 310k UDP pairs/s with the collector off)."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _print_version(ctx, _param, value) -> None:
    # computed only when asked for: importlib.metadata alone costs ~35 ms at
    # every start (a click.version_option's message is built at import)
    if not value or ctx.resilient_parsing:
        return
    click.echo(_version_message())
    ctx.exit()


def _version_message() -> str:
    try:
        from importlib.metadata import version
        dpkt_version = version("dpkt")
    except Exception:  # pragma: no cover - dpkt is a dependency
        dpkt_version = "unknown"
    from ._build import describe
    return (f"colo-compare {__version__} (Python {platform.python_version()}, "
            f"dpkt {dpkt_version}, {describe()})")


@click.group(context_settings=CONTEXT)
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and exit.")
@click.option("--debug", is_flag=True, help="Show a full traceback when something goes wrong.")
@click.pass_context
def cli(ctx, debug):
    """Compare the network output of two replicas packet by packet, the way
    QEMU's COLO colo-compare does, live or from captures.

    \b
    colo-compare serve   live, over QEMU's colo-compare sockets
    colo-compare replay  offline, from two captures (pcap/pcapng)
    colo-compare stats   counters of a running serve, or of a saved report

    Exit status: 0 the replicas match (or a clean stop), 1 they diverge,
    2 trouble (bad usage, unreadable input, socket errors), 130 interrupted.
    Run 'colo-compare COMMAND --help' for each command, or see
    colo-compare(1).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# -- shared options ---------------------------------------------------------------

def comparator_options(f):
    """The comparator's settings, named after QEMU's colo-compare properties."""
    options = [
        click.option("--compare-timeout", "compare_timeout_ms", type=click.IntRange(min=1),
                     default=Config.compare_timeout_ms, show_default=True, metavar="MS",
                     help="A frame queued longer than this raises a checkpoint request "
                          "(QEMU compare_timeout)."),
        click.option("--expired-scan-cycle", "expired_scan_cycle_ms", type=click.IntRange(min=1),
                     default=Config.expired_scan_cycle_ms, show_default=True, metavar="MS",
                     help="How often queued frames are checked for age (QEMU "
                          "expired_scan_cycle; its real default is 1000, not the documented 3000)."),
        click.option("--max-queue-size", type=click.IntRange(min=1), default=Config.max_queue_size,
                     show_default=True, metavar="N",
                     help="Frames queued per connection and side before the connection is "
                          "flushed and a checkpoint requested (QEMU max_queue_size; QEMU drops "
                          "the excess instead)."),
        click.option("--max-connections", type=click.IntRange(min=1),
                     default=Config.max_connections,
                     show_default=True, metavar="N",
                     help="Connections tracked at once; the least recently active one is "
                          "evicted (its frames released) to make room."),
        click.option("--max-queued-mib", type=click.IntRange(min=1),
                     default=Config.max_queued_bytes // MIB,
                     show_default=True, metavar="MIB",
                     help="Memory for queued frames, both sides: their bytes plus 256 bytes "
                          "each of bookkeeping (TCP payload waiting to be compared counts "
                          "twice in RSS), and what flushed datagram flows keep to recognise "
                          "late copies (forgotten first).  Past it, the connections holding "
                          "the oldest frames are flushed (released) and a checkpoint "
                          "requested."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(compare_timeout_ms, expired_scan_cycle_ms, max_queue_size, max_connections,
            max_queued_mib, no_timeout=False, normalize_seq=False, ignore=()):
    return Config(compare_timeout_ms=None if no_timeout else compare_timeout_ms,
                  expired_scan_cycle_ms=expired_scan_cycle_ms,
                  max_queue_size=max_queue_size, max_connections=max_connections,
                  max_queued_bytes=max_queued_mib * MIB,
                  normalize_seq=normalize_seq, ignore=tuple(ignore))


class RuleType(click.ParamType):
    name = "RULE"

    def convert(self, value, param, ctx):
        from .core import RuleError, parse_rule
        if not isinstance(value, str):
            return value
        try:
            return parse_rule(value)
        except RuleError as e:
            self.fail(str(e), param, ctx)


class DurationType(click.ParamType):
    """A time: seconds, or a number with a unit (ns, us, ms, s, m, h);
    converted to integer nanoseconds."""
    name = "TIME"
    _UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
              "min": 60 * 10**9, "h": 3600 * 10**9}

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        import re
        from decimal import Decimal, InvalidOperation
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zµ]*)\s*", str(value))
        unit = m.group(2) or "s" if m else None
        if m is None or unit not in self._UNITS:
            self.fail(f"{value!r} is not a time (e.g. 90, 1.5s, 250ms, 2m)", param, ctx)
        try:
            return int(Decimal(m.group(1)) * self._UNITS[unit])
        except (InvalidOperation, OverflowError, ValueError):
            self.fail(f"{value!r} is not a time (e.g. 90, 1.5s, 250ms, 2m)", param, ctx)


ignore_option = click.option(
    "--ignore", "ignore", type=RuleType(), multiple=True, metavar="RULE",
    help="What legitimately differs between the replicas (repeatable).  Fields: dns.id, "
         "dns.ttl, ntp.timestamps, http.header:NAME, http.date; bytes: udp.checksum, "
         "icmp.checksum, udp:PORT:START-END (of the UDP payload), icmp:START-END (of ICMP "
         "messages), tcp:PORT:/REGEX/ (in the TCP stream).  TCP rules apply to the "
         "reassembled stream.  Named in every report.")


normalize_option = click.option(
    "--normalize-seq", is_flag=True,
    help="Compare TCP in relative sequence numbers, learnt per connection and side from the "
         "handshake (or the first segments): for replicas whose TCP stacks chose their own "
         "ISNs (two captured instances, or no filter-rewriter).")


color_option = click.option("--color", type=click.Choice(["auto", "always", "never"]),
                            default="auto", show_default=True,
                            help="Colour in the output: on a terminal only (auto), or always/never.")


def _debug(ctx, _param, value):
    if value:
        ctx.ensure_object(dict)["debug"] = True


#: --debug after the subcommand too (the error message says to rerun with it)
debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_debug,
                            is_eager=True,
                            help="Show a full traceback when something goes wrong (also "
                                 "accepted before the command).")


class HexdumpCount(click.ParamType):
    """``--hexdump N``: how many miscompares get a hexdump; ``all`` (or the
    option alone): every one."""
    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "all":
            return None
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'all'", param, ctx)
        if n < 0:
            self.fail(f"{n} is negative (0 shows none)", param, ctx)
        return n


def hexdump_option(default: int, what: str):
    return click.option("--hexdump", "hexdump_limit", type=HexdumpCount(), default=str(default),
                        is_flag=False, flag_value="all", show_default=True, metavar="[N|all]",
                        help=f"Show hexdumps of the first N miscompares {what}, with the "
                             "differing bytes marked and what differs in protocol terms "
                             "(0: none; 'all' or no N: every one).")


#: a capture or report argument: completed as a file name by the shell
def _file_argument(name: str, metavar: str, **kw):
    return click.argument(name, metavar=metavar, type=click.Path(readable=False, allow_dash=True),
                          **kw)


# -- replay -----------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@_file_argument("primary", "PRIMARY")
@_file_argument("secondary", "SECONDARY")
@comparator_options
@normalize_option
@ignore_option
@click.option("--learn-noise", is_flag=True,
              help="The captures are known to be equivalent: find the noise rules that would "
                   "remove their checkpoints (replaying them several times), and whether "
                   "--normalize-seq is needed; print each with the checkpoints it avoids.")
@click.option("--no-timeout", is_flag=True,
              help="Never raise timeout checkpoints (for captures whose clocks drift apart).")
@click.option("--hold", is_flag=True,
              help="Hold diverged connections until the end instead of checkpointing at once "
                   "(then only the first divergence of each connection is found).")
@click.option("--vnet-hdr-len", type=click.IntRange(0, 20), default=ReplayOptions.vnet_hdr_len,
              show_default=True,
              metavar="BYTES",
              help="Every captured frame starts with a virtio-net header of this many bytes "
                   "(a filter-dump of a vnet netdev): kept, not compared.")
@click.option("--direction", type=click.Choice(["out", "in", "any"]),
              default=ReplayOptions.direction,
              show_default=True,
              help="Of captures that record which way a packet went (Linux cooked, as "
                   "tcpdump -i any writes), compare what the captured host sent (out), what "
                   "it received (in), or both (any).  Other captures are compared whole.")
@click.option("--filter", "filter_expr", metavar="EXPR",
              help="Compare only the frames this tcpdump/pcap-filter(7) expression matches, "
                   "in both captures (compiled and run by libpcap), e.g. 'tcp port 80'.")
@click.option("--start", "start_ns", type=DurationType(), metavar="TIME",
              help="Compare only what each capture holds from TIME after its own first frame "
                   "on (seconds, or with a unit: 250ms, 2m).")
@click.option("--end", "end_ns", type=DurationType(), metavar="TIME",
              help="Compare only what each capture holds before TIME after its own first frame.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (version 2, described by its JSON Schema and in "
                   "colo-compare-replay(1)) instead of the report.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Write every primary frame, in the order it would have left, in the "
                   "primary's format and link type (a pcap for a pcap; a pcapng for a pcapng).")
@click.option("--diverged", "diverged_path", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE",
              help="Write the primary frames that left without a match (flushed at a "
                   "checkpoint, by a limit, or at the end), like --out.")
@click.option("--evidence", "evidence_path", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE.pcapng",
              help="Write every miscompared pair to a pcapng that opens in Wireshark: two "
                   "interfaces, 'primary' and 'secondary', and on each frame a comment naming "
                   "the cause, the flow and the stream offset.")
@hexdump_option(ReplayOptions.hexdump, "in the report")
@click.option("-q", "--quiet", is_flag=True,
              help="Print no report; only the exit status tells (warnings about damaged "
                   "captures, and errors, still go to stderr).")
@click.option("-v", "--verbose", is_flag=True,
              help="Also print every setting, and every miscompare in a line of its own.")
@color_option
@debug_option
@click.pass_context
def replay(ctx, primary, secondary, compare_timeout_ms, expired_scan_cycle_ms, max_queue_size,
           max_connections, max_queued_mib, normalize_seq, ignore, learn_noise, no_timeout, hold, vnet_hdr_len,
           direction, filter_expr, start_ns, end_ns, as_json, out_path,
           diverged_path, evidence_path, hexdump_limit, quiet, verbose, color):
    """Compare two captures offline, making the decisions colo-compare would
    make live.

    PRIMARY and SECONDARY are pcap or pcapng files, gzip- or
    zstd-compressed or not (read from the file, not its name): QEMU
    filter-dump or tcpdump captures of what each replica sent.  '-' reads
    one of them from stdin.  Link types: Ethernet, Linux cooked (SLL, SLL2:
    tcpdump -i any), raw IP, BSD loopback; compared from the IP layer.

    Each capture's own timestamps drive the clock, relative to its first
    packet.  A checkpoint request is answered at once, on the connection
    that raised it: its queued primary frames leave, its comparison starts
    afresh, and each later divergence is reported on its own (--hold holds
    it to the end instead).

    \b
    Exit status: 0 the captures match, 1 they diverge (a miscompare or an
    unmatched frame), 2 trouble.

    \b
    Examples:
      colo-compare replay primary.pcap secondary.pcap
      colo-compare replay --json --no-timeout a.pcapng b.pcapng > report.json
      colo-compare replay --filter 'tcp port 80' --start 10s a.pcap.gz b.pcapng.zst
    """
    if primary == "-" and secondary == "-":
        raise click.UsageError("only one of PRIMARY and SECONDARY can be '-' (stdin)")
    outputs = [(opt, path) for opt, path in (("--out", out_path), ("--diverged", diverged_path),
                                             ("--evidence", evidence_path)) if path]
    for i, (opt, path) in enumerate(outputs):
        if path == "-":
            if opt != "--out":
                raise click.UsageError(f"{opt} cannot be '-': only --out writes to stdout")
            if as_json:
                raise click.UsageError("--json and --out - would both write to stdout")
            continue
        for given in (primary, secondary):
            if given != "-" and same_file(path, given):
                raise click.UsageError(f"{opt} {path} is an input capture: it would be overwritten")
        for other_opt, other in outputs[:i]:
            if other != "-" and same_file(path, other):
                raise click.UsageError(f"{other_opt} and {opt} are the same file ({path}): "
                                       "one would overwrite the other")
    if start_ns is not None and end_ns is not None and end_ns <= start_ns:
        raise click.UsageError("--end must come after --start")
    if learn_noise and "-" in (primary, secondary):
        raise click.UsageError("--learn-noise reads the captures several times: not from stdin")
    options = ReplayOptions(
        primary=primary, secondary=secondary,
        config=_config(compare_timeout_ms, expired_scan_cycle_ms, max_queue_size,
                       max_connections, max_queued_mib, no_timeout, normalize_seq, ignore),
        hold=hold, vnet_hdr_len=vnet_hdr_len,
        direction=None if direction == "any" else direction, filter_expr=filter_expr,
        start_ns=start_ns, end_ns=end_ns, out_path=out_path, diverged_path=diverged_path,
        evidence_path=evidence_path, as_json=as_json, hexdump=hexdump_limit,
        verbose=-1 if quiet else (1 if verbose else 0), color=color)
    if learn_noise:
        from .learn import run
    else:
        from .replay import run
    _tune_gc()
    ctx.exit(run(options))


# -- serve ------------------------------------------------------------------------

class EndpointType(click.ParamType):
    name = "EP"

    def convert(self, value, param, ctx):
        from .endpoints import parse_endpoint
        if not isinstance(value, str):
            return value
        try:
            return parse_endpoint(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


ENDPOINT = EndpointType()


class ListenType(click.ParamType):
    """HOST:PORT to listen on (metrics_http.parse_listen)."""
    name = "HOST:PORT"

    def convert(self, value, param, ctx):
        from .metrics_http import parse_listen
        if isinstance(value, tuple):
            return value
        try:
            return parse_listen(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _config_option(f):
    from .config import config_option
    return config_option(f)


@cli.command(context_settings=CONTEXT)
@_config_option
@click.option("--primary-in", required=True, type=ENDPOINT, metavar="EP",
              help="Where the primary's output arrives (QEMU primary_in).")
@click.option("--secondary-in", required=True, type=ENDPOINT, metavar="EP",
              help="Where the secondary's output arrives (QEMU secondary_in).")
@click.option("--outdev", required=True, type=ENDPOINT, metavar="EP",
              help="Where released primary frames go (QEMU outdev).")
@click.option("--notify-dev", type=ENDPOINT, metavar="EP",
              help="Xen's COLO channel (QEMU notify_dev): DO_CHECKPOINT goes out on it, "
                   "COLO_CHECKPOINT and COLO_USERSPACE_PROXY_INIT come in.")
@comparator_options
@click.option("--vnet-hdr-support", is_flag=True,
              help="Records carry a vnet header length word and a virtio-net header, as "
                   "with QEMU's vnet_hdr_support=on; every peer must agree.")
@normalize_option
@ignore_option
@click.option("--qmp", type=ENDPOINT, metavar="EP",
              help="The primary QEMU's QMP monitor (a -qmp of its own for serve): "
                   "checkpoints are asked of QEMU's COLO there, and seen there "
                   "(STOP ... RESUME).")
@click.option("--qmp-checkpoint-timeout", "qmp_checkpoint_timeout_ms",
              type=click.FloatRange(min=0, min_open=True),
              default=ServeOptions.qmp_checkpoint_timeout_ms, show_default=True,
              metavar="MS",
              help="With --qmp: when QEMU has not resumed this long after a checkpoint "
                   "request (a failed checkpoint never does), the held frames are released "
                   "locally, counted and logged.")
@click.option("--checkpoint-policy", type=click.Choice(["release", "hold", "qmp"]), default=None,
              help="What a checkpoint request does.  release: checkpoint at once, locally, "
                   "the connection that raised it (the primary wins: its held frames are "
                   "released, the divergence recorded).  "
                   "hold: hold until COLO_CHECKPOINT arrives on --notify-dev or 'checkpoint' "
                   "on --control, as QEMU does.  qmp: hold, ask QEMU's COLO for a checkpoint "
                   "on --qmp, release at its RESUME; release while QEMU is not in COLO "
                   "state.  [default: hold with --notify-dev, qmp with --qmp, else release]")
@click.option("--control", "control_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Create a control socket (owner-only) for 'colo-compare stats' and for "
                   "checkpoints on demand.")
@click.option("--events", "events_path", metavar="FILE",
              help="Append one JSON line per release-affecting event (miscompare, checkpoint "
                   "request, checkpoint, bypass, drop, input error; with --qmp QEMU's "
                   "checkpoints and the fallbacks) to FILE ('-': stdout).")
@hexdump_option(ServeOptions.hexdump, "on stderr")
@click.option("--hexdump-rate", type=click.IntRange(min=1),
              default=ServeOptions.hexdumps_per_minute, show_default=True,
              metavar="N", help="At most N hexdumps a minute (the rest are counted).")
@click.option("--outdev-buffer", "outdev_buffer_mib", type=click.IntRange(min=1),
              default=ServeOptions.outdev_buffer_bytes // MIB,
              show_default=True, metavar="MIB",
              help="Released frames waiting for a slow or absent outdev are buffered up to "
                   "this many MiB, in order; past it new ones are dropped, counted and "
                   "reported.  Inputs are read whatever outdev does.")
@click.option("--connect-timeout", type=click.FloatRange(min=0),
              default=ServeOptions.connect_timeout_s,
              show_default=True, metavar="SECONDS",
              help="Give up (exit 2) when a connecting endpoint has never connected after "
                   "this long; 0 waits forever.  Once connected, lost peers are reconnected "
                   "without limit.")
@click.option("--drain-timeout", type=click.FloatRange(min=0),
              default=ServeOptions.drain_timeout_s, show_default=True,
              metavar="SECONDS",
              help="On SIGINT/SIGTERM, how long to wait for outdev to take the frames "
                   "released at shutdown.")
@click.option("--busy-poll-us", type=click.IntRange(min=0, max=1_000_000),
              default=ServeOptions.busy_poll_us, show_default=True, metavar="MICROSECONDS",
              help="While packets come closer together than this, poll the sockets for up "
                   "to this long before sleeping: on a virtual machine a wake-up from sleep "
                   "costs tens of microseconds per packet.  Costs CPU while traffic is that "
                   "dense (up to one core); 0 always sleeps at once.")
@click.option("--metrics-listen", type=ListenType(), metavar="HOST:PORT",
              help="Serve /metrics over HTTP in the Prometheus text format on HOST:PORT "
                   "(127.0.0.1:9464, [::1]:9464, or :9464 for every interface), for a "
                   "Prometheus server to scrape.")
@click.option("-v", "--verbose", is_flag=True, help="Also report connections and settings.")
@click.option("-q", "--quiet", is_flag=True, help="Report only errors.")
@color_option
@debug_option
def serve(primary_in, secondary_in, outdev, notify_dev, compare_timeout_ms,
          expired_scan_cycle_ms, max_queue_size, max_connections, max_queued_mib, vnet_hdr_support,
          normalize_seq,
          ignore, qmp, qmp_checkpoint_timeout_ms, checkpoint_policy, control_path, events_path,
          hexdump_limit, hexdump_rate, outdev_buffer_mib, connect_timeout, drain_timeout,
          busy_poll_us, metrics_listen, verbose, quiet, color):
    """Compare live, in place of QEMU's -object colo-compare.

    Frames arrive on --primary-in and --secondary-in in QEMU's socket
    framing (a 4-byte big-endian length, and with --vnet-hdr-support a
    vnet header length word).  A primary frame goes to --outdev once the
    secondary sent the same; a divergence, or a secondary later than
    --compare-timeout, raises a checkpoint request.  With --qmp on the
    primary QEMU's own QMP monitor, the request is asked of QEMU's COLO and
    the held frames leave at its RESUME, as with QEMU's colo-compare.

    \b
    Endpoints use QEMU's chardev syntax:
      tcp:HOST:PORT          connect (reconnect when lost)
      tcp:HOST:PORT,server   listen; a new peer replaces the old one
      unix:PATH              connect to a unix socket
      unix:PATH,server       listen on a unix socket

    Runs until SIGINT or SIGTERM, then releases every queued primary frame
    to outdev and exits 0.  Exit status 2: bad options, or an endpoint that
    cannot listen or never connects.

    Every option can come from a TOML file (--config FILE), the command line
    winning.  Under systemd (Type=notify) serve says when it is ready, when
    it stops, and keeps the watchdog fed; contrib/colo-compare@.service runs
    one instance per protected NIC.

    \b
    Example (the roles of QEMU's COLO wiring):
      colo-compare serve --primary-in unix:/run/colo/compare0.sock \\
          --secondary-in unix:/run/colo/compare1.sock,server \\
          --outdev unix:/run/colo/compare_out.sock --control /run/colo/ctl \\
          --qmp unix:/run/colo/serve-qmp.sock
    """
    from .serve import run

    names = [("--primary-in", primary_in), ("--secondary-in", secondary_in), ("--outdev", outdev)]
    if notify_dev is not None:
        names.append(("--notify-dev", notify_dev))
    if qmp is not None:
        names.append(("--qmp", qmp))
        if notify_dev is not None:
            raise click.UsageError("--qmp (QEMU's COLO) and --notify-dev (Xen's) cannot be "
                                   "used together")
        if checkpoint_policy not in (None, "qmp"):
            raise click.UsageError(f"--qmp works with --checkpoint-policy qmp, not "
                                   f"{checkpoint_policy}")
    elif checkpoint_policy == "qmp":
        raise click.UsageError("--checkpoint-policy qmp needs --qmp (the primary QEMU's QMP "
                               "monitor)")
    seen = {}
    for name, ep in names:
        where = (ep.kind, ep.address)
        if where in seen:
            raise click.UsageError(f"{name} and {seen[where]} are the same endpoint ({ep})")
        seen[where] = name
    config = _config(compare_timeout_ms, expired_scan_cycle_ms, max_queue_size, max_connections,
                     max_queued_mib,
                     normalize_seq=normalize_seq, ignore=ignore)
    options = ServeOptions(primary_in=primary_in, secondary_in=secondary_in, outdev=outdev,
                           notify_dev=notify_dev, config=config, qmp=qmp,
                           qmp_checkpoint_timeout_ms=qmp_checkpoint_timeout_ms,
                           vnet_hdr_support=vnet_hdr_support,
                           checkpoint_policy=checkpoint_policy, control_path=control_path,
                           events_path=events_path, hexdump=hexdump_limit,
                           hexdumps_per_minute=hexdump_rate, color=color,
                           outdev_buffer_bytes=outdev_buffer_mib * MIB,
                           connect_timeout_s=connect_timeout, drain_timeout_s=drain_timeout,
                           busy_poll_us=busy_poll_us,
                           verbose=-1 if quiet else (1 if verbose else 0),
                           debug=bool((click.get_current_context().obj or {}).get("debug")),
                           metrics_listen=metrics_listen)
    _tune_gc()
    sys.exit(run(options))


# -- stats ------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@_file_argument("report", "[REPORT.json]", required=False)
@click.option("--control", "control_path", metavar="PATH", envvar="COLO_COMPARE_CONTROL",
              help="The control socket of a running 'colo-compare serve --control PATH' "
                   "(or $COLO_COMPARE_CONTROL).")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "prometheus"]),
              default="table", show_default=True,
              help="table: for people; json: one versioned document; prometheus: text "
                   "exposition for Prometheus or node_exporter's textfile collector.")
@click.option("--watch", type=float, is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]",
              help="Refresh every SECONDS (default 2) until Ctrl-C, which ends the watch with "
                   "exit status 0.")
@click.option("--top", type=click.IntRange(0, 1000), default=10, show_default=True, metavar="N",
              help="How many connections to list by miscompares and by hold time.")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write to FILE instead of stdout, atomically (a scraper never sees half a "
                   "file): e.g. node_exporter's textfile directory with --format prometheus.")
@click.option("-q", "--quiet", is_flag=True,
              help="Print nothing: the exit status alone says whether serve answered (or the "
                   "report could be read).")
@click.option("-v", "--verbose", is_flag=True,
              help="Also show the hold-time histogram: cumulative counts by bucket bound, in "
                   "seconds.")
@color_option
@debug_option
def stats(report, control_path, as_json, fmt, watch, top, output_path, quiet, verbose, color):
    """Show what a running serve is doing, or what a replay found.

    With --control PATH, asks a running 'colo-compare serve' for its
    counters: frames in and out, released, bypassed and dropped frames by
    reason, miscompares by protocol and cause, checkpoint requests by cause,
    connections, queue depths, and how long primary frames were held
    (p50/p90/p99/max); then its endpoints and the connections with the most
    miscompares and the longest holds.  With REPORT.json (from 'replay
    --json'), the same view of that replay.

    \b
    Exit status: 0 on success, 2 when there is nothing to ask (no socket, or
    nothing listening, permission denied, an unreadable or incompatible
    report).

    \b
    Examples:
      colo-compare stats --control /run/colo/ctl
      colo-compare stats --control /run/colo/ctl --watch 1
      colo-compare stats --control /run/colo/ctl --format prometheus \\
          -o /var/lib/node_exporter/textfile/colo.prom
      colo-compare replay --json a.pcap b.pcap > r.json; colo-compare stats r.json
    """
    from .control import query
    from .metrics import TOP_MAX, from_serve, prometheus, read_report
    from .render import make_console, print_stats, watch_stats

    if as_json:
        fmt = "json"
    if report and control_path:
        raise click.UsageError("give either REPORT.json or --control PATH, not both")
    if not report and not control_path:
        raise click.UsageError("give REPORT.json, or --control PATH for a running serve")
    if watch is not None and (report or fmt != "table" or output_path):
        raise click.UsageError("--watch shows a running serve's table on the terminal")
    if watch is not None and watch <= 0:
        raise click.UsageError("--watch SECONDS must be positive")
    if quiet and (watch is not None or output_path):
        raise click.UsageError("-q prints nothing: not with --watch or --output")

    def fetch() -> dict:
        if report:
            return read_report(report)
        # one more than shown: whether the lists go on
        return from_serve(query(control_path, {"cmd": "stats", "top": min(top + 1, TOP_MAX)}), top)

    if watch is not None:
        try:
            watch_stats(fetch, watch, color=color, verbose=verbose)
        except KeyboardInterrupt:
            return          # Ctrl-C ends a watch: exit status 0
    doc = fetch()
    if quiet:
        return
    if fmt == "json":
        text = json.dumps(doc, indent=1) + "\n"
    elif fmt == "prometheus":
        text = prometheus(doc)
    else:
        text = None
    if output_path:
        if text is None:
            import io
            buf = io.StringIO()
            print_stats(make_console(buf, color="never"), doc, verbose=verbose)
            text = buf.getvalue()
        write_atomically(output_path, text)
        return
    with stdout_guard():
        if text is not None:
            click.echo(text, nl=False)
        else:
            print_stats(make_console(color=color), doc, verbose=verbose)


# -- completion ---------------------------------------------------------------------

COMPLETE_VAR = "_COLO_COMPARE_COMPLETE"


@cli.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@debug_option
def completion(shell):
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(colo-compare completion bash)"     (in ~/.bashrc)
    zsh:   eval "$(colo-compare completion zsh)"      (in ~/.zshrc)
    fish:  colo-compare completion fish > ~/.config/fish/completions/colo-compare.fish
    """
    from click.shell_completion import get_completion_class
    comp = get_completion_class(shell)(cli, {}, "colo-compare", COMPLETE_VAR)
    with stdout_guard():
        click.echo(comp.source())


# -- entry point --------------------------------------------------------------------

def main(argv=None) -> None:
    """Console-script entry: run the CLI and turn every failure into one line.

    The context is made and invoked here rather than through click's
    ``main``, whose own handling would turn Ctrl-C into a blank line and a
    closed stdout into exit status 1."""
    instruction = os.environ.get(COMPLETE_VAR)
    if instruction and argv is None:
        # the shell asking for completions (see 'colo-compare completion')
        from click.shell_completion import shell_complete
        sys.exit(shell_complete(cli, {}, "colo-compare", COMPLETE_VAR, instruction))
    args = [a if isinstance(a, str) else os.fspath(a)
            for a in (sys.argv[1:] if argv is None else argv)]
    debug = "--debug" in args
    try:
        with cli.make_context("colo-compare", args) as ctx:
            cli.invoke(ctx)
        rc = EXIT_SAME
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        rc = EXIT_SAME
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "colo-compare"
        click.echo(one_line(f"{cmd}: {e.format_message()} (see '{cmd} --help')"), err=True)
        rc = EXIT_TROUBLE
    except click.exceptions.Exit as e:
        rc = e.exit_code
    except (click.Abort, KeyboardInterrupt) as e:
        click.echo("colo-compare: interrupted", err=True)
        rc = 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except ColoError as e:
        if debug:
            import traceback
            traceback.print_exc()
        click.echo(one_line(f"colo-compare: {e}"), err=True)
        rc = e.exit_status
    except click.ClickException as e:
        click.echo(one_line(f"colo-compare: {e.format_message()}"), err=True)
        rc = e.exit_code
    except BrokenPipeError:
        silence_stdout()
        rc = EXIT_SAME
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        click.echo(one_line(f"colo-compare: internal error: {type(e).__name__}: {e} "
                             "(rerun with --debug for a traceback, and please report it)"),
                   err=True)
        rc = EXIT_TROUBLE
    sys.exit(rc if isinstance(rc, int) else EXIT_SAME)


if __name__ == "__main__":  # pragma: no cover
    main()
