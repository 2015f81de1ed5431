"""A request-servicing policy of your own: preempt-full, plus prefetching.

Use it from the command line (``--policy`` registers it under its ``name``):

    shmig compare --modes preempt-full,prefetch --policy examples.prefetch:PrefetchNeighbours

or from Python: ``shmig.policies.register(PrefetchNeighbours.name, PrefetchNeighbours)``.
"""

from shmig.policies import PreemptFull


class PrefetchNeighbours(PreemptFull):
    """Preempt-full, plus: the 7 host pages after a requested one go out urgently too."""

    name = "prefetch"

    def on_request(self, hp: int) -> None:
        for p in range(hp, min(hp + 8, self.src.nhost)):
            super().on_request(p)
