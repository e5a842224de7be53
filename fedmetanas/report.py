"""`python -m fedmetanas.report RUN.h5 [RUN2.h5 ...] --out DIR`: figures and a static page from trajectory logs."""

import sys

from fedmetanas.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
