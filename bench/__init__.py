"""shmig's benchmark suites (pytest-benchmark): ``pytest bench/`` for the full sizes, quick sizes under
``--benchmark-disable`` (the project's normal test command). Each module's docstring says what it
measures and the target it is compared with."""
