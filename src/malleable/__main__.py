from malleable.cli import app

app()
