"""spread_tools.refine.checkpoint: timed writes, stop requests, signals, refusal of foreign checkpoints."""

import os
import signal

import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.refine.checkpoint import (
    Checkpointer,
    Interrupted,
    StopSignals,
    answer_config,
    fingerprint,
)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeStop:
    requested = None


def state(i):
    return {"attrs": {"step": i, "note": "x"}, "arrays": {"x": np.arange(3.0) + i, "grp/y": [i],
                                                           "names": ["a", "b"]}}


def test_timed_writes_and_round_trip(tmp_path):
    clock = FakeClock()
    ck = Checkpointer(tmp_path / "c.h5", "demo", {"k": 1}, "fp", interval_s=10, clock=clock)
    assert not ck.maybe_save(lambda: state(0))            # interval not passed: nothing written
    assert not ck.exists()
    clock.t = 10.0
    assert ck.maybe_save(lambda: state(1))
    clock.t = 15.0
    assert not ck.maybe_save(lambda: state(2))
    clock.t = 20.5
    assert ck.maybe_save(lambda: state(3)) and ck.n_written == 2
    back = ck.load()
    assert back["attrs"]["step"] == 3 and back["attrs"]["kind"] == "demo"
    np.testing.assert_array_equal(back["arrays"]["x"], np.arange(3.0) + 3)
    assert list(back["arrays"]["grp/y"]) == [3] and back["arrays"]["names"] == ["a", "b"]
    zero = Checkpointer(tmp_path / "z.h5", "demo", {}, "fp", interval_s=0, clock=clock)
    assert zero.maybe_save(lambda: state(0)) and zero.maybe_save(lambda: state(1))
    never = Checkpointer(tmp_path / "n.h5", "demo", {}, "fp", interval_s=None, clock=clock)
    clock.t = 1e9
    assert not never.maybe_save(lambda: state(0))


def test_stop_request_writes_then_raises(tmp_path):
    stop = FakeStop()
    ck = Checkpointer(tmp_path / "c.h5", "demo", {}, "fp", interval_s=1e9, stop=stop)
    ck.maybe_save(lambda: state(0))
    assert not ck.exists()
    stop.requested = signal.SIGTERM
    with pytest.raises(Interrupted) as info:
        ck.maybe_save(lambda: state(7), detail="unit 7")
    assert ck.load()["attrs"]["step"] == 7
    assert info.value.exit_code == 143 and "SIGTERM" in str(info.value) and "unit 7" in str(info.value)
    # no checkpoint path: the stop is still honoured
    with pytest.raises(Interrupted):
        Checkpointer(None, "demo", {}, "fp", stop=stop).maybe_save(lambda: state(0))


def test_foreign_checkpoints_refused(tmp_path):
    path = tmp_path / "c.h5"
    Checkpointer(path, "demo", {"a": 1, "b": 2}, "fp1").save(state(0))
    with pytest.raises(InputError, match="another configuration.*differs in: b"):
        Checkpointer(path, "demo", {"a": 1, "b": 3}, "fp1").load()
    with pytest.raises(InputError, match="other input data"):
        Checkpointer(path, "demo", {"a": 1, "b": 2}, "fp2").load()
    with pytest.raises(InputError, match="is a demo checkpoint, not one of other"):
        Checkpointer(path, "other", {"a": 1, "b": 2}, "fp1").load()
    assert Checkpointer(tmp_path / "none.h5", "demo", {}, "").load() is None


def test_answer_config_and_fingerprint():
    from spread_tools.config import P, resolve
    cfg = resolve({"a": P(1, "a"), "checkpoint": {"interval_s": P(300.0, "t")}}, overrides=["a=2"])
    assert answer_config(cfg) == {"a": 2}
    assert fingerprint([np.arange(3)]) == fingerprint([np.arange(3)])
    assert fingerprint([np.arange(3)]) != fingerprint([np.arange(3.0)])          # dtype counts
    assert fingerprint([np.arange(4)]) != fingerprint([np.arange(4).reshape(2, 2)])


def test_stop_signals_request_a_stop_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM          # the process is still alive
        os.kill(os.getpid(), signal.SIGTERM)             # a second SIGTERM: still only a request
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)          # a second Ctrl-C: stop now
    assert signal.getsignal(signal.SIGTERM) is before
