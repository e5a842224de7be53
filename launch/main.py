"""Run a federated architecture search: args -> config -> DistContext -> federated.loop.run.

    mpirun -np 2 python launch/main.py --config configs/default.yaml [section.key=value ...]
"""

from __future__ import annotations

import sys

from fedmetanas.signals import exit_on_ctrl_c  # the standard library only: in place before torch loads

exit_on_ctrl_c()  # Ctrl-C while torch loads or the data is read exits 130 at once: nothing is written yet

from fedmetanas.cli import main  # noqa: E402 - after the handler

if __name__ == "__main__":
    sys.exit(main())
