"""What a crash or a reboot leaves to mend, and the sweep that mends it.

Rule: this module owns *what* is mended; ``_recovery`` owns the mechanisms it
drives (``Lock``, which notices a dead holder and calls a repair hook, and
``Participant``, which tells a dead process's slot from a live one). So:

* ``resync``: the ring's counters read back from the records. Writers store
  ``head``/``next_seq`` and ``tail``/``tail_seq`` one at a time; a writer killed
  between two stores leaves them apart, and the records carry the truth.
* ``count_recovery``: a finished lock repair, counted in the header.
* ``sweep`` (``Bus.recover``): repair each free lock still marked for it, then
  give back what dead participants held besides locks.
* ``check_locks``: refuse damaged lock bytes at open, and reset locks written
  in an earlier boot, whose holders no kernel will ever mark dead.
* ``make_locks``: a bus kind's ``Lock`` objects, bound to its repair hook.

The bus kinds (``Queue``, ``Topic``) say what a repair means for them
(``_repair``, ``_reap`` hooks); this module calls them at the right moment.
"""

from __future__ import annotations

import logging
import mmap
import time
import weakref
from typing import Callable

from . import _mutex, _recovery, _ring
from ._errors import CorruptBus
from ._format import (
    BOOT_ID,
    LOCKS,
    Q_HEAD,
    Q_LAST_RECOVERY,
    Q_NEXT_SEQ,
    Q_RECOVERIES,
    Q_TAIL,
    Q_TAIL_SEQ,
    U64_MAX,
    current_boot_id,
)

__all__ = ["resync", "count_recovery", "sweep", "check_locks", "make_locks"]

log = logging.getLogger("shmbus")


def resync(
    h: memoryview, ring: memoryview, cap: int, path: str, *, fix_next: bool, gaps: bool = False,
    own_tail: bool = True,
) -> None:  # fmt: skip
    """Rebuild ``tail_seq`` (and with ``fix_next``, ``next_seq`` and an interrupted rebase).

    The records themselves carry their sequence numbers, so the counters are
    read back from them. The caller holds (or has inherited from the dead)
    the locks guarding what it fixes. Without ``own_tail`` (a Queue
    producer's repair, which does not hold the tail lock) ``tail_seq`` is left
    to the consumers: the records from a snapshot of ``tail`` to ``head``
    cannot change under us, since only a producer overwrites records and we
    hold the producer lock. With ``gaps`` (a Topic) a sequence number handed
    out by a writer that died is skipped, never reused: a subscriber that saw
    it counts it as lost instead of missing a message.
    """
    head, tail = h[Q_HEAD], h[Q_TAIL]
    if fix_next and tail > head and tail - head <= cap:
        h[Q_HEAD] = head = tail  # a rebase moved tail, then died before moving head
    try:
        _ring.check_positions(head, tail, cap)
        if tail < head:
            if own_tail:
                h[Q_TAIL_SEQ] = _ring.read(ring, cap, tail, head)[2]
            if fix_next:
                last = _ring.last_seq(ring, cap, tail, head)
                assert last is not None
                if last >= U64_MAX:  # a damaged record: next_seq cannot follow it
                    raise CorruptBus(f"a record in the ring has sequence number {last}, a u64's last")
                h[Q_NEXT_SEQ] = max(h[Q_NEXT_SEQ], last + 1) if gaps else last + 1
        elif fix_next:
            if gaps and own_tail:
                h[Q_TAIL_SEQ] = h[Q_NEXT_SEQ]
            else:
                h[Q_NEXT_SEQ] = h[Q_TAIL_SEQ]
    except CorruptBus as e:
        log.warning("%s: cannot resync counters after a crash: %s", path, e)


def count_recovery(h: memoryview) -> None:
    """A lock's repair is done: count it (a statistic: wraps) and note when."""
    h[Q_RECOVERIES] = (h[Q_RECOVERIES] + 1) & U64_MAX
    h[Q_LAST_RECOVERY] = time.time_ns()


def sweep(
    path: str, locks: tuple[_recovery.Lock, ...], recovery: _mutex.Mutex, part: _recovery.Participant,
    reap: Callable[[int], None], force: bool,
) -> int:  # fmt: skip
    """``Bus.recover``'s work: mend free locks, free what dead participants held; return how many died.

    ``recovery`` is the recovery mutex, ``reap(slot)`` the bus kind's hook
    that gives back what a dead participant held besides locks.
    """
    if force:
        for lk in locks:
            if lk.force_reset():
                log.warning("%s: the %s lock was re-initialized by force", path, lk.role)
        if recovery.ghost() or recovery.unrecoverable():
            recovery.reset()  # it guards no counters: nothing to mend after it
            log.warning("%s: the recovery lock was re-initialized by force", path)
    for lk in locks:
        tid, died, pending = lk.state()
        if (died or (pending and not tid)) and not lk.owned():
            try:
                lk.try_acquire()  # taking it runs the repair
            finally:
                lk.release()
    dead = part.under_recovery_lock(_reap_dead, path, part, reap)
    return 0 if dead is _recovery.NOT_TAKEN else dead


def _reap_dead(path: str, part: _recovery.Participant, reap: Callable[[int], None]) -> int:
    """Under the recovery mutex: give back what dead participants held, free their slots."""
    dead = part.dead_slots()
    if not dead:
        return 0
    pids = [part.pid_of(slot) for slot in dead]
    for slot in dead:
        reap(slot)
        part.free(slot)
    log.warning("%s: freed what dead process(es) %s held", path, pids)
    return len(dead)


def check_locks(
    path: str, mm: mmap.mmap, h32: memoryview, kind: int, mutexes: dict[str, _mutex.Mutex],
    part: _recovery.Participant,
) -> None:  # fmt: skip
    """Refuse damaged lock bytes; re-initialize locks left from an earlier boot.

    A lock word is only meaningful in the boot that wrote it: a disk bus
    whose machine crashed may hold a lock word naming a thread of the last
    boot, which no kernel will ever mark dead. The first opener in a new
    boot resets the mutexes (under the boot byte, so once) and stores
    the boot id; nobody of the old boot can still be using them.
    """
    for role, m in mutexes.items():
        if not m.kind_ok():
            raise CorruptBus(
                f"{path}: the {role} lock's bytes are damaged: run `shmbus check {path}`, "
                "then remove the bus with `shmbus rm` and create it again",
                path=path,
            )
    boot = current_boot_id()
    if boot == b"\0" * 16 or mm[BOOT_ID : BOOT_ID + 16] == boot:
        return
    with part.boot_lock() as held:
        if held and mm[BOOT_ID : BOOT_ID + 16] != boot:
            log.warning("%s: last used in an earlier boot; resetting its locks", path)
            for m in mutexes.values():
                m.reset()
            # A holder may have been cut off mid-section by the crash: the
            # next holder of each lock checks the counters.
            for _, _, repair in LOCKS[kind]:
                h32[repair] = 1
            mm[BOOT_ID : BOOT_ID + 16] = boot


def make_locks(
    path: str, kind: int, mutexes: dict[str, _mutex.Mutex], h32: memoryview, h64: memoryview,
    repair: Callable[[str], bool],
) -> tuple[_recovery.Lock, ...]:
    """A bus kind's locks, in ``LOCKS`` order (the head lock first), calling ``repair(role)`` to mend.

    ``repair`` is held through a weak reference (pass a bound method): a
    reference cycle would keep a dropped handle alive until the cyclic
    collector runs, and an anonymous queue is removed when its handle goes.
    """
    ref = weakref.WeakMethod(repair)

    def repair_once(role: str) -> bool:
        hook = ref()
        return hook is not None and hook(role)

    def counted() -> None:
        count_recovery(h64)

    return tuple(
        _recovery.Lock(role, path, mutexes[role], h32, idx, repair_once, counted)
        for role, _, idx in LOCKS[kind]
    )
