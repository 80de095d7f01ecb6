"""The ``mq-trio`` command: serve, pub, sub, bench."""

from ._args import byte_size, port_number
from ._main import build_parser, config_from_args, main

__all__ = ["build_parser", "byte_size", "config_from_args", "main", "port_number"]
