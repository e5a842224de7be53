"""The stop flag: SIGTERM, SIGUSR1 and a first Ctrl-C ask the run to stop after its round, except that a
Ctrl-C while the rank runs its clients drops the round at once; a second Ctrl-C stops it at once; the
handlers before it are put back."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedmetanas.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, STOP_SIGNALS, RoundDropped, StopFlag, exit_code


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


def test_ctrl_c_while_the_clients_run_drops_the_round_at_once() -> None:
    with StopFlag() as flag:
        with pytest.raises(RoundDropped), flag.droppable():
            _deliver(signal.SIGINT)
            pytest.fail("the clients' work went on after Ctrl-C")

    assert flag.requested and flag.dropped and flag.signal_name == "SIGINT"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_schedulers_notice_while_the_clients_run_lets_the_round_finish(sig: signal.Signals) -> None:
    with StopFlag() as flag:
        with flag.droppable():
            _deliver(sig)

    assert flag.requested and not flag.dropped


def test_a_ctrl_c_between_rounds_drops_the_next_round_on_entry_once() -> None:
    """A Ctrl-C during the all-reduce or the evaluation: the next round's clients never start."""
    with StopFlag() as flag:
        _deliver(signal.SIGINT)
        with pytest.raises(RoundDropped), flag.droppable():
            pytest.fail("entered a round after Ctrl-C")
        with flag.droppable():
            pass  # one Ctrl-C drops one round, not every later one


def test_a_second_ctrl_c_after_the_drop_still_ends_at_once() -> None:
    with StopFlag() as flag:
        with pytest.raises(RoundDropped), flag.droppable():
            _deliver(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)


def test_outside_the_clients_work_ctrl_c_only_sets_the_flag() -> None:
    with StopFlag() as flag:
        _deliver(signal.SIGINT)

    assert flag.requested and not flag.dropped
