"""Command line: one small module per command, each a thin layer over library functions.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``, and imports heavy libraries inside ``run`` so that
``leukoscope --help`` stays fast.
"""
