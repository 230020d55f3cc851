"""The dead-letter files: each letter is stored once, whatever order the consumer hands batches over
in, and a replay after a restart (a new instance over the same files) adds nothing."""

from __future__ import annotations

import json

from streaming.deadletters import DeadLetter, FileDeadLetters


def _letters(partition: str, offsets: list[int]) -> list[DeadLetter]:
    return [DeadLetter(partition, offset, f"record {offset}".encode(), "not valid JSON") for offset in offsets]


def _stored(directory) -> list[tuple[str, int]]:
    return sorted((letter["partition"], letter["offset"]) for letter in FileDeadLetters(directory).read())


def test_letters_written_out_of_order_are_all_kept_once(tmp_path):
    sink = FileDeadLetters(tmp_path)
    sink.write(_letters("events:0", [7, 9]))  # batch N+1 handed over first
    sink.write(_letters("events:0", [2, 4]))  # then batch N
    sink.write(_letters("events:1", [3]))
    sink.write(_letters("events:0", [4, 9]))  # a repeat within the same process

    assert _stored(tmp_path) == [("events:0", 2), ("events:0", 4), ("events:0", 7), ("events:0", 9), ("events:1", 3)]


def test_a_replay_after_a_restart_adds_nothing_and_keeps_what_is_new(tmp_path):
    FileDeadLetters(tmp_path).write(_letters("events:0", [7, 9]) + _letters("events:0", [2]))

    restarted = FileDeadLetters(tmp_path)  # a new process over the same files
    restarted.write(_letters("events:0", [2, 5, 7, 9, 11]))

    assert _stored(tmp_path) == [("events:0", 2), ("events:0", 5), ("events:0", 7), ("events:0", 9), ("events:0", 11)]


def test_a_line_torn_by_a_crash_is_dropped_and_its_letter_written_again(tmp_path):
    FileDeadLetters(tmp_path).write(_letters("events:0", [1]))
    (path,) = tmp_path.glob("*.jsonl")
    torn = json.dumps(_letters("events:0", [3])[0].as_json())[:25]
    path.write_text(path.read_text() + torn)  # the process died mid-append: write never returned

    FileDeadLetters(tmp_path).write(_letters("events:0", [3]))

    assert _stored(tmp_path) == [("events:0", 1), ("events:0", 3)]
