"""Put messages on a queue; run ``examples/consumer.py`` in another terminal to take them.

    python examples/producer.py demo-jobs --count 10
    python examples/consumer.py demo-jobs

The queue is created if it does not exist yet (a bare name lives in /dev/shm).
Remove it afterwards with ``shmbus rm demo-jobs``.
"""

from __future__ import annotations

import argparse
import sys
import time

import shmbus


def main() -> None:
    ap = argparse.ArgumentParser(description="Put numbered jobs on a shmbus queue.")
    ap.add_argument("path", help="bus path, or a bare name in /dev/shm")
    ap.add_argument("--count", type=int, default=10, help="how many messages (default 10)")
    args = ap.parse_args()
    with shmbus.Queue.create(args.path, capacity="8MiB", exist_ok=True) as q:
        sent = 0
        status = 0
        try:
            print(f"putting {args.count} messages on {q.path} (Ctrl-C to stop)", flush=True)
            for i in range(args.count):
                q.put({"job": i, "sent_at": time.time()})  # waits while the queue is full
                sent += 1
        except KeyboardInterrupt:
            status = 130  # what a shell expects of a command stopped by Ctrl-C
        print(f"put {sent} messages on {q.path}; {q.qsize()} waiting")
    sys.exit(status)


if __name__ == "__main__":
    main()
