"""The ``dino-ctl`` Typer application: one module per noun, each exposing ``register(app)``."""
