"""Shared test helpers: tiny merchant folders, a faulty ClientApp, running fedshop in a subprocess.

Importable as ``helpers`` (pytest puts ``tests/`` on ``sys.path`` through ``tests/conftest.py``)
and, for Ray workers started by a subprocess, through ``PYTHONPATH`` (see ``helpers.proc``).
"""
