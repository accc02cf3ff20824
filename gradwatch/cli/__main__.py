"""`python -m gradwatch.cli`: the same as the `gradwatch` console script."""

from gradwatch.cli import main

main(prog_name="gradwatch")
