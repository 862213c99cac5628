"""shmbus: a fast, pickle-free message bus between processes, through a memory-mapped file.

The public surface is this module alone::

    import shmbus
    q = shmbus.Queue()     # anonymous, as multiprocessing.Queue(); pass it to children
    q.put({"task": 1})
    q.get()                # {'task': 1}

    jobs = shmbus.Queue.create("jobs", capacity="64MiB")   # named: Queue.open("jobs") elsewhere
    jobs.close(); jobs.unlink()
"""

from __future__ import annotations

import contextlib

from . import _accel
from ._codec import Codec as Codec
from ._codec import array_view as array_view
from ._errors import BusClosed as BusClosed
from ._errors import BusExists as BusExists
from ._errors import BusNotFound as BusNotFound
from ._errors import CorruptBus as CorruptBus
from ._errors import DecodeError as DecodeError
from ._errors import Empty as Empty
from ._errors import EncodeError as EncodeError
from ._errors import ForeignBus as ForeignBus
from ._errors import Full as Full
from ._errors import IncompatibleBus as IncompatibleBus
from ._errors import MessageTooLarge as MessageTooLarge
from ._errors import NoSpace as NoSpace
from ._errors import NotABus as NotABus
from ._errors import Overwritten as Overwritten
from ._errors import SequenceAhead as SequenceAhead
from ._errors import ShmbusError as ShmbusError
from ._errors import TooManySubscribers as TooManySubscribers
from ._file import unlink as unlink
from ._format import VERSION as FORMAT_VERSION
from ._mpqueues import JoinableQueue as JoinableQueue
from ._mpqueues import SimpleQueue as SimpleQueue
from ._queue import Queue as Queue
from ._stats import Stats as Stats
from ._subscription import Subscription as Subscription
from ._topic import Topic as Topic
from ._version import __version__ as __version__
from ._zerocopy import Record as Record
from ._zerocopy import RecordBatch as RecordBatch
from ._zerocopy import Reservation as Reservation
from ._zerocopy import View as View

accelerated: bool = _accel.ENABLED
"""True when this process runs the C fast path; if False, ``shmbus doctor`` says why."""

__all__ = [
    "Queue",
    "JoinableQueue",
    "SimpleQueue",
    "Topic",
    "Subscription",
    "Stats",
    "Reservation",
    "View",
    "Record",
    "RecordBatch",
    "Codec",
    "unlink",
    "array_view",
    "FORMAT_VERSION",
    "accelerated",
    "ShmbusError",
    "BusExists",
    "BusNotFound",
    "NotABus",
    "ForeignBus",
    "CorruptBus",
    "IncompatibleBus",
    "MessageTooLarge",
    "EncodeError",
    "DecodeError",
    "BusClosed",
    "TooManySubscribers",
    "SequenceAhead",
    "Overwritten",
    "Empty",
    "Full",
    "NoSpace",
]

# Public names report the public module, so reprs, docs and pickles say ``shmbus.X``.
for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, int):  # (bool is an int)
        with contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = __name__
del _name, _obj
