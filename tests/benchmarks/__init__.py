"""Benchmarks of the server against bare-aiohttp baselines (not part of the test suite).

Run with ``python -m tests.benchmarks.run``; see README.md in this folder.
"""
