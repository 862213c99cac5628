"""The shmbus benchmark: shmbus against ``multiprocessing.Queue``, ``Pipe``, faster-fifo and ZeroMQ.

Run it as ``shmbus bench [--quick] [--json PATH|-] [--only NAMES]`` (or
``python benchmarks/run.py``); ``benchmarks/plot.py`` turns the JSON into charts.

Why compare
-----------
shmbus exists to move messages between processes faster than the standard
library does, so a shmbus figure alone says little: every figure is taken for
shmbus *and* for the channels a user would otherwise pick, in the same run, on
the same machine, with the same messages and process layout, and each is
reported as a ratio to ``multiprocessing.Queue`` (``x mp.Queue``: how many
times faster; for latencies, the Queue's latency divided by the other's, so
above 1 is always better). faster-fifo (``faster_fifo.Queue``) and pyzmq
(ZeroMQ ``ipc://`` PUSH/PULL) are measured when installed (``pip install
'shmbus[bench]'``); otherwise their lines say "not installed".

Each measurement uses freshly forked processes and a fresh channel; the parent
only creates the channel, starts the children and collects their reports.

What is measured
----------------
(a) ``single``: small dicts ``{"seq", "ts", "name", "value"}`` sent one at a
    time: messages/s. pyzmq sends each dict msgpack-encoded (the codec shmbus
    uses, so the two differ only in transport); mp.Queue, Pipe and faster-fifo
    pickle, their default. (ZeroMQ's producer closes its socket only once the
    consumer has everything: its LINGER loses the tail of a stream now and
    then, see ``_channels.ZmqChannel``.)
(b) ``batch``: the same dicts in batches of 256: shmbus ``put_many``/
    ``get_many(256)``, faster-fifo ``put_many``/``get_many(max_messages_to_get=256)``.
    The ratio is to mp.Queue sending them one at a time (its only way to send
    256 separate messages). For information, mp.Queue, Pipe and pyzmq also send
    each batch as *one* message, a list of 256 (one pickle or msgpack call).
(c) ``bytes``: 1 MiB messages of bytes: MB/s (10**6 bytes/s). shmbus
    ``put_bytes``/``get_bytes`` (one copy in, one out), and shmbus zero copy:
    the producer fills ``reserve()`` in place, the consumer reads the length and
    tag in place through ``get_view()``. Pipe uses ``send_bytes``/``recv_bytes``,
    faster-fifo raw bytes (identity dumps/loads: the consumer gets a view of its
    receive buffer), pyzmq ``send``/``recv`` with ``copy=False``; mp.Queue can
    only pickle. Every channel first moves 65 untimed 1 MiB messages (one lap of
    the 64 MiB ring): a fresh ring's pages are allocated by the kernel on first
    touch, which costs about 10x the copy and would dominate a short run.
    Two [info] lines repeat shmbus with an 8 MiB ring, which stays in the
    cache (L3) where a 64 MiB one cannot: the ring size matters as much as
    the copy count.
(g) ``memcpy``, in the (c) table: one process copies the same 1 MiB payloads,
    as ``bytes(memoryview)`` (a new object, like ``get_bytes``) and as a slice
    assignment through a memoryview into a 64 MiB and an 8 MiB bytearray at
    rotating offsets (like ring writes): the ceiling; (c) shows each line as
    a % of the fastest of the three.
(d) ``pingpong``: two processes bounce one small dict 20 000 times: p50 and
    p99 of the round trip. shmbus twice: blocking (``spin_us = 0``: always sleep
    on the semaphore) and with its default spin-before-sleep.
(e) ``sizes``: bytes messages of 16 B to 16 MiB (powers of 4) through shmbus
    (``put_bytes``/``get_bytes``, 64 MiB ring), mp.Queue and Pipe
    (``send_bytes``): MB/s and msg/s. The count shrinks as the size grows (a
    fixed volume, within bounds); the same warm-up lap as (c) comes first, in
    messages of the measured size above 1 MiB (large records are placed
    differently, so a 1 MiB lap leaves the pages they use untouched). Each
    size also times the (g) copies of its own size, and each line shows a %
    of the faster: a 16 MiB copy runs at memory speed where 1 MiB stays in
    the cache.
(f) ``mpmc``: 1, 2 or 4 producers and 1, 2 or 4 consumers on one shmbus Queue
    or one mp.Queue, small dicts one at a time: total msg/s, from the first
    post-barrier stamp to the last message received. After every producer has
    reported, the parent puts one ``None`` per consumer, which ends it.
(h) ``scale``: time to create and open a large bus (4 GiB in /dev/shm, 1 GiB
    if less is free) and a 1 MiB one; and the resident memory (``VmRSS``) of a
    fresh ``python`` that imports shmbus, before and after opening a 1 GiB bus
    and putting and getting one small message, with the bus file's allocated
    size.
(t) ``topic``: a Topic publisher publishes the small dicts one at a time with
    0, 1 and 3 subscriber processes reading with ``get_many(256)``: the publish
    rate, the publisher's own CPU per message, each subscriber's receive rate
    and lost count, and each process's share of a CPU (two CPUs shared by up
    to four processes: the share says who waited for one). Then
    ``publish_many`` batches of 256 to one subscriber; ``mp.Queue`` put/get
    one at a time, the row's own baseline (so ``--only t`` compares figures
    taken under the same load); and a ping-pong through two Topics (publish;
    a subscriber answers on the other), default spin. The 1 MiB ring holds
    about 16 000 of these messages, so the run laps it many times: eviction
    (the steady state of a long-lived topic) is included, and a subscriber
    that falls a ring behind loses messages, as it would in use.
(n) ``bridge``: ``shmbus bridge`` end to end, Queue to Queue: the row starts
    its own nats-server (JetStream, file store) and, per measurement, two
    Queues ("hosts" A and B), a stream, and two ``shmbus bridge`` processes
    (``queue-to-stream`` from A, ``stream-to-queue`` into B); a producer
    ``put_many``s small dicts on A, a consumer ``get_many``s them on B and
    checks every ``seq``. One record per NATS message, then batch framing;
    beside them, in the same run, the plain nats-py pair
    (``_natspair.measure_nats_pair``: pipelined publishes, a pull consumer
    acking each message) with as many messages. CPU: the two bridge
    processes (``/proc/<pid>/stat`` around the timed run) and, apart, the
    nats-server's. Without ``nats-server`` on PATH or nats-py: "not installed".

``--quick`` measures the same things as the full run: every count is the
full run's (runs a tenth as long measured other figures: 200 x 1 MiB
gave mp.Queue about 1.5x the rate of 2,000, and shmbus more CPU per
message), each measurement is taken once instead of five (or three) times,
and (e) and (f) run fewer sizes and shapes. Its first line says what it
cannot reproduce; it takes about a minute.

CPU time: each child reads ``getrusage(RUSAGE_SELF)`` user+sys (all of its
threads, so ``mp.Queue``'s feeder thread and ZeroMQ's I/O thread count) around
its timed section, after flushing what it sent, and reports it; the tables
show the CPU microseconds of all the processes per message (per round trip for
(d)). A channel that is fast only because it burns more CPU shows it there.

Timing: once every child is set up (channel opened, payloads built) they meet
at a barrier, so no set-up cost is timed and no sleep is used to synchronise.
Each child stamps ``CLOCK_MONOTONIC``, which is system-wide, so stamps from
different processes compare; a measurement lasts from the earliest
post-barrier stamp to the last consumer's stamp after its last message. The
parent's own clock is not used: on a small machine it may be scheduled late.

Honesty: consumers check every message's ``seq`` (for batches the first and
last of each; for bytes the length and an 8-byte tag; for (f) the count and
the sum of the seqs; for (t) received + lost = published), and the parent
checks their reports again, so a lost, duplicated or reordered message fails
the run instead of inflating it. Every measurement is repeated (five times,
three for (e) and (f); fewer with ``--quick``), rotating the order of the
variants, and the median is reported with the lowest and highest run (all
samples are in the JSON): on a small machine one run can be disturbed by
anything else that runs, which is also why the load average at the start is
shown, and on a virtual machine the placement of the virtual CPUs alone can
move a bulk-copy figure by 2x between runs.

Interrupting: Ctrl-C or SIGTERM stops the run cleanly (children killed and
reaped, buses unlinked, temporary directories removed); see
``_main._on_signal`` for why a child must never unwind through the frames it
inherits.

Layout
------
``_params`` (the workload), ``_channels`` (the transports), ``_roles`` (what
the children run), ``_measure`` (one measurement and its reports),
``_pairs``, ``_rows`` and ``_scale`` (the rows), ``_run`` (the whole run),
``_targets`` and ``_report`` (the output), ``_main`` (the command line).
"""

from __future__ import annotations

from ._main import _parser as _parser  # tests check the docs' bench commands with it
from ._main import main
from ._params import BenchError
from ._report import format_table
from ._run import run

__all__ = ["main", "run", "format_table", "BenchError"]
