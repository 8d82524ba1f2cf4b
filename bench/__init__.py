"""The benchmark behind `make bench`: qconvert against the peers, side by side, in one run.

Run it as `python -m bench` (see bench/__main__.py). Not part of the installed package.
"""
