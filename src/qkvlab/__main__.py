"""``python -m qkvlab``: the command line."""

from qkvlab.cli import main

main()
