"""``python -m shmbus``: the same as the ``shmbus`` command."""

from ._cli import main

raise SystemExit(main())
