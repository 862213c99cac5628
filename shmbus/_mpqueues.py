"""The rest of ``multiprocessing``'s queue family: ``JoinableQueue`` and ``SimpleQueue``.

Rule: a ``JoinableQueue``'s unfinished-task count is derived, never stored
on its own: it is ``next_seq - tasks_done``. ``next_seq`` counts the
messages committed, and a put advances it in the very store that commits
(under the head lock, in C or Python), so no put can be visible yet
uncounted, nor counted yet lost, whatever kills the producer. ``task_done``
advances ``tasks_done`` under the tail lock after checking it stays below
``next_seq``. ``join`` polls the two counters (see ``JoinableQueue.join``
for why it polls).
"""

from __future__ import annotations

import time
from typing import Final

from . import _sync
from ._codec import Codec
from ._format import Q_NEXT_SEQ, Q_TASKS_DONE
from ._queue import ANON_CAPACITY, Queue

__all__ = ["JoinableQueue", "SimpleQueue"]

_monotonic = time.monotonic
_POLL_FIRST: Final = 0.0005  # seconds: join's first pause; doubled each time...
_POLL_MAX: Final = 0.02  # ...up to this: join returns at most 20 ms after the last task_done


class JoinableQueue(Queue):
    """A ``Queue`` whose consumers report each message done, so a producer can ``join`` them.

    As ``multiprocessing.JoinableQueue``: every ``put`` adds an unfinished
    task, every ``task_done()`` removes one, ``join()`` waits until none is
    left. The count lives in the bus file, so it holds across processes and
    handles. Create it like a ``Queue``: ``JoinableQueue()`` (anonymous),
    ``JoinableQueue.create(name, ...)``, ``JoinableQueue.open(name)``; open
    as a ``JoinableQueue`` only a queue all of whose consumers call
    ``task_done`` (every message ever put counts).

    A consumer that dies after taking a message and before its
    ``task_done`` leaves that task unfinished for ever, as in
    ``multiprocessing``: ``join()`` then blocks until someone accounts for
    it. ``join(timeout=...)`` is the way out: it returns False when tasks
    are still unfinished at the deadline, and ``unfinished_tasks`` says how
    many; a supervisor that knows a worker's tasks are lost may call
    ``task_done()`` for them.

    Example::

        q = shmbus.JoinableQueue()
        q.put("job")
        q.get(); q.task_done()
        q.join()
    """

    def task_done(self) -> None:
        """Mark one message taken from the queue as done.

        Raises ``ValueError`` when called more times than messages were put
        (as ``multiprocessing`` does), ``BusClosed`` on a closed handle.
        """
        self._check_open()
        if not self._tail_lock.run(None, self._count_done):
            raise ValueError(f"task_done() called too many times on {self.path}")

    def _count_done(self) -> bool:
        """Under the tail lock: one more task done, unless none is unfinished."""
        h = self._h64
        done = h[Q_TASKS_DONE]
        if done >= h[Q_NEXT_SEQ]:
            return False
        h[Q_TASKS_DONE] = done + 1
        return True

    @property
    def unfinished_tasks(self) -> int:
        """Messages put and not yet reported done (a snapshot, for every process)."""
        self._check_open()
        h = self._h64
        done = h[Q_TASKS_DONE]  # first: next_seq only grows, so it is never behind this read
        return max(h[Q_NEXT_SEQ] - done, 0)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every message put has been reported done by ``task_done()``.

        Parameters:
            timeout: seconds to wait at most (None: for ever, as in
                ``multiprocessing``). The deadline runs on the monotonic clock.

        Returns True when no task is unfinished, False if some still were
        at the deadline (see the class docstring for a worker that died
        holding tasks). Raises ``BusClosed`` on a closed handle, and lets a
        signal handler's exception (``KeyboardInterrupt``) out at once.

        It polls the counters, pausing 0.5 ms at first and up to 20 ms:
        a wake-up semaphore would need a post for every joiner, and a joiner
        killed mid-wait would leave posts behind; polling cannot lose a
        wake-up and costs a joiner at most 50 looks a second.
        """
        deadline = _sync.deadline(timeout)
        pause = _POLL_FIRST
        while self.unfinished_tasks:
            if deadline is None:
                time.sleep(pause)
            else:
                left = deadline - _monotonic()
                if left <= 0:
                    return False
                time.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)
        return True


class SimpleQueue(Queue):
    """An anonymous queue with ``multiprocessing.SimpleQueue``'s constructor.

    ``SimpleQueue()`` takes no bound; ``put``, ``get``, ``empty`` and
    ``close`` behave as in ``multiprocessing``, and every ``Queue`` method
    (timeouts, ``qsize``, batches) is there too.

    Parameters:
        capacity: ring size in bytes (keyword-only; default ``"16MiB"``).
        codec: msgpack options for this handle (see ``Codec``).

    Example::

        q = shmbus.SimpleQueue()
        q.put(1)
        assert q.get() == 1 and q.empty()
    """

    def __init__(self, *, capacity: int | str = ANON_CAPACITY, codec: Codec | None = None) -> None:
        super().__init__(0, capacity=capacity, codec=codec)
