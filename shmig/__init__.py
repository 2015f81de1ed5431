"""shmig: QEMU postcopy live migration, with and without postcopy preemption, emulated on one machine.

    import shmig
    report = shmig.run(shmig.Config(mode="preempt", ram=64 << 20, bandwidth=100 << 20))
    assert report.ok
"""

from .config import Config, ConfigError
from .controller import Migration, run
from .report import Report

__all__ = ["Config", "ConfigError", "Migration", "Report", "run"]
__version__ = "0.1.0"
