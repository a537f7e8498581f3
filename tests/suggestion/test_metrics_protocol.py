from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_suggestion.metrics_protocol import (
    MAX_LINE_BYTES,
    MetricsFileReader,
    MetricsParser,
    ParseError,
    Report,
    parse_line,
)


def test_json_and_pairs_give_the_same_report() -> None:
    expected = Report(step=3, metrics={"val_loss": 0.21, "accuracy": 0.9})
    assert parse_line('{"step": 3, "val_loss": 0.21, "accuracy": 0.9}') == expected
    assert parse_line("step=3 val_loss=0.21 accuracy=0.9") == expected
    assert parse_line("step=3, val_loss=0.21,accuracy=0.9\n") == expected
    assert parse_line("  step=3\tval_loss=0.21 accuracy=0.9  \r\n") == expected


def test_integers_exponents_and_integral_float_steps() -> None:
    assert parse_line('{"step": 2.0, "loss": 1}') == Report(2, {"loss": 1.0})
    assert parse_line("step=4 lr=1e-05 loss=-3") == Report(4, {"lr": 1e-05, "loss": -3.0})
    assert parse_line("step=5.0 val/loss=0.5 top-1=0.7") == Report(
        5, {"val/loss": 0.5, "top-1": 0.7}
    )


@pytest.mark.parametrize("line", ["", "   ", "\n", "# a comment", "  # step=3 loss=1"])
def test_blank_lines_and_comments_are_ignored(line: str) -> None:
    assert parse_line(line) is None


def test_missing_step_takes_the_next_number_from_one() -> None:
    parser = MetricsParser()
    assert parser.feed("loss=0.9") == Report(1, {"loss": 0.9})
    assert parser.feed('{"loss": 0.8}') == Report(2, {"loss": 0.8})
    assert parser.feed("# comment") is None
    assert parser.feed("step=10 loss=0.5") == Report(10, {"loss": 0.5})
    assert parser.feed("loss=0.4") == Report(11, {"loss": 0.4})


def test_a_bad_line_does_not_advance_the_step_counter() -> None:
    parser = MetricsParser()
    parser.feed("step=4 loss=1")
    with pytest.raises(ParseError):
        parser.feed("loss=nan")
    assert parser.feed("loss=0.5") == Report(5, {"loss": 0.5})


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("step=1 val_loss=nan", "'val_loss' must be a finite number"),
        ("step=1 val_loss=inf", "'val_loss' must be a finite number"),
        ('{"step": 1, "val_loss": NaN}', "'val_loss' must be a finite number"),
        ('{"step": 1, "val_loss": Infinity}', "'val_loss' must be a finite number"),
        ("step=1 val_loss=abc", "'val_loss' must be a number, got 'abc'"),
        ('{"step": 1, "val_loss": "0.5"}', "'val_loss' must be a number, got the string '0.5'"),
        ('{"step": 1, "val_loss": true}', "'val_loss' must be a number, got true"),
        ('{"step": 1, "val_loss": [1, 2]}', "'val_loss' must be a number, got [1, 2]"),
        ('{"step": 1, "val_loss": null}', "'val_loss' must be a number, got null"),
        ("step=-1 loss=1", "step must be a non-negative integer, got '-1'"),
        ("step=1.5 loss=1", "step must be a non-negative integer, got '1.5'"),
        ('{"step": "x", "loss": 1}', "step must be a non-negative integer"),
        ('{"step": true, "loss": 1}', "step must be a non-negative integer"),
        ("step=3", "no metric in the report"),
        ('{"step": 3}', "no metric in the report"),
        ("val_loss 0.3", "expected name=value pairs or a JSON object, found 'val_loss'"),
        ("=0.3", "expected name=value pairs"),
        ("step=1 loss=1 loss=2", "'loss' appears twice"),
        ('{"step": 1, "loss": 0.5', "invalid JSON"),
        ('{"step": 1, "loss": {"x": 1}}', "'loss' must be a number, got {\"x\": 1}"),
        ('{"step": 1, "bad name": 1}', "invalid metric name 'bad name'"),
    ],
)
def test_invalid_lines_are_rejected_with_a_message(line: str, needle: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_line(line)
    assert needle in str(info.value)
    assert info.value.problem in str(info.value)


@pytest.mark.parametrize("line", ["[1, 2]", '"step=1 loss=2"'])
def test_a_json_line_that_is_not_an_object(line: str) -> None:
    with pytest.raises(ParseError, match="must be an object"):
        parse_line(line)


def test_report_format_is_a_parsable_pairs_line() -> None:
    report = Report(7, {"val_loss": 0.125, "acc": 0.5})
    assert report.format() == "step=7 val_loss=0.125 acc=0.5"
    assert parse_line(report.format()) == report


def test_reader_tolerates_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    reader = MetricsFileReader(path)
    assert reader.read_lines() == []
    path.write_text("step=1 loss=1\n")
    assert reader.read_lines() == ["step=1 loss=1"]
    assert reader.read_lines() == []


def test_reader_only_hands_out_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    reader = MetricsFileReader(path)
    with path.open("a") as f:
        f.write('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
        f.flush()
        assert reader.read_lines() == ['{"step": 1, "loss": 0.5}']
        assert reader.pending_bytes == len('{"step": 2, "lo')
        assert reader.read_lines() == []
        f.write('ss": 0.4}\nstep=3 loss=0.3\n')
        f.flush()
        assert reader.read_lines() == ['{"step": 2, "loss": 0.4}', "step=3 loss=0.3"]
        assert reader.pending_bytes == 0


def test_final_read_returns_an_unterminated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    path.write_text("step=1 loss=1\nstep=2 loss=0.5")
    reader = MetricsFileReader(path)
    assert reader.read_lines() == ["step=1 loss=1"]
    assert reader.read_lines(final=True) == ["step=2 loss=0.5"]
    assert reader.read_lines(final=True) == []


def test_reader_starts_over_when_the_file_is_recreated_smaller(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    path.write_text("step=1 loss=1\nstep=2 loss=0.9\n")
    reader = MetricsFileReader(path)
    assert len(reader.read_lines()) == 2
    path.write_text("step=1 loss=2\n")
    assert reader.read_lines() == ["step=1 loss=2"]


def test_reader_handles_crlf_and_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    path.write_bytes(b"step=1 loss=1\r\nstep=2 \xff=1\n")
    lines = MetricsFileReader(path).read_lines()
    assert lines[0] == "step=1 loss=1"
    with pytest.raises(ParseError, match="invalid metric name"):
        parse_line(lines[1])


def test_reader_bounds_a_runaway_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    path.write_bytes(b"x" * (MAX_LINE_BYTES * 3))
    reader = MetricsFileReader(path)
    assert reader.read_lines() == []
    assert reader.pending_bytes <= MAX_LINE_BYTES
    with path.open("ab") as f:
        f.write(b"\nstep=1 loss=1\n")
    lines = reader.read_lines()
    assert len(lines[0]) <= MAX_LINE_BYTES
    assert lines[1] == "step=1 loss=1"


def test_json_lines_from_a_writer_in_another_process_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    rows = [{"step": i, "val_loss": 1.0 / (i + 1)} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = MetricsParser()
    reports = [parser.feed(line) for line in MetricsFileReader(path).read_lines()]
    assert [r.step for r in reports if r] == list(range(50))
