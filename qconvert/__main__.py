"""Lets `python -m qconvert` run the command line."""

from qconvert.cli import main

main()
