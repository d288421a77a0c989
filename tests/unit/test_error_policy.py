"""fleet.error_policy.decide: retry / move / fail / worker suspect, without Redis."""

from __future__ import annotations

import pytest

from fleet.contract import TaskPayload
from fleet.error_policy import Action, decide
from fleet.errors import BrokerUnavailable, GpuOutOfMemory, InputError, ModelLoadError, Preempted
from fleet.settings import load_settings

NS = "t"


def task(attempt: int = 1, memory_mib: int = 30000) -> TaskPayload:
    return TaskPayload(kind="any", sample_id="s", experiment="e", group="g", output_path="/o/x", output_root="/o",
                       attempt=attempt, memory_mib=memory_mib)


def settings(**kw: object):
    return load_settings(namespace=NS, **kw)


@pytest.mark.parametrize("error", [InputError("bad video"), ModelLoadError("no such file")])
def test_permanent_errors_fail_at_once_and_do_not_blame_the_worker(error: Exception) -> None:
    v = decide(error, task(), "t.q.gpu", settings())
    assert (v.action, v.queue, v.worker_suspect, v.error) == (Action.FAIL, None, False, error)


def test_unexpected_errors_get_another_attempt_and_count_against_the_worker() -> None:
    v = decide(RuntimeError("CUDA error: unspecified launch failure"), task(), "t.q.gpu", settings())
    assert (v.action, v.queue, v.worker_suspect, v.next_attempt) == (Action.RETRY, "t.q.gpu", True, 2)


def test_attempts_stop_at_max_attempts() -> None:
    s = settings(max_attempts=3)
    assert decide(BrokerUnavailable("gone"), task(attempt=2), "t.q.gpu", s).action is Action.RETRY
    last = decide(BrokerUnavailable("gone"), task(attempt=3), "t.q.gpu", s)
    assert (last.action, last.worker_suspect) == (Action.FAIL, False)
    assert decide(RuntimeError("x"), task(attempt=3), "t.q.gpu", s).action is Action.FAIL


def test_oom_moves_up_one_memory_class_and_fails_at_the_top() -> None:
    s = settings(memory_classes_mib=[24000, 48000, 80000])
    v = decide(GpuOutOfMemory("ran out"), task(), "t.q.mem24000", s)
    assert (v.action, v.queue, v.next_attempt, v.worker_suspect) == (Action.MOVE, "t.q.mem48000", 2, False)
    # From the shared queue: the class the sample declares is the one it ran in; the next is above it.
    assert decide(GpuOutOfMemory("x"), task(memory_mib=30000), "t.q.gpu", s).queue == "t.q.mem80000"
    top = decide(GpuOutOfMemory("ran out"), task(), "t.q.mem80000", s)
    assert top.action is Action.FAIL and "no larger memory class" in str(top.error)
    none = decide(GpuOutOfMemory("ran out"), task(), "t.q.gpu", settings())
    assert none.action is Action.FAIL and "no larger memory class" in str(none.error)


def test_pinned_and_multi_gpu_samples_are_not_moved_on_oom() -> None:
    s = settings(memory_classes_mib=[24000, 80000])
    for q in ("t.q.pin.0-1", "t.q.gpus2"):
        assert decide(GpuOutOfMemory("x"), task(), q, s).action is Action.FAIL


def test_preemption_goes_back_as_the_same_attempt_even_at_the_last_one() -> None:
    v = decide(Preempted("worker stopping"), task(attempt=3), "t.q.gpu", settings(max_attempts=3))
    assert (v.action, v.queue, v.next_attempt, v.worker_suspect) == (Action.RETRY, "t.q.gpu", 3, False)


@pytest.mark.parametrize("code", [13, 30, 20, 36])  # EACCES, EROFS, ENOTDIR, ENAMETOOLONG
def test_an_output_the_file_system_refuses_is_the_samples_fault(code: int) -> None:
    err = PermissionError(code, "Permission denied", "/o/x.mp4") if code == 13 else OSError(code, "refused", "/o/x.mp4")
    v = decide(err, task(), "t.q.gpu", settings())
    assert (v.action, v.worker_suspect) == (Action.FAIL, False)
    assert isinstance(v.error, InputError) and "/o/x.mp4" in str(v.error)


def test_a_full_disk_is_not_the_samples_fault() -> None:
    v = decide(OSError(28, "No space left on device"), task(), "t.q.gpu", settings())
    assert (v.action, v.worker_suspect) == (Action.RETRY, True)


def with_retries(retries: int | None, attempt: int = 1) -> TaskPayload:
    return task(attempt=attempt).model_copy(update={"retries": retries})


def test_a_tasks_own_retries_win_over_max_attempts() -> None:
    s = settings(max_attempts=3, retry_backoff_s=0)
    err = BrokerUnavailable("x")
    assert decide(err, with_retries(0), "t.q.gpu", s).action is Action.FAIL  # 0: no retry
    assert decide(err, with_retries(5, attempt=5), "t.q.gpu", s).action is Action.RETRY
    assert decide(err, with_retries(5, attempt=6), "t.q.gpu", s).action is Action.FAIL  # 5 retries = 6 attempts
    assert decide(err, with_retries(-1, attempt=1000), "t.q.gpu", s).next_attempt == 1001  # -1: forever
    assert decide(InputError("bad"), with_retries(-1), "t.q.gpu", s).action is Action.FAIL  # permanent: never


def test_retries_back_off_doubling_to_a_cap_but_moves_do_not() -> None:
    s = settings(retry_backoff_s=2, retry_backoff_max_s=10, memory_classes_mib=[24000, 40000, 80000])
    delays = [decide(BrokerUnavailable("x"), with_retries(-1, attempt=a), "t.q.gpu", s).delay_s for a in (1, 2, 3, 4)]
    assert delays == [2, 4, 8, 10]
    move = decide(GpuOutOfMemory("oom"), task(memory_mib=30000), "t.q.mem40000", s)
    assert (move.action, move.queue, move.delay_s) == (Action.MOVE, "t.q.mem80000", 0.0)


def test_oom_that_may_wait_retries_where_it_is_and_commands_move_within_their_twins() -> None:
    from fleet.errors import WaitForResources

    s = settings(retry_backoff_s=1, memory_classes_mib=[40000, 80000])
    top = decide(GpuOutOfMemory("oom", wait=True), with_retries(3), "t.q.mem80000", s)
    assert (top.action, top.queue, top.next_attempt) == (Action.RETRY, "t.q.mem80000", 2)
    assert decide(GpuOutOfMemory("oom"), with_retries(3), "t.q.mem80000", s).action is Action.FAIL
    twin = decide(GpuOutOfMemory("oom", wait=True), task(memory_mib=30000), "t.q.cmd.mem40000", s)
    assert twin.queue == "t.q.cmd.mem80000"
    wait = decide(WaitForResources("busy"), with_retries(0), "t.q.cmd.gpu", s)
    assert (wait.action, wait.next_attempt, wait.worker_suspect) == (Action.RETRY, 1, False) and wait.delay_s >= 1
