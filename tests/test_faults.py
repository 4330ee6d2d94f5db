"""Fault injection: the schedule's grammar, who fires when, and the real kill/hang in a child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from smlt.errors import ConfigError
from smlt.protocol.faults import (
    PHASES,
    Fault,
    FaultInjector,
    InjectedFault,
    fault_event,
    faults_from_env,
    format_faults,
    parse_faults,
)

REPO = Path(__file__).resolve().parents[1]


# -- the schedule -------------------------------------------------------------------------------


def test_parse_several_entries_in_order() -> None:
    text = " kill:rank=1:iteration=5 , raise:rank=0:iteration=0,hang:rank=12:iteration=300 "
    assert parse_faults(text) == (
        Fault("kill", 1, 5),
        Fault("raise", 0, 0),
        Fault("hang", 12, 300),
    )


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_schedule(text: str) -> None:
    assert parse_faults(text) == ()


@pytest.mark.parametrize(
    "bad",
    [
        "kill",
        "kill:rank=1",
        "explode:rank=1:iteration=2",
        "KILL:rank=1:iteration=2",
        "kill:rank=-1:iteration=2",
        "kill:rank=1:iteration=2:extra",
        "kill:iteration=2:rank=1",
        "kill:rank=one:iteration=2",
        "kill:rank=\u0661:iteration=2",  # an Arabic-Indic digit: int() would take it, we do not
        "kill:rank=1:iteration=2 hang:rank=2:iteration=3",
    ],
)
def test_malformed_entry_is_named_with_the_expected_form(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_faults(f"raise:rank=0:iteration=1,{bad}")
    message = str(info.value)
    assert repr(bad) in message
    assert "ACTION:rank=R:iteration=T" in message


def test_empty_entry_between_commas_is_refused() -> None:
    with pytest.raises(ConfigError, match="entry 2 is empty"):
        parse_faults("kill:rank=1:iteration=5,,hang:rank=0:iteration=3")


def test_same_rank_and_iteration_twice_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_faults("kill:rank=1:iteration=5,hang:rank=2:iteration=5,raise:rank=1:iteration=5")
    message = str(info.value)
    assert "'kill:rank=1:iteration=5'" in message and "'raise:rank=1:iteration=5'" in message


def test_fault_validates_itself() -> None:
    with pytest.raises(ConfigError, match="explode"):
        Fault("explode", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=">= 0"):
        Fault("kill", 0, -3)


def test_format_round_trips() -> None:
    faults = (Fault("hang", 3, 7), Fault("kill", 0, 1))
    assert format_faults(faults) == "hang:rank=3:iteration=7,kill:rank=0:iteration=1"
    assert parse_faults(format_faults(faults)) == faults


@pytest.mark.parametrize("phase", PHASES)
def test_every_phase_parses_and_round_trips(phase: str) -> None:
    [fault] = parse_faults(f"hang:rank=2:iteration=7:phase={phase}")
    assert fault == Fault("hang", 2, 7, phase)  # type: ignore[arg-type]
    assert parse_faults(format_faults([fault])) == (fault,)


def test_default_phase_is_start_and_is_left_out_when_formatted() -> None:
    assert parse_faults("kill:rank=1:iteration=5:phase=start") == (Fault("kill", 1, 5),)
    assert str(Fault("kill", 1, 5, "start")) == "kill:rank=1:iteration=5"
    assert (
        str(Fault("kill", 1, 5, "after-publish")) == "kill:rank=1:iteration=5:phase=after-publish"
    )


def test_mixed_schedule_round_trips() -> None:
    faults = (
        Fault("kill", 1, 5, "during-upload"),
        Fault("duplicate", 1, 5),
        Fault("raise", 0, 3, "during-checkpoint"),
        Fault("hang", 2, 9),
    )
    text = format_faults(faults)
    assert text == (
        "kill:rank=1:iteration=5:phase=during-upload,duplicate:rank=1:iteration=5,"
        "raise:rank=0:iteration=3:phase=during-checkpoint,hang:rank=2:iteration=9"
    )
    assert parse_faults(text) == faults


@pytest.mark.parametrize(
    "bad",
    [
        "kill:rank=1:iteration=2:phase=middle",
        "kill:rank=1:iteration=2:phase=",
        "kill:rank=1:iteration=2:phase=After-Upload",
        "kill:rank=1:phase=start:iteration=2",
        "duplicate:rank=1:iteration=2:phase=start:phase=start",
    ],
)
def test_bad_phase_is_a_config_error_naming_the_entry(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_faults(f"duplicate:rank=0:iteration=1,{bad}")
    message = str(info.value)
    assert repr(bad) in message
    assert "phase=P" in message and "during-checkpoint" in message


def test_two_worker_faults_at_one_place_are_refused_whatever_their_phases() -> None:
    with pytest.raises(ConfigError, match="only one fault can fire"):
        parse_faults("kill:rank=1:iteration=5:phase=after-upload,raise:rank=1:iteration=5")
    with pytest.raises(ConfigError, match="only one fault can fire"):
        parse_faults("duplicate:rank=1:iteration=5,duplicate:rank=1:iteration=5:phase=start")


def test_a_duplicate_may_share_its_place_with_a_worker_fault() -> None:
    assert parse_faults("duplicate:rank=1:iteration=5,kill:rank=1:iteration=5") == (
        Fault("duplicate", 1, 5),
        Fault("kill", 1, 5),
    )


def test_fault_rejects_an_unknown_phase() -> None:
    with pytest.raises(ConfigError, match="'sideways'"):
        Fault("kill", 0, 0, "sideways")  # type: ignore[arg-type]


def test_from_env() -> None:
    assert faults_from_env({}) == ()
    assert faults_from_env({"SMLT_FAULTS": "raise:rank=2:iteration=9"}) == (Fault("raise", 2, 9),)
    with pytest.raises(ConfigError):
        faults_from_env({"SMLT_FAULTS": "raise:rank=2"})


def test_option_round_trip_through_a_json_payload() -> None:
    schedule = parse_faults("kill:rank=1:iteration=5,hang:rank=0:iteration=2")
    injector = FaultInjector(schedule, rank=0, attempt=0)
    options = json.loads(json.dumps({"faults": injector.to_option()}))
    rebuilt = FaultInjector.from_option(options["faults"], rank=1, attempt=0)
    assert rebuilt.faults == schedule  # the whole schedule travels, not only rank 0's part
    assert (rebuilt.rank, rebuilt.attempt) == (1, 0)
    assert FaultInjector.from_option("", rank=0, attempt=0).to_option() == ""


# -- dispatch, with the process-level actions replaced --------------------------------------------


class Recorder:
    """Stands in for the process-level actions, so dispatch is testable inside pytest."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.iteration = -1

    def injector(self, text: str, rank: int, attempt: int) -> FaultInjector:
        return FaultInjector(
            parse_faults(text),
            rank,
            attempt,
            kill_fn=lambda: self.calls.append(("kill", self.iteration)),
            hang_fn=lambda: self.calls.append(("hang", self.iteration)),
        )

    def run(
        self, injector: FaultInjector, iterations: range, phase: str = "start"
    ) -> list[tuple[str, int]]:
        for t in iterations:
            self.iteration = t
            try:
                injector.maybe_fire(t, phase)
            except InjectedFault:
                self.calls.append(("raise", t))
        return self.calls


SCHEDULE = (
    "kill:rank=1:iteration=3,hang:rank=1:iteration=6,raise:rank=1:iteration=8,"
    "kill:rank=0:iteration=4"
)


def test_fires_each_action_at_its_iteration_for_its_rank_only() -> None:
    rec = Recorder()
    calls = rec.run(rec.injector(SCHEDULE, rank=1, attempt=0), range(10))
    assert calls == [("kill", 3), ("hang", 6), ("raise", 8)]
    rec = Recorder()
    assert rec.run(rec.injector(SCHEDULE, rank=0, attempt=0), range(10)) == [("kill", 4)]
    rec = Recorder()
    assert rec.run(rec.injector(SCHEDULE, rank=2, attempt=0), range(10)) == []


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_reinvoked_worker_runs_through(attempt: int) -> None:
    rec = Recorder()
    assert rec.run(rec.injector(SCHEDULE, rank=1, attempt=attempt), range(10)) == []


def test_a_fault_fires_once() -> None:
    rec = Recorder()
    injector = rec.injector("hang:rank=0:iteration=2", rank=0, attempt=0)
    # A resumed (SIGCONT-ed) worker, or a loop that retries the iteration, must not fire again.
    assert rec.run(injector, range(5)) == [("hang", 2)]
    assert rec.run(injector, range(5)) == [("hang", 2)]


def test_a_fault_fires_only_at_its_phase() -> None:
    text = "kill:rank=0:iteration=3:phase=after-publish,hang:rank=0:iteration=5:phase=during-gather"
    for phase in PHASES:
        rec = Recorder()
        calls = rec.run(rec.injector(text, rank=0, attempt=0), range(8), phase)
        expected = {"after-publish": [("kill", 3)], "during-gather": [("hang", 5)]}
        assert calls == expected.get(phase, []), phase


def test_during_checkpoint_fires_at_the_first_checkpoint_at_or_after_its_iteration() -> None:
    rec = Recorder()
    injector = rec.injector("raise:rank=1:iteration=5:phase=during-checkpoint", rank=1, attempt=0)
    # Checkpoints every 4 iterations (versions 4, 8, 12): the one at 8 is the first >= 5.
    for version in (4, 8, 12):
        rec.iteration = version
        try:
            injector.maybe_fire(version, "during-checkpoint")
        except InjectedFault as exc:
            rec.calls.append(("raise", version))
            assert "phase during-checkpoint" in str(exc)
    assert rec.calls == [("raise", 8)]
    # Other phases at or after the iteration do not fire it: only exact iterations count there.
    rec = Recorder()
    injector = rec.injector("kill:rank=1:iteration=5:phase=after-upload", rank=1, attempt=0)
    assert rec.run(injector, range(6, 9), "after-upload") == []


def test_duplicate_is_never_fired_by_a_worker() -> None:
    rec = Recorder()
    injector = rec.injector("duplicate:rank=0:iteration=2", rank=0, attempt=0)
    for phase in PHASES:
        assert rec.run(injector, range(5), phase) == []


def test_on_fire_is_called_just_before_the_fault_acts() -> None:
    seen: list[object] = []
    injector = FaultInjector(
        parse_faults("kill:rank=2:iteration=4:phase=before-report,raise:rank=2:iteration=6"),
        rank=2,
        attempt=0,
        kill_fn=lambda: seen.append("killed"),
        on_fire=lambda fault, t, phase: seen.append((str(fault), t, phase)),
    )
    for t in range(8):
        injector.maybe_fire(t, "before-report")
    assert seen == [("kill:rank=2:iteration=4:phase=before-report", 4, "before-report"), "killed"]
    # A callback given to maybe_fire takes the place of the injector's own.
    mine: list[tuple[str, int, str]] = []
    with pytest.raises(InjectedFault):
        injector.maybe_fire(
            6, on_fire=lambda fault, t, phase: mine.append((fault.action, t, phase))
        )
    assert mine == [("raise", 6, "start")]
    assert len(seen) == 2
    # Nothing fires on a re-invoked worker, so nothing is reported either.
    quiet = FaultInjector(
        parse_faults("raise:rank=2:iteration=6"), 2, 1, on_fire=lambda *a: seen.append(a)
    )
    quiet.maybe_fire(6)
    assert len(seen) == 2


def test_an_unknown_phase_at_the_call_site_is_refused() -> None:
    injector = FaultInjector(parse_faults("kill:rank=0:iteration=1"), rank=0, attempt=0)
    with pytest.raises(ConfigError, match="'after-uplaod'"):
        injector.maybe_fire(1, "after-uplaod")


def test_fault_event_is_the_progress_entry_the_scheduler_reads() -> None:
    fault = Fault("hang", 3, 9, "during-gather")
    event = fault_event(fault, 9, "during-gather", generation=2, attempt=0, at_unix_s=1.5e9)
    assert event == {
        "event": "fault",
        "rank": 3,
        "t": 9,
        "phase": "during-gather",
        "action": "hang",
        "at_unix_s": 1.5e9,
        "gen": 2,
        "attempt": 0,
    }
    before = time.time()
    assert before <= float(fault_event(fault, 9, "start", generation=0, attempt=0)["at_unix_s"])


def test_raise_message_names_rank_and_iteration() -> None:
    injector = FaultInjector(parse_faults("raise:rank=3:iteration=11"), rank=3, attempt=0)
    injector.maybe_fire(10)
    with pytest.raises(InjectedFault) as info:
        injector.maybe_fire(11)
    assert str(info.value) == "injected fault: raise at rank 3 iteration 11"
    assert isinstance(info.value, RuntimeError)


def test_negative_rank_or_attempt_is_refused() -> None:
    with pytest.raises(ConfigError):
        FaultInjector((), rank=-1, attempt=0)
    with pytest.raises(ConfigError):
        FaultInjector((), rank=0, attempt=-1)


# -- the real actions, in a child process --------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from smlt.protocol.faults import FaultInjector

    schedule, rank, attempt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    report = lambda fault, t, phase: print(f"fired {fault.action} {t} {phase}", flush=True)
    injector = FaultInjector.from_option(schedule, rank=rank, attempt=attempt, on_fire=report)
    for t in range(6):
        print(t, flush=True)
        injector.maybe_fire(t)
        injector.maybe_fire(t, "after-upload")
    print("done", flush=True)
    """
)


def _child(schedule: str, rank: int, attempt: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, schedule, str(rank), str(attempt)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat ('T' = stopped); the name field may hold ')'."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


def test_kill_sigkills_the_process() -> None:
    child = _child("kill:rank=1:iteration=3", rank=1, attempt=0)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # Died at iteration 3, not before, not after, and said so first.
    assert out.splitlines() == ["0", "1", "2", "3", "fired kill 3 start"]


def test_kill_at_a_phase_reports_then_dies_there() -> None:
    child = _child("kill:rank=0:iteration=2:phase=after-upload", rank=0, attempt=0)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert out.splitlines() == ["0", "1", "2", "fired kill 2 after-upload"]


def test_kill_spares_a_reinvoked_worker() -> None:
    child = _child("kill:rank=1:iteration=3", rank=1, attempt=1)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    assert out.split()[-1] == "done"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_hang_stops_the_process_until_someone_sigkills_it() -> None:
    child = _child("hang:rank=0:iteration=2", rank=0, attempt=0)
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline().strip() for _ in range(4)]
        assert lines == ["0", "1", "2", "fired hang 2 start"]
        deadline = time.monotonic() + 30
        while _state(child.pid) != "T":
            assert child.poll() is None, f"the child exited ({child.returncode}) instead of hanging"
            assert time.monotonic() < deadline, f"child never stopped: state {_state(child.pid)}"
            time.sleep(0.01)
        # Still stopped a moment later: nothing inside it runs, so nothing can end it but us.
        time.sleep(0.2)
        assert child.poll() is None and _state(child.pid) == "T"
    finally:
        child.kill()  # SIGKILL: the one signal besides SIGCONT a stopped process obeys
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
