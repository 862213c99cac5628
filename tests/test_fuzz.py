"""Corrupt and hostile bus files: every reader either works or raises ``CorruptBus``.

Hypothesis drives the engine in ``fuzzing.py`` (``benchmarks/fuzz.py`` runs the
same cases by the hundred thousand): each case damages a copy of a valid
Queue or Topic file, opens it, reads it without blocking, asks for its
``stats`` and ``check``\\s it. A sound verdict from ``check`` is held to
account too: such a bus must open and hand out exactly the messages
``check`` counted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzzing import Draw, Mutation, Original, build_originals, exercise, gen_mutations, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmbus
from shmbus._check import check

CASES = 200  # per original: three originals, 600 cases


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Original]]:
    """The valid buses' bytes; the buses themselves are already unlinked."""
    yield {o.name: o for o in build_originals(tmp_path_factory.mktemp("originals"))}


@pytest.fixture(scope="module")
def case_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where each mutated copy is written (and removed again by ``exercise``)."""
    return str(tmp_path_factory.mktemp("cases") / "case")


@st.composite
def mutations(draw: st.DrawFn, o: Original) -> list[Mutation]:
    source: Draw = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731 - the engine's integer source
    return gen_mutations(o, source)


def test_the_originals_are_sound_wrapped_and_varied(originals: dict[str, Original], case_path: str) -> None:
    for o in originals.values():
        out = exercise(o, case_path, o.data)
        assert out.failures == [] and out.sound and out.opened, (o.name, out)
        assert out.messages >= 6 and len(o.records) > out.messages  # a wrap marker among the records
    assert not Path(case_path).exists()


@pytest.mark.parametrize("name", ["queue", "queue-maxsize", "topic"])
@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_bus_works_or_raises_corrupt_bus(
    originals: dict[str, Original], case_path: str, name: str, data: st.DataObject
) -> None:
    o = originals[name]
    muts = data.draw(mutations(o), label="mutations")
    out = exercise(o, case_path, mutate(o.data, muts))
    assert out.failures == [], f"{name} with {muts}: {out.failures}"
    assert not Path(case_path).exists()


def test_every_kind_of_outcome_is_reached(originals: dict[str, Original], case_path: str) -> None:
    """The fuzzer is no good if every case is refused at open: some must open, some stay sound."""
    rng = random.Random(7)
    ends = {"refused": 0, "opened": 0, "sound": 0, "read": 0}
    for n in range(300):
        o = list(originals.values())[n % 3]
        out = exercise(o, case_path, mutate(o.data, gen_mutations(o, rng.randint)))
        assert out.failures == []
        ends["sound" if out.sound else "opened" if out.opened else "refused"] += 1
        ends["read"] += out.messages > 0
    assert min(ends.values()) >= 20, ends


def test_a_hostile_header_is_refused_at_the_field_open_and_check_both_name(
    originals: dict[str, Original], case_path: str
) -> None:
    o = originals["queue"]
    capacity_1tib: list[Mutation] = [("static", 3, 1 << 40)]  # crc recomputed: only the checks stop it
    Path(case_path).write_bytes(mutate(o.data, capacity_1tib))
    try:
        with pytest.raises(shmbus.CorruptBus) as e:
            shmbus.Queue.open(case_path)
        (problem,) = check(case_path)
    finally:
        shmbus.unlink(case_path)
    assert problem.offset == e.value.offset == len(o.data) and "truncated" in problem.message
