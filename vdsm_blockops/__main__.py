from .shells.cli import run

run()
