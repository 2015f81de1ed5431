"""Examples of shmig used from Python: policies of your own (see the README)."""
