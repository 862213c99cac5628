"""Take messages from a queue filled by ``examples/producer.py`` (in another terminal).

    python examples/consumer.py demo-jobs            # wait for messages, Ctrl-C to stop
    python examples/consumer.py demo-jobs --idle 2   # stop after 2 s without a message
"""

from __future__ import annotations

import argparse
import sys
import time

import shmbus


def main() -> None:
    ap = argparse.ArgumentParser(description="Take jobs from a shmbus queue and print them.")
    ap.add_argument("path", help="bus path, or a bare name in /dev/shm")
    ap.add_argument("--idle", type=float, default=None,
                    help="stop after this many seconds with no message (default: never)")  # fmt: skip
    args = ap.parse_args()
    with shmbus.Queue.create(args.path, capacity="8MiB", exist_ok=True) as q:
        taken = 0
        status = 0
        try:
            while True:
                msg = q.get(timeout=args.idle)
                taken += 1
                print(f"job {msg['job']} after {(time.time() - msg['sent_at']) * 1e3:.1f} ms in the queue",
                      flush=True)  # fmt: skip
        except shmbus.Empty:
            pass
        except KeyboardInterrupt:
            status = 130  # what a shell expects of a command stopped by Ctrl-C
        print(f"took {taken} messages from {q.path}")
    sys.exit(status)


if __name__ == "__main__":
    main()
