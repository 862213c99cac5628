"""The benchmark's size sweep (e): its warm-up lap and its share of a memcpy of the same size."""

from __future__ import annotations

from shmbus._bench._params import MIB, params_for
from shmbus._bench._roles import warmup_lap
from shmbus._bench._rows import SWEEP_MEMCPY, SWEEP_TRANSPORTS, _stream_summary
from shmbus._bench._targets import evaluate_targets


def test_the_warm_up_lap_is_in_messages_of_the_measured_size_when_larger() -> None:
    p = params_for(quick=True)
    lap = p.bytes_warmup * MIB
    assert warmup_lap(p, 16) == (MIB, p.bytes_warmup)  # small sizes: the 1 MiB lap, as before
    assert warmup_lap(p, MIB) == (MIB, p.bytes_warmup)
    for size in (4 * MIB, 16 * MIB, 3 * MIB + 5):
        warm, count = warmup_lap(p, size)
        assert warm == size
        assert count * size >= lap > (count - 1) * size  # at least one ring's lap, no more


def _samples(mb_per_s: dict[str, float]) -> dict[str, list[dict[str, float]]]:
    return {t: [{"msg_per_s": v, "mb_per_s": v, "cpu_us_per_msg": 1.0}] for t, v in mb_per_s.items()}


def test_each_size_is_a_share_of_the_faster_copy_of_that_size() -> None:
    rates = dict.fromkeys(SWEEP_TRANSPORTS, 100.0)
    rates |= {"shmbus": 300.0, "memcpy new": 400.0, "memcpy into": 500.0}
    out = _stream_summary(_samples(rates))
    assert out["memcpy"]["mb_per_s"] == 500.0
    assert set(out["transports"]) == set(SWEEP_TRANSPORTS)  # the copies are no transport
    assert out["transports"]["shmbus"]["% of memcpy"] == 60.0
    assert out["transports"]["shmbus"]["x mp.Queue"] == 3.0
    assert set(out["memcpy"]) == {"mb_per_s", *SWEEP_MEMCPY}


def test_the_large_size_targets_read_the_sweep_and_wait_for_the_sizes_run() -> None:
    sizes = {str(16 * MIB): {"transports": {"shmbus": {"% of memcpy": 75.0}}}}
    listed = {t["target"]: t for t in evaluate_targets({"sizes": {"sizes": sizes}})}
    assert listed["(e) shmbus 16 MiB >= 60% of memcpy"]["met"] is True
    assert listed["(e) shmbus 4 MiB >= 60% of memcpy"]["met"] is None  # not in a --quick run
