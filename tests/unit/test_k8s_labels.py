"""The agent's label rules: desired config (level-triggered, default when absent), which operand labels
are paused and restored, and the backoff between retries."""

from __future__ import annotations

from vgpu_dm.backoff import Backoff
from vgpu_dm.k8s import labels as L

DP, VAL = L.DEVICE_PLUGIN_LABEL, L.VALIDATOR_LABEL


def test_desired_config_is_the_label_or_the_default():
    assert L.desired_config({L.CONFIG_LABEL: "A16-2Q"}, "default") == "A16-2Q"
    assert L.desired_config({}, "default") == "default"
    assert L.desired_config({L.CONFIG_LABEL: ""}, "default") == "default"
    assert L.desired_config(None, "default") == "default"


def test_pause_only_operands_that_are_on():
    assert L.pause_patch({DP: "true", VAL: "true"}) == {DP: L.PAUSED, VAL: L.PAUSED}
    assert L.pause_patch({DP: "false", VAL: "true"}) == {VAL: L.PAUSED}
    assert L.pause_patch({DP: "true"}) == {DP: L.PAUSED}  # absent stays absent
    assert L.pause_patch({DP: L.PAUSED, VAL: "false"}) == {}  # already paused (a crashed agent)
    assert L.pause_patch({DP: "some-other-value"}) == {DP: L.PAUSED}  # upstream: anything but false


def test_restore_only_what_is_still_paused():
    assert L.restore_patch({DP: L.PAUSED, VAL: L.PAUSED}) == {DP: "true", VAL: "true"}
    # Someone switched an operand off meanwhile, or removed it: theirs wins.
    assert L.restore_patch({DP: "false", VAL: L.PAUSED}) == {VAL: "true"}
    assert L.restore_patch({}) == {}
    assert L.paused({DP: L.PAUSED, VAL: "true"}) == [DP]


def test_backoff_doubles_up_to_the_cap_with_jitter():
    b = Backoff(30, 600, jitter=False)
    assert [b.next() for _ in range(7)] == [30, 60, 120, 240, 480, 600, 600]
    b.reset()
    assert b.next() == 30
    j = Backoff(1, 8)
    delays = [j.next() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= delay <= ceiling
