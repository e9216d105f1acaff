"""The analysis writer thread (inference/writer.py): off, it stores on the calling thread; on, it
stores on its own thread in order, survives a failing batch, and drains its queue when stopped."""

import threading

import pytest

from inference import writer


@pytest.fixture
def enabled(settings):
    settings.ANALYSIS_WRITE_BEHIND = True
    settings.ANALYSIS_WRITE_BEHIND_DEPTH = 1
    writer.write_behind_start()
    yield
    writer.write_behind_stop()
    writer._State.enabled = False


def test_off_stores_on_the_calling_thread(settings):
    settings.ANALYSIS_WRITE_BEHIND = False
    writer.write_behind_start()
    threads = []
    writer.write_behind(lambda *, tag: threads.append((tag, threading.current_thread())), tag="a")
    assert threads == [("a", threading.current_thread())]


def test_on_stores_in_order_on_its_own_thread(enabled):
    done = []
    for index in range(5):
        writer.write_behind(lambda *, index: done.append((index, threading.current_thread().name)), index=index)
    writer.write_behind_flush()
    assert [index for index, _ in done] == [0, 1, 2, 3, 4]
    assert {name for _, name in done} == {"analysis-writer"}


def test_a_failing_batch_is_logged_and_the_next_is_stored(enabled, caplog):
    done = []

    def fail():
        raise RuntimeError("database went away")

    writer.write_behind(fail)
    writer.write_behind(lambda: done.append("next"))
    writer.write_behind_flush()
    assert done == ["next"]
    assert "the reconciler will re-queue its patches" in caplog.text


def test_stop_stores_what_is_queued_first(enabled):
    release = threading.Event()
    done = []
    writer.write_behind(lambda: release.wait(5) and done.append(1))
    writer.write_behind(lambda: done.append(2))  # waits in the queue behind the first
    threading.Timer(0.2, release.set).start()
    writer.write_behind_stop()
    assert done == [1, 2]
