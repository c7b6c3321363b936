"""Command-line tools (`python -m repro.tools NAME ...`), one module each.

Each tool module defines `add_arguments(parser)` and `main(args) -> int`. They keep the
command-line shapes of the fairseq scripts they replace and read and write the same files.
"""
