"""A request-servicing policy of your own: preempt-full, plus prefetching.

Use it from the command line (``--policy`` registers it under its ``name``):

    shmig compare --modes preempt-full,prefetch --policy examples.prefetch:PrefetchNeighbours

or from Python: ``shmig.policies.register(PrefetchNeighbours.name, PrefetchNeighbours)``.
"""

from typing import Sequence

from shmig.policies import PreemptFull


class PrefetchNeighbours(PreemptFull):
    """Preempt-full, plus: the 7 host pages after a requested one go out urgently too."""

    name = "prefetch"

    def pages_for(self, hp: int) -> Sequence[int]:
        return range(hp, min(hp + 8, self.cfg.nhost))
