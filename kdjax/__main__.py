from kdjax.cli import run

run()
