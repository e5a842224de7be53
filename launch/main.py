"""Run a federated architecture search: args -> config -> DistContext -> federated.loop.run.

    mpirun -np 2 python launch/main.py --config configs/default.yaml [section.key=value ...]
"""

from __future__ import annotations

import sys

try:
    from fedmetanas.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): nothing is written yet, so no traceback
    print("stopped: interrupted by Ctrl-C before the first round", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
