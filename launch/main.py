"""Run a federated architecture search: args -> config -> DistContext -> federated.loop.run.

    mpirun -np 2 python launch/main.py --config configs/default.yaml [section.key=value ...]
"""

from __future__ import annotations

import sys

from fedmetanas.cli import main

if __name__ == "__main__":
    sys.exit(main())
