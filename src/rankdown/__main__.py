from rankdown.cli import run

run()
