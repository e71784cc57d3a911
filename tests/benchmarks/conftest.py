"""Keep pytest out of this folder: benchmarks are run by ``python -m tests.benchmarks.run``,
never collected by the default ``pytest`` run (they need minutes, wrk and a quiet machine)."""

collect_ignore_glob = ["*"]
