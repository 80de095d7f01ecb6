"""``mq-trio bench``: a load generator for protocol-v1 servers and Redis pub/sub."""

from .cli import add_bench_parser, run_bench

__all__ = ["add_bench_parser", "run_bench"]
