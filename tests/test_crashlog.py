"""The crash-consistency log (partition/guest/crashlog.py): the checker on files damaged on
purpose (each kind of damage detected, and nothing else), the writer resuming over a torn
record, and a real writer process SIGKILLed mid-run whose file still checks clean."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from partition.guest import crashlog as C

CAPACITY = 256                  # 16 pages of records


def record_at(i):
    return C.HEADER + i * C.RECORD


@pytest.fixture
def log(tmp_path):
    """The bytes of a log of 100 good records (seed 7), and its path."""
    path = str(tmp_path / "records")
    assert C.write(path, 7, CAPACITY, count=100, out=open(os.devnull, "w")) == 100
    with open(path, "rb") as f:
        return bytearray(f.read()), path


def test_a_good_log_checks_clean(log):
    buf, _ = log
    r = C.check_buffer(bytes(buf))
    assert (r.records, r.written, r.committed, r.writer_starts) == (100, 100, 100, 1)
    assert r.frontier == record_at(100) and r.capacity == CAPACITY
    assert (r.torn_pages, r.torn_page_at, r.bad_words, r.lost_records) == (0, -1, 0, 0)
    assert r.clean


def test_a_torn_record_at_the_frontier_is_one_torn_page_and_still_clean(log):
    buf, _ = log
    body = C.Records(7).body(101)
    buf[record_at(100):record_at(100) + 24] = body[:24]         # killed in its first store
    r = C.check_buffer(bytes(buf))
    assert (r.records, r.torn_pages, r.bad_words, r.lost_records) == (100, 1, 0, 0)
    assert r.torn_page_at == record_at(100) // C.PAGE and r.clean
    buf[record_at(100):record_at(100) + len(body)] = body       # between the two stores
    r = C.check_buffer(bytes(buf))
    assert (r.records, r.torn_pages, r.bad_words) == (100, 1, 0) and r.clean


def test_torn_pages_are_counted_and_a_second_one_is_not_clean(log):
    buf, _ = log
    recs = C.Records(7)
    buf[record_at(100):record_at(100) + 16] = recs.body(101)[:16]
    later = 100 + 2 * C.PER_PAGE                                 # two pages on
    buf[record_at(later):record_at(later + 1)] = recs.image(later + 1)   # intact, but stray
    r = C.check_buffer(bytes(buf))
    assert (r.records, r.torn_pages, r.bad_words) == (100, 2, 0)
    assert not r.clean
    # one torn page that is not the frontier's is not clean either
    buf[record_at(100):record_at(101)] = bytes(C.RECORD)
    r = C.check_buffer(bytes(buf))
    assert r.torn_pages == 1 and r.torn_page_at == record_at(later) // C.PAGE
    assert not r.clean


def test_a_bad_word_is_detected_before_and_past_the_frontier(log):
    buf, _ = log
    at = record_at(50) + 8 * 5                                   # a payload word of record 50
    buf[at] ^= 0x40
    r = C.check_buffer(bytes(buf))
    assert (r.records, r.bad_words) == (50, 1)
    assert r.lost_records == 50 and not r.clean                # the header said 100 were done
    buf[at] ^= 0x40
    assert C.check_buffer(bytes(buf)).clean
    at = record_at(200) + 8                                      # in the zeros past the end
    buf[at:at + 8] = (12345).to_bytes(8, "little")
    r = C.check_buffer(bytes(buf))
    assert (r.records, r.bad_words, r.torn_pages) == (100, 1, 1) and not r.clean


def test_lost_records_are_the_committed_ones_no_longer_intact(log):
    buf, _ = log
    buf[record_at(90):record_at(100)] = bytes(10 * C.RECORD)     # whole records gone
    r = C.check_buffer(bytes(buf))
    assert (r.records, r.lost_records, r.bad_words, r.torn_pages) == (90, 10, 0, 0)
    assert not r.clean


def test_what_is_not_a_log_is_refused(log, tmp_path, capsys):
    buf, path = log
    bad = bytearray(buf)
    bad[16] ^= 1                                                 # the seed, under the CRC
    with pytest.raises(C.NotALog, match="CRC"):
        C.check_buffer(bytes(bad))
    with pytest.raises(C.NotALog, match="not a crash log"):
        C.check_buffer(bytes(C.HEADER + C.RECORD))
    with pytest.raises(C.NotALog, match="the header says"):
        C.check_buffer(bytes(buf[:-C.RECORD]))
    with pytest.raises(C.NotALog, match="seed 7, not 8"):
        C.write(path, 8, CAPACITY)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert C.main(["check", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_the_writer_resumes_over_a_torn_record(log, capsys):
    _, path = log
    with open(path, "r+b") as f:
        f.seek(record_at(100))
        f.write(C.Records(7).body(101)[:40])                     # a killed writer's last store
    assert C.check(path).torn_pages == 1
    assert C.write(path, 7, CAPACITY, count=150) == 150
    r = C.check(path)
    assert (r.records, r.torn_pages, r.bad_words, r.writer_starts, r.committed) == \
        (150, 0, 0, 2, 150) and r.clean
    assert "start 2, frontier at record 100" in capsys.readouterr().out
    assert C.main(["check", path]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["records"] == 150


def test_check_exits_1_on_a_log_that_is_not_clean(log, capsys):
    buf, path = log
    buf[record_at(3) + 100] ^= 1
    with open(path, "wb") as f:
        f.write(buf)
    assert C.main(["check", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("NOT CLEAN") and json.loads(out[-1])["bad_words"] == 1


def writer(path, *args):
    return subprocess.Popen([sys.executable, "-m", "partition.guest.crashlog", "write", path,
                             "--seed", "3", "--size", "4M", *args],
                            stdout=subprocess.PIPE, text=True)


def committed(path):
    with open(path, "rb") as f:
        return C.read_header(f.read()).committed


@pytest.mark.system
def test_a_writer_sigkilled_mid_run_leaves_a_clean_log():
    """Three writers in turn on a tmpfs file, the first two SIGKILLed while they store (each
    waited for until it has written some), the third finishing: clean, every start counted."""
    path = f"/dev/shm/mk-test-crashlog-{os.getpid()}"
    try:
        before = 0
        for n in range(2):
            p = writer(path, "--rate", "20000")
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(path) or committed(path) <= before + 2000:
                    assert p.poll() is None and time.monotonic() < deadline
                    time.sleep(0.01)
            finally:
                p.send_signal(signal.SIGKILL)
                p.communicate()
            assert p.returncode == -signal.SIGKILL
            r = C.check(path)
            assert r.clean and r.bad_words == 0 and r.torn_pages <= 1, r
            assert r.records > before and r.writer_starts == n + 1
            before = r.records
        p = writer(path, "--count", str(before + 500))
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and f"frontier at record {before}" in out
        r = C.check(path)
        assert (r.records, r.torn_pages, r.bad_words, r.lost_records, r.writer_starts) == \
            (before + 500, 0, 0, 0, 3) and r.clean
    finally:
        for leftover in (path, path + ".new"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def test_a_log_half_made_by_a_killed_writer_is_made_again(tmp_path):
    path = str(tmp_path / "records")
    with open(path + ".new", "wb") as f:                 # killed before its rename
        f.write(bytes(100))
    assert not os.path.exists(path)
    assert C.write(path, 1, CAPACITY, count=20, out=open(os.devnull, "w")) == 20
    assert C.check(path).clean and not os.path.exists(path + ".new")
