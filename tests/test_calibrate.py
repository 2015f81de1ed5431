"""Issue 22 items 7 and 10: calibration probes run the link, not the user's faults and deadline;
one Ctrl-C stops calibration. ``calibrate_dilation`` takes the run function as a parameter: here a
fake that records the probes it was given (no migration runs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shmig.calibrate import calibrate_dilation, probe_config
from shmig.config import Config

MiB = 1024**2


def users_config() -> Config:
    """The issue's command: a deadline and a recovery time that only the user's run has, plus faults."""
    return Config.from_strings(ram="16MiB", deadline="120s", recover_after="61s", time_dilation="auto",
                               bandwidth="1Gbit/s", inject_faults=["return-path@50%"]).validate()


def test_probes_carry_neither_the_users_faults_nor_their_timings():
    cfg = users_config()
    for factor in (1.0, 4.0, 64.0):
        probe = probe_config(cfg, factor).validate()  # used to be "must be between 0 and the deadline (60s)"
        assert probe.inject_faults == [] and probe.recover_after is None
        assert probe.time_dilation == factor and probe.bandwidth == cfg.bandwidth
    assert cfg.inject_faults == ["return-path@50%"] and cfg.recover_after == 61.0  # the user's run keeps them


def test_one_ctrl_c_stops_calibration():
    """An interrupted probe ends calibration: it is not a factor that failed to sustain the link."""
    probes = []

    def interrupted_run(probe: Config):
        probes.append(probe.time_dilation)
        return SimpleNamespace(interrupted=True, ok=False, link={})
    with pytest.raises(KeyboardInterrupt):
        calibrate_dilation(users_config(), interrupted_run)
    assert probes == [1.0]
