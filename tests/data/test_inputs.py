"""Reading corpora: input resolution, record parsing, byte-range shards that read back in order, and the blocks
the preprocessing workers take."""
import gzip
import json

import pytest

from megamoe.data import DataError, resolve_inputs
from megamoe.data.inputs import Range, iter_raw, line_base, parse_record, split_ranges
from megamoe.data.records import parse_block, read_blocks


@pytest.fixture
def files(tmp_path):
    """Line files of uneven sizes, a gzip file and whole-file text documents."""
    paths = []
    for n, lines in enumerate((37, 1, 250, 0, 90)):
        p = tmp_path / f"f{n}.jsonl"
        p.write_text("".join(json.dumps({"text": f"file {n} line {i} " + "x" * (i % 50)}) + "\n"
                             for i in range(lines)))
        paths.append(str(p))
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": f"gz {i}"}) + "\n" for i in range(40)))
    (tmp_path / "t.txt").write_text("a whole\nfile\n")
    return paths[:3] + [str(tmp_path / "g.jsonl.gz"), str(tmp_path / "t.txt")] + paths[3:]


def records(ranges, text_mode="file"):
    return [(r.path, data) for r in ranges for _, data in iter_raw(r, text_mode)]


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_shards_concatenate_to_the_whole_input(files, parts):
    whole = records([Range(f) for f in files])
    shards = split_ranges(files, parts)
    assert 1 <= len(shards) <= parts
    assert [rec for shard in shards for rec in records(shard)] == whole
    gz = [r for shard in shards for r in shard if r.path.endswith(".gz")]
    assert gz == [Range(files[3])]  # a gzip stream is never cut


def test_line_numbers_of_a_range_count_from_the_file_start(files):
    path = files[2]
    for shard in split_ranges([path], 4):
        for rng in shard:
            base = line_base(rng)
            for line, data in iter_raw(rng):
                assert json.loads(data)["text"].startswith(f"file 2 line {base + line - 1} ")


def test_parse_record_reasons():
    keys = ("text",)
    assert parse_record(b'{"text": "hi"}\n', True, keys) == (["hi"], None, "")
    assert parse_record(b"  \n", True, keys) == (None, None, "")
    assert parse_record(b"{bad\n", True, keys)[1] == "malformed_json"
    assert parse_record(b'{"t": 1}', True, keys)[1] == "missing_key"
    assert parse_record(b'{"text": null}', True, keys)[1] == "not_a_string"
    assert parse_record(b'{"text": "\xff"}', True, keys)[1] == "not_utf8"
    assert parse_record(b'{"text": ""}', True, keys)[1] == "empty"
    assert parse_record(b"line\r\n", False, keys) == (["line"], None, "")
    assert parse_record(b"  \n", False, keys, whole_file=True)[1] == "empty"


def test_resolve_inputs(files, tmp_path):
    assert resolve_inputs([str(tmp_path)]) == sorted(files)
    assert resolve_inputs([str(tmp_path / "f*.jsonl"), files[0]]) == sorted(f for f in files if "/f" in f)
    with pytest.raises(DataError, match="matches no files"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files found"):
        resolve_inputs([str(tmp_path / "empty")])


@pytest.mark.parametrize("block_bytes", [1, 7, 100, 1 << 20])
@pytest.mark.parametrize("parts", [1, 3, 7])
def test_blocks_hold_exactly_the_lines_of_their_range(files, tmp_path, parts, block_bytes):
    """read_blocks cuts whole lines (a line longer than a block included) and keeps the ranges' lines."""
    long_line = tmp_path / "long.jsonl"  # lines far longer than the small blocks, and no final newline
    long_line.write_text("\n".join(json.dumps({"text": "y" * n}) for n in (300, 0, 5000, 2)))
    paths = files + [str(long_line)]
    for shard in split_ranges(paths, parts):
        for i, rng in enumerate(shard):
            want = [(line, data) for line, data in iter_raw(rng)]
            got = []
            for block in read_blocks([rng], ("text",), block_bytes=block_bytes):
                assert block.source == 0 and block.nbytes == len(block.data)
                if block.kind == "file":
                    got.append((None, block.data))
                    continue
                lines = block.data.split(b"\n")
                got += [(block.first + k, line + b"\n") for k, line in enumerate(lines[:-1])]
                if lines[-1]:
                    got.append((block.first + len(lines) - 1, lines[-1]))
            assert got == want, (rng, block_bytes)


def test_parse_block_agrees_with_parse_record(tmp_path):
    lines = [b'{"text": "a"}', b"", b"{bad", b'{"text": "\\ud800"}', b'{"text": 3}', b"  ", b'{"text": "b"}']
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (block,) = read_blocks([Range(str(path))], ("text",))
    texts, good, bad = parse_block(block, ("text",))
    verdicts = [(n, parse_record(line, True, ("text",))) for n, line in enumerate(lines, 1)]
    assert texts == ["a", "b"] and good == 2
    assert bad == [(n, reason, detail) for n, (_, reason, detail) in verdicts if reason]
    assert [b[1] for b in bad] == ["malformed_json", "not_utf8", "not_a_string"]
