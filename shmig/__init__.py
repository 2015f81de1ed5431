"""shmig: QEMU postcopy live migration, with and without postcopy preemption, emulated on one machine."""
