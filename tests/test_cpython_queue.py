"""CPython's own queue tests, run against shmbus with only the constructor substituted.

The running interpreter's ``test._test_multiprocessing`` holds the tests of
``multiprocessing.Queue``, ``JoinableQueue`` and ``SimpleQueue``. This module
builds their test classes as that module's ``install_tests_in_module_dict``
does (the test class, then ``ProcessesMixin``, then ``unittest.TestCase``),
once per start method, with ``self.Queue``/``self.JoinableQueue`` and the
``multiprocessing.Queue``/``JoinableQueue``/``SimpleQueue`` attributes (and
the context methods of those names) the tests call directly replaced by
``shmbus.Queue``, ``JoinableQueue`` and ``SimpleQueue``. Nothing else
changes: the tests' processes, events and assertions are the stdlib's.

What runs: ``_TestQueue`` whole, the queue tests of ``_TestProcess``,
``TestSimpleQueue``, and the queue tests of ``TestStartMethod``; under
fork, spawn and forkserver (the three share one test body each, so all
run under all three). ``_TestQueue`` runs a second time under fork with
``JoinableQueue`` as ``Queue`` (a JoinableQueue is a Queue).

What is marked, and why (``EXPECTED``): tests that need what shmbus does
not do by design (pickle arbitrary objects; hand an unpicklable object to
a feeder thread that drops it later; return a tuple as a tuple) are xfail,
strict, with the reason (for a test with subtests, only the subtests that must
fail); tests of the stdlib's own internals are skipped.
The interpreter may ship without its test package: then the module skips.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import multiprocessing.context
import unittest
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import shmbus

tm: Any = pytest.importorskip(
    "test._test_multiprocessing", reason="this Python ships without its test package"
)

METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]

# Test name -> (mark, reason). An xfail is strict (the day it passes, it must be unmarked)
# unless its reason says why not.
EXPECTED: dict[str, tuple[str, str]] = {
    "test_queue_feeder_donot_stop_onexc": (
        "xfail",
        "put of an object msgpack cannot encode raises EncodeError at once and writes nothing; "
        "the stdlib's put returns and its feeder thread drops the object later",
    ),
    "test_queue_feeder_on_queue_feeder_error": (
        "skip",
        "builds multiprocessing.queues.Queue itself to test its feeder thread's error hook: "
        "no shmbus constructor is involved, and shmbus has no feeder thread",
    ),
    "test_closed": ("skip", "inspects the stdlib SimpleQueue's private pipe ends (_reader, _writer)"),
    "test_args_argument": (
        "xfail-subtests",
        "its cases (1,) come back as [1]: msgpack has one array type, so a tuple comes back a list "
        "(the documented conversion); with Codec(unpack_options={'use_list': False}) its [1] case "
        "fails instead. Those subtests must fail (strict); its other cases pass",
    ),
    "test_mixed_startmethod": (
        "xfail",
        "expects a queue made in a fork context to be refused by a spawn child (a SemLock limit); "
        "a shmbus queue works under every start method (test_anonymous.py checks each)",
    ),
}
# For "xfail-subtests": which of the test's subtests (by their parameters) are expected to fail.
FAILING_SUBTESTS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "test_args_argument": lambda params: isinstance(params.get("args"), tuple),
}
# _TestProcess: only its tests that use a queue.
PROCESS_QUEUE_TESTS = [
    "test_args_argument",
    "test_process",
    "test_process_mainthread_native_id",
    "test_close",
    "test_lose_target_ref",
    "test_child_fd_inflation",
]
START_METHOD_QUEUE_TESTS = ["test_mixed_startmethod", "test_nested_startmethod"]
CONSTRUCTORS = {
    "Queue": shmbus.Queue,
    "JoinableQueue": shmbus.JoinableQueue,
    "SimpleQueue": shmbus.SimpleQueue,
}


def _marked(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``f`` wrapped (never the stdlib's function itself) and marked as ``EXPECTED`` says."""

    @functools.wraps(f)
    def test(self: Any, *args: Any, **kwargs: Any) -> Any:
        return f(self, *args, **kwargs)

    mark, reason = EXPECTED[name]
    if mark == "skip":
        return unittest.skip(reason)(test)
    if mark == "xfail-subtests":
        return _failing_subtests(f, FAILING_SUBTESTS[name], reason)
    return pytest.mark.xfail(reason=reason, strict=mark == "xfail")(test)


def _failing_subtests(
    f: Callable[..., Any], failing: Callable[[dict[str, Any]], bool], reason: str
) -> Callable[..., Any]:
    """``f`` with the subtests ``failing`` picks required to fail an assertion (strict), the rest to pass.

    (A whole-test xfail would report each passing subtest as an unexpected pass.)
    """

    @functools.wraps(f)
    def test(self: Any, *args: Any, **kwargs: Any) -> Any:
        real = self.subTest

        @contextlib.contextmanager
        def sub_test(msg: Any = None, **params: Any) -> Iterator[None]:
            with real(msg, **params):
                if not failing(params):
                    yield
                    return
                try:
                    yield
                except AssertionError:
                    return  # the expected failure
                raise AssertionError(f"expected to fail, but passed ({params}): {reason}")

        self.subTest = sub_test
        try:
            return f(self, *args, **kwargs)
        finally:
            # A subtest that failed as expected skipped the test's own cleanup (its child's
            # join, its queue's close): do it, so the queue's semaphores go before the leak check.
            for child in multiprocessing.active_children():
                child.join(30)
            gc.collect()

    return test


_Context = multiprocessing.context.BaseContext


def _as_method(ctor: Callable[..., Any]) -> Callable[..., Any]:
    """A context method (``ctx.Queue(maxsize)``) that calls a shmbus constructor."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return ctor(*args, **kwargs)

    return method


class _Substituted:
    """Runs a test class under one start method with shmbus's constructors in ``multiprocessing``."""

    START_METHOD = "fork"
    _saved: dict[str, Any]
    _saved_ctx: dict[str, Any]
    _old_method: str | None = None

    @classmethod
    def setUpClass(cls) -> None:
        cls._old_method = multiprocessing.get_start_method(allow_none=True)
        multiprocessing.set_start_method(cls.START_METHOD, force=True)
        cls._saved = {name: getattr(multiprocessing, name) for name in CONSTRUCTORS}
        cls._saved_ctx = {name: getattr(_Context, name) for name in CONSTRUCTORS}
        for name, ctor in CONSTRUCTORS.items():
            setattr(multiprocessing, name, ctor)
            setattr(_Context, name, _as_method(ctor))  # get_context("spawn").Queue() too
        super().setUpClass()  # type: ignore[misc]

    def test_the_constructors_are_shmbus(self) -> None:
        """The substitution took: every way these tests make a queue makes a shmbus one."""
        ctx = multiprocessing.get_context()
        for name, ctor in CONSTRUCTORS.items():
            assert getattr(multiprocessing, name) is ctor
            q = getattr(ctx, name)()
            assert type(q) is ctor
            q.close()
        for name in ("Queue", "JoinableQueue"):
            made = getattr(self, name, None)
            if made is not None:
                q = made()
                assert isinstance(q, shmbus.Queue)
                q.close()

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()  # type: ignore[misc]
        finally:
            for name, obj in cls._saved.items():
                setattr(multiprocessing, name, obj)
            for name, obj in cls._saved_ctx.items():
                setattr(_Context, name, obj)
            multiprocessing.set_start_method(cls._old_method, force=True)


def _install(
    name: str, bases: tuple[type, ...], method: str, attrs: dict[str, Any], only: list[str] | None
) -> None:
    ns: dict[str, Any] = {"START_METHOD": method, "__module__": __name__, "__qualname__": name, **attrs}
    for base in bases:
        for attr in dir(base):
            if not attr.startswith("test"):
                continue
            if only is not None and attr not in only:
                ns[attr] = None  # not a queue test: the loader skips a non-callable
            elif attr in EXPECTED:
                ns[attr] = _marked(getattr(base, attr), attr)
    globals()[name] = type(name, (_Substituted, *bases), ns)


_SHMBUS_MIXIN = {
    "Queue": staticmethod(shmbus.Queue),
    "JoinableQueue": staticmethod(shmbus.JoinableQueue),
}
# test_process checks that the child's args tuple comes back equal: the constructor it gets
# asks for tuples back (an option of the constructor, documented in docs/migrating.md).
_TUPLES = shmbus.Codec(unpack_options={"use_list": False})
_TUPLE_MIXIN = {**_SHMBUS_MIXIN, "Queue": staticmethod(functools.partial(shmbus.Queue, codec=_TUPLES))}

for _m in METHODS:
    _M = _m.capitalize()
    _mixin = (tm.ProcessesMixin, unittest.TestCase)
    _install(f"With{_M}ShmbusTestQueue", (tm._TestQueue, *_mixin), _m, _SHMBUS_MIXIN, None)
    _install(f"With{_M}ShmbusTestProcess", (tm._TestProcess, *_mixin), _m, _SHMBUS_MIXIN,
             [t for t in PROCESS_QUEUE_TESTS if t != "test_process"])  # fmt: skip
    _install(
        f"With{_M}ShmbusTuplesTestProcess", (tm._TestProcess, *_mixin), _m, _TUPLE_MIXIN, ["test_process"]
    )
    _install(f"{_M}ShmbusTestSimpleQueue", (tm.TestSimpleQueue,), _m, {}, None)
    if hasattr(tm, "TestStartMethod"):
        queue_tests = [t for t in START_METHOD_QUEUE_TESTS if hasattr(tm.TestStartMethod, t)]
        _install(f"{_M}ShmbusTestStartMethod", (tm.TestStartMethod,), _m, {}, queue_tests)

if "fork" in METHODS:
    _joinable = staticmethod(shmbus.JoinableQueue)
    _install(
        "WithForkShmbusJoinableAsQueueTestQueue", (tm._TestQueue, tm.ProcessesMixin, unittest.TestCase),
        "fork", {"Queue": _joinable, "JoinableQueue": _joinable}, None,
    )  # fmt: skip


def test_every_expected_mark_names_a_test_that_exists() -> None:
    """A renamed or removed CPython test must not leave a mark standing for nothing."""
    classes = (tm._TestQueue, tm._TestProcess, tm.TestSimpleQueue, getattr(tm, "TestStartMethod", object))
    names = {a for c in classes for a in dir(c)}
    # test_mixed_startmethod came in 3.12's backports; older interpreters lack it.
    assert set(EXPECTED) - {"test_mixed_startmethod"} <= names
