"""DVC stage entry points: one module per stage, each with a ``main()``."""
