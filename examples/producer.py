"""Put messages on a queue; run ``examples/consumer.py`` in another terminal to take them.

    python examples/producer.py demo-jobs --count 10
    python examples/consumer.py demo-jobs

The queue is created if it does not exist yet (a bare name lives in /dev/shm).
Remove it afterwards with ``shmbus rm demo-jobs``.
"""

from __future__ import annotations

import argparse
import time

import shmbus


def main() -> None:
    ap = argparse.ArgumentParser(description="Put numbered jobs on a shmbus queue.")
    ap.add_argument("path", help="bus path, or a bare name in /dev/shm")
    ap.add_argument("--count", type=int, default=10, help="how many messages (default 10)")
    args = ap.parse_args()
    with shmbus.Queue.create(args.path, capacity="8MiB", exist_ok=True) as q:
        for i in range(args.count):
            q.put({"job": i, "sent_at": time.time()})
        print(f"put {args.count} messages on {q.path}; {q.qsize()} waiting")


if __name__ == "__main__":
    main()
