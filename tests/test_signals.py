"""The stop flag: SIGTERM, SIGUSR1 and a first Ctrl-C ask the run to stop after its round; a second Ctrl-C
stops it at once; the handlers before it are put back."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedmetanas.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, STOP_SIGNALS, StopFlag, exit_code


def _deliver(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler between bytecodes, soon after delivery


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_one_stop_signal_only_sets_the_flag_with_its_name(sig: signal.Signals) -> None:
    with StopFlag() as flag:
        _deliver(sig)

        assert flag.requested and flag.signal_name == sig.name


def test_a_second_ctrl_c_raises_keyboard_interrupt_at_once() -> None:
    with StopFlag() as flag:
        _deliver(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)

    assert flag.signal_name == "SIGINT" and flag.interrupts == 2


def test_ctrl_c_after_a_preemption_signal_keeps_the_first_name_and_a_second_one_still_ends_at_once() -> None:
    with StopFlag() as flag:
        _deliver(signal.SIGTERM)
        _deliver(signal.SIGINT)
        assert flag.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)


def test_leaving_the_flag_puts_back_the_handlers_it_replaced() -> None:
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    with StopFlag():
        assert all(signal.getsignal(sig) != before[sig] for sig in STOP_SIGNALS)

    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_ctrl_c_exits_130_and_preemption_75() -> None:
    assert exit_code("SIGINT") == EXIT_INTERRUPTED == 130
    assert exit_code("SIGTERM") == exit_code("SIGUSR1") == exit_code("") == EXIT_PREEMPTED == 75
