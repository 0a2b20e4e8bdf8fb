from kdjax.app.cli import run

run()
