from rankdown.app.cli import run

run()
