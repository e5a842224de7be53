"""The repository root holds this file so that pytest puts the root on sys.path (rootdir conftest):
the tests import their shared helpers as `tests.helpers`. The package itself is installed (`make venv`)."""
