"""qexport/io/safetensors_file.py on hand-made files (no model; milliseconds): headers read and checked, files written.

The reference side is the safetensors library: files it writes must read back entry for entry, files qexport writes
must load in it, and every malformed header is refused with one line naming the file and tensor.
"""

from __future__ import annotations

import errno
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES
from safetensors.torch import load_file, save_file

from qexport.io import safetensors_file as st
from qexport.errors import InputError


def raw_file(path, header: dict, data: bytes = b"", header_len: int | None = None, pad: bytes = b""):
    """A safetensors file from a header dict and data bytes; header_len overrides the length prefix."""
    raw = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def one(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def refused(path, match):
    with pytest.raises(InputError, match=match) as e:
        st.read_header(path)
    assert str(e.value).startswith(str(path)), e.value
    return str(e.value)


def test_dtype_tables_agree_with_the_safetensors_library():
    assert st.DTYPES == {name: SAFETENSORS_DTYPES[name] for name in st.ITEMSIZES}
    assert st.DTYPE_NAMES == {dtype: name for name, dtype in st.DTYPES.items()}
    assert all(st.itemsize(n) == torch.empty(0, dtype=d).element_size() for n, d in st.DTYPES.items())


def test_an_unknown_module_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'NOPE'"):
        st.NOPE  # noqa: B018


def test_nbytes_is_itemsize_times_elements():
    assert st.nbytes("BF16", (3, 5)) == 30
    assert st.nbytes("I64", ()) == 8
    assert st.nbytes("F8_E5M2", (0, 7)) == 0


@pytest.mark.parametrize("dtype", sorted(st.ITEMSIZES))
def test_every_dtype_written_by_the_library_reads_back_with_its_offsets(tmp_path, dtype):
    tensors = {"a": torch.zeros(3, 2, dtype=st.DTYPES[dtype]), "b": torch.ones(5, dtype=st.DTYPES[dtype])}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    entries, metadata = st.read_header(path)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert metadata == {"format": "pt"}
    end = 0
    for name in sorted(entries, key=lambda n: entries[n].start):
        e = entries[name]
        assert (e.name, e.file, e.dtype, e.shape) == (name, path, dtype, tuple(tensors[name].shape))
        assert (e.start, e.nbytes, e.data_start) == (end, st.nbytes(dtype, e.shape), 8 + header_len)
        assert e.end == e.start + e.nbytes
        end = e.end


def test_header_without_metadata_or_with_null_metadata_reads_as_empty(tmp_path):
    assert st.read_header(raw_file(tmp_path / "a", {"t": one()}, bytes(8)))[1] == {}
    assert st.read_header(raw_file(tmp_path / "b", {"__metadata__": None, "t": one()}, bytes(8)))[1] == {}


def test_missing_file_is_named(tmp_path):
    refused(tmp_path / "nope.safetensors", "nope.safetensors: not found$")


def test_file_shorter_than_the_length_prefix_is_truncated(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    refused(path, r"truncated safetensors file \(3 bytes, no header length\)")


def test_header_length_may_reach_the_end_of_the_file_but_not_past_it(tmp_path):
    exact = raw_file(tmp_path / "exact", {})  # a header and no tensors: header_len == size - 8
    assert st.read_header(exact) == ({}, {})
    size = exact.stat().st_size
    msg = refused(raw_file(tmp_path / "long", {}, header_len=size - 7), "is larger than the file")
    assert f"header length {size - 7} is larger than the file ({size} bytes)" in msg


def test_header_length_above_the_librarys_limit_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", 16)
    assert st.read_header(raw_file(tmp_path / "ok", {}, pad=b" " * 14)) == ({}, {})  # 16 bytes: at the limit
    refused(raw_file(tmp_path / "big", {}, pad=b" " * 15), "header length 17 is above the safetensors library.s limit of 16 bytes")


def test_tensor_count_limit_counts_entries_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "MAX_TENSORS_PER_FILE", 2)
    two = {"a": one(offsets=(0, 8)), "b": one(offsets=(8, 16))}
    assert len(st.read_header(raw_file(tmp_path / "two", two, bytes(16)))[0]) == 2
    three = {**two, "c": one(offsets=(16, 24))}
    refused(raw_file(tmp_path / "three", three, bytes(24)), "header lists 3 tensors, above qexport's limit of 2 per file")


@pytest.mark.parametrize("raw,why", [(b"{", "is not JSON"), (b"\xff\xfe", "is not JSON"),
                                     (b"[1, 2]", "is not a JSON object")])
def test_header_that_is_not_a_json_object_is_refused(tmp_path, raw, why):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    refused(path, why)


@pytest.mark.parametrize("metadata", [[], "", {"a": 1}, {"a": None}])
def test_metadata_must_be_an_object_of_strings(tmp_path, metadata):
    refused(raw_file(tmp_path / "m", {"__metadata__": metadata}), "__metadata__ is not an object of strings")


@pytest.mark.parametrize("info,why", [
    ("x", "header entry is not an object"),
    (one(dtype="F4"), "unknown dtype 'F4'"),
    ({"shape": [2], "data_offsets": [0, 8]}, "unknown dtype None"),
    (one(shape=(-1,)), "is not a list of non-negative integers"),
    (one(shape=(True,)), "is not a list of non-negative integers"),
    (one(shape=(2.0,)), "is not a list of non-negative integers"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "is not a list of non-negative integers"),
    (one(shape=(1,) * 9, offsets=(0, 4)), "has more than 8 dimensions or a dimension above 2\\*\\*40"),
    (one(shape=(0, 2**40 + 1), offsets=(0, 0)), "has more than 8 dimensions"),
    (one(offsets=(0,)), "is not a pair of non-negative integers"),
    (one(offsets=(0, 8, 8)), "is not a pair of non-negative integers"),
    (one(offsets=(-8, 0)), "is not a pair of non-negative integers"),
    (one(offsets=(False, 8)), "is not a pair of non-negative integers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0,8"}, "is not a pair of non-negative integers"),
    (one(offsets=(0, 12)), r"data_offsets \[0, 12\] hold 12 bytes but dtype F32 shape \[2\] needs 8"),
])
def test_malformed_entry_is_refused_naming_the_tensor(tmp_path, info, why):
    msg = refused(raw_file(tmp_path / "m", {"w": info}, bytes(8)), why)
    assert ": tensor 'w': " in msg


def test_entry_at_the_dimension_limits_is_accepted(tmp_path):
    header = {"a": one(shape=(1,) * 8, offsets=(0, 4)), "b": one(shape=(0, 2**40), offsets=(4, 4))}
    entries, _ = st.read_header(raw_file(tmp_path / "m", header, bytes(4)))
    assert entries["b"].shape == (0, 2**40) and entries["a"].shape == (1,) * 8


def test_tensors_out_of_order_in_the_header_but_tiling_the_data_are_accepted(tmp_path):
    header = {"late": one(offsets=(8, 16)), "early": one(offsets=(0, 8))}
    entries, _ = st.read_header(raw_file(tmp_path / "m", header, bytes(16)))
    assert (entries["early"].start, entries["late"].start) == (0, 8)


def test_data_shorter_than_the_tensors_is_truncated_naming_the_cut_tensor(tmp_path):
    header = {"a": one(offsets=(0, 8)), "b": one(offsets=(8, 16)), "c": one(offsets=(16, 24))}
    msg = refused(raw_file(tmp_path / "m", header, bytes(12)), "truncated: tensor 'b' ends at data byte 16")
    assert "but the data section holds 12 bytes (tensors need 24)" in msg


def test_bytes_after_the_last_tensor_are_refused(tmp_path):
    refused(raw_file(tmp_path / "m", {"a": one()}, bytes(11)), "3 bytes after the last tensor belong to no tensor")


def test_gap_before_a_tensor_is_refused(tmp_path):
    header = {"a": one(offsets=(0, 8)), "b": one(offsets=(12, 20))}
    refused(raw_file(tmp_path / "m", header, bytes(20)), "4 bytes before tensor 'b' belong to no tensor")


def test_gap_at_the_start_is_refused(tmp_path):
    refused(raw_file(tmp_path / "m", {"a": one(offsets=(4, 12))}, bytes(12)),
            "4 bytes before tensor 'a' belong to no tensor")


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": one(offsets=(0, 8)), "b": one(offsets=(4, 12)), "c": one(offsets=(12, 20))}
    refused(raw_file(tmp_path / "m", header, bytes(20)), "tensors 'a' and 'b' overlap in the data section")


def test_offsets_past_the_data_are_out_of_range(tmp_path):
    header = {"a": one(offsets=(0, 8)), "b": one(offsets=(12, 20))}
    msg = refused(raw_file(tmp_path / "m", header, bytes(16)), r"tensor 'b': data_offsets \[12, 20\] out of range")
    assert "(data section is 16 bytes)" in msg


LAYOUT = [("w", "F16", (3, 4)), ("i", "I32", (5,)), ("e", "BF16", (0, 2)), ("s", "F32", ())]


def tensors_for(layout):
    gen = torch.Generator().manual_seed(0)
    return {n: (torch.randn(s, generator=gen) * 100).to(st.DTYPES[d]) for n, d, s in layout}


def test_stream_writer_writes_what_the_library_reads_and_file_bytes_predicts(tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = tensors_for(LAYOUT)
    writer = st.StreamWriter(path, LAYOUT, {"format": "pt"})
    for name, _, _ in LAYOUT:
        writer.add(name, tensors[name])
    sha = writer.close()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == st.sha256_file(path) == st.sha256_file(path, 5)
    assert path.stat().st_size == st.file_bytes(LAYOUT, {"format": "pt"})
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], tensors[n]) for n in tensors)
    entries, metadata = st.read_header(path)
    assert metadata == {"format": "pt"} and [entries[n].start for n, _, _ in LAYOUT] == [0, 24, 44, 44]


@pytest.mark.parametrize("metadata", [{}, {"format": "pt"}, {"k": "x" * 13}])
def test_header_is_padded_to_8_bytes_and_its_length_prefix_is_exact(metadata):
    raw = st.header_bytes(LAYOUT, metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    assert length == len(raw) - 8 and length % 8 == 0
    header = json.loads(raw[8:])
    assert header.pop("__metadata__") == metadata
    assert header == {n: {"dtype": d, "shape": list(s), "data_offsets": [o, o + st.nbytes(d, s)]}
                      for (n, d, s), o in zip(LAYOUT, [0, 24, 44, 44])}


def test_file_bytes_is_header_plus_data():
    assert st.file_bytes(LAYOUT, {}) == len(st.header_bytes(LAYOUT, {})) + 24 + 20 + 0 + 4


@pytest.mark.parametrize("name,tensor", [("i", torch.zeros(3, 4, dtype=torch.float16)),  # out of order
                                         ("w", torch.zeros(3, 4, dtype=torch.float32)),  # wrong dtype
                                         ("w", torch.zeros(4, 3, dtype=torch.float16))])  # wrong shape
def test_stream_writer_refuses_a_tensor_that_is_not_the_planned_next(tmp_path, name, tensor):
    writer = st.StreamWriter(tmp_path / "out", LAYOUT, {})
    with pytest.raises(RuntimeError, match=r"written where the plan has \('w', 'F16', \(3, 4\)\)"):
        writer.add(name, tensor)
    writer.abort()


def test_stream_writer_refuses_more_tensors_than_planned(tmp_path):
    writer = st.StreamWriter(tmp_path / "out", LAYOUT[:1], {})
    writer.add("w", torch.zeros(3, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"where the plan has None"):
        writer.add("w", torch.zeros(3, 4, dtype=torch.float16))
    writer.close()


def test_stream_writer_refuses_to_close_with_tensors_unwritten(tmp_path):
    writer = st.StreamWriter(tmp_path / "out", LAYOUT, {})
    writer.add("w", torch.zeros(3, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="closed with 3 planned tensors unwritten"):
        writer.close()
    writer.abort()
    assert writer._file.closed


def test_a_non_contiguous_tensor_is_written_in_logical_order(tmp_path):
    path = tmp_path / "out"
    t = torch.arange(12, dtype=torch.float16).reshape(4, 3).t()
    writer = st.StreamWriter(path, [("t", "F16", (3, 4))], {})
    writer.add("t", t)
    writer.close()
    assert torch.equal(load_file(path)["t"], t)


def test_write_errors_without_a_file_name_get_the_files_name(tmp_path):
    with pytest.raises(OSError) as e:
        with st._naming(tmp_path / "out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device",
                                                                    str(tmp_path / "out"))
    with pytest.raises(OSError) as e:
        with st._naming(tmp_path / "out"):
            raise OSError(errno.EIO, "I/O error", "/elsewhere")
    assert e.value.filename == "/elsewhere"


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    writer = st.StreamWriter(tmp_path / "out", LAYOUT, {})

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "still full")

    writer._file = Full()
    with pytest.raises(OSError) as e:
        writer.add("w", torch.zeros(3, 4, dtype=torch.float16))
    assert e.value.filename == str(tmp_path / "out")
    writer.abort()  # a second error while aborting is swallowed


def test_a_failed_close_names_the_file(tmp_path):
    writer = st.StreamWriter(tmp_path / "out", [], {})
    writer._file.close()

    class FullOnClose:
        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._file = FullOnClose()
    with pytest.raises(OSError) as e:
        writer.close()
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "out"))


def test_a_written_file_is_byte_identical_to_the_librarys_for_the_same_tensor_order(tmp_path):
    from safetensors.torch import save

    tensors = tensors_for(LAYOUT[:2])
    theirs = tmp_path / "theirs"
    theirs.write_bytes(save(tensors, metadata={"format": "pt"}))
    entries, _ = st.read_header(theirs)
    order = sorted(entries, key=lambda n: entries[n].start)  # the library's own order (by alignment, then name)
    layout = [next(row for row in LAYOUT if row[0] == n) for n in order]
    writer = st.StreamWriter(tmp_path / "ours", layout, {"format": "pt"})
    for name in order:
        writer.add(name, tensors[name])
    writer.close()
    assert (tmp_path / "ours").read_bytes() == theirs.read_bytes()


def test_truncation_names_the_first_tensor_that_ends_past_the_data(tmp_path):
    header = {"a": one(offsets=(0, 8)), "b": one(offsets=(8, 16)), "c": one(offsets=(16, 24))}
    refused(raw_file(tmp_path / "m", header, bytes(16)), "truncated: tensor 'c' ends at data byte 24")


def test_sha256_of_a_file_linked_inside_the_given_root(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link.json").symlink_to(tmp_path / "a.json")
    assert st.sha256_file(tmp_path / "sub" / "link.json", root=tmp_path) == hashlib.sha256(b"{}").hexdigest()
    with pytest.raises(InputError, match="symlink leads outside"):
        st.sha256_file(tmp_path / "sub" / "link.json")  # default root: the file's own folder


def test_adjacent_tensors_after_a_gap_are_not_an_overlap(tmp_path):
    # a gap, then two tensors that touch: the gap is reported, not an overlap of the touching pair
    header = {"a": one(offsets=(8, 16)), "b": one(offsets=(16, 24))}
    refused(raw_file(tmp_path / "m", header, bytes(24)), "8 bytes before tensor 'a' belong to no tensor")


@pytest.mark.parametrize("shape,why", [([-123] * 40, "is not a list of non-negative integers"),
                                       ([123] * 40, "has more than 8 dimensions")])
def test_a_long_bad_shape_is_quoted_up_to_100_characters(tmp_path, shape, why):
    msg = refused(raw_file(tmp_path / "m", {"w": one(shape=shape, offsets=(0, 4))}, bytes(4)), why)
    assert f"shape {str(shape)[:100]} {why.split()[0]}" in msg


def test_a_byte_count_mismatch_states_the_bytes_the_offsets_hold(tmp_path):
    msg = refused(raw_file(tmp_path / "m", {"w": one(offsets=(8, 20))}, bytes(20)), "needs 8")
    assert "data_offsets [8, 20] hold 12 bytes but dtype F32 shape [2] needs 8" in msg


def test_a_length_prefix_with_the_top_bit_set_is_above_the_limit_not_negative(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\xff" * 8 + b"{}")
    refused(path, f"header length {2**64 - 1} is above the safetensors library.s limit of 100,000,000 bytes")


def test_a_path_through_a_file_cannot_be_read_and_says_why(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file" / "model.safetensors", r"cannot read: Not a directory$")


def test_a_header_linked_inside_the_given_root_is_read(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.safetensors").symlink_to(tmp_path / "model.safetensors")
    assert set(st.read_header(tmp_path / "sub" / "m.safetensors", root=tmp_path)[0]) == {"w"}
    refused(tmp_path / "sub" / "m.safetensors", "symlink leads outside")


def test_a_header_that_is_not_json_names_the_decoder_error_up_to_200_characters(tmp_path):
    raw = b'{"' + b"x" * 300
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    try:
        json.loads(raw.decode())
    except json.JSONDecodeError as e:
        expected = f"(JSONDecodeError: {str(e)[:200]})"
    assert refused(path, "is not JSON").endswith(expected)


@pytest.mark.parametrize("first", ["DTYPES", "DTYPE_NAMES"])
def test_dtype_tables_are_built_on_first_use_whichever_is_asked_first(monkeypatch, first):
    # built lazily so that reading headers never imports torch; a fresh process may ask for either table first
    monkeypatch.delattr(st, "DTYPES")
    monkeypatch.delattr(st, "DTYPE_NAMES")
    getattr(st, first)
    assert st.DTYPES["F8_E4M3"] is torch.float8_e4m3fn and st.DTYPE_NAMES[torch.float8_e4m3fn] == "F8_E4M3"


def test_other_missing_module_attributes_raise_attribute_error():
    assert not hasattr(st, "NO_SUCH_TABLE")
    with pytest.raises(AttributeError, match="module 'qexport.io.safetensors_file' has no attribute 'NO_SUCH_TABLE'"):
        st.NO_SUCH_TABLE


# DirectFile: O_DIRECT appends through a staging buffer. A 16 KB staging buffer here, so that the chunks below cross
# block (4096) and staging boundaries in every way: the file must hold exactly the bytes given, nothing padded.
CHUNKS = [0, 1, 4095, 4096, 4097, 16383, 16384, 16385, 40000, 7]


@pytest.mark.parametrize("count", [0, 1, 3, len(CHUNKS)])
def test_a_direct_file_holds_exactly_the_bytes_written_across_block_and_staging_boundaries(tmp_path, count):
    data = [bytes((i * 7 + j) % 251 for j in range(n)) for i, n in enumerate(CHUNKS[:count])]
    f = st.DirectFile(tmp_path / "out", staging=16384)
    for chunk in data:
        assert f.write(chunk) == len(chunk)
    f.close()
    assert (tmp_path / "out").read_bytes() == b"".join(data)


def test_a_filesystem_that_refuses_o_direct_gets_a_plain_file_with_the_same_bytes(tmp_path, monkeypatch):
    import os

    def refuse_o_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))  # as tmpfs before Linux 6.6 does
        return os_open(path, flags, *args)

    os_open = os.open
    monkeypatch.setattr(st.os, "open", refuse_o_direct)
    f = st.open_for_writing(tmp_path / "out")
    assert not isinstance(f, st.DirectFile)
    f.write(b"abc")
    f.close()
    assert (tmp_path / "out").read_bytes() == b"abc"


def test_a_direct_file_whose_first_write_is_refused_writes_plainly(tmp_path, monkeypatch):
    import os

    write, calls = os.write, []

    def refuse_first(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return write(fd, data)

    f = st.DirectFile(tmp_path / "out", staging=16384)
    monkeypatch.setattr(st.os, "write", refuse_first)
    data = bytes(range(256)) * 100  # 25600 bytes: the first flush is refused, the rest goes through a plain file
    f.write(data)
    f.close()
    assert (tmp_path / "out").read_bytes() == data and calls == [16384]


def test_files_are_opened_direct_exactly_where_the_filesystem_takes_o_direct(tmp_path):
    import os

    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        direct = True
    except (AttributeError, OSError):  # no O_DIRECT on this OS, or a filesystem that refuses it
        direct = False
    f = st.open_for_writing(tmp_path / "out")
    f.close()
    assert isinstance(f, st.DirectFile) == direct


def _short_writes(monkeypatch, limit: int, refuse: dict[int, int] | None = None) -> list[int]:
    """os.write as a filesystem that takes at most `limit` bytes a call; call number n (1-based) in `refuse` raises
    that errno. Returns the list of calls' lengths; more than 10000 calls fail the test (a loop that never ends)."""
    import os

    write, calls = os.write, []

    def short(fd, data):
        calls.append(len(data))
        assert len(calls) < 10000, "the write loop does not advance"
        if refuse and len(calls) in refuse:
            raise OSError(refuse[len(calls)], os.strerror(refuse[len(calls)]))
        return write(fd, data[:limit])  # a slice of the aligned staging buffer: still aligned for O_DIRECT

    monkeypatch.setattr(st.os, "write", short)
    return calls


def test_a_direct_file_completes_writes_the_kernel_takes_in_part(tmp_path, monkeypatch):
    data = bytes(range(251)) * 200  # 50200 bytes through a 16 KB staging buffer, 4096 bytes a write call
    f = st.DirectFile(tmp_path / "out", staging=16384)
    calls = _short_writes(monkeypatch, 4096)
    f.write(data)
    f.close()
    assert (tmp_path / "out").read_bytes() == data
    assert calls[:4] == [16384, 12288, 8192, 4096]  # each call asked for the rest of the block run: no fallback


def test_writes_after_falling_back_to_a_plain_file_all_reach_it(tmp_path, monkeypatch):
    chunks = [bytes([i]) * n for i, n in enumerate([20000, 5, 4096, 30000])]  # the first one overflows the staging
    f = st.DirectFile(tmp_path / "out", staging=16384)
    calls = _short_writes(monkeypatch, 1 << 30, refuse={1: errno.EINVAL})
    for chunk in chunks:
        assert f.write(chunk) == len(chunk)
    f.close()
    assert (tmp_path / "out").read_bytes() == b"".join(chunks) and calls == [16384]


@pytest.mark.parametrize("refuse", [{2: errno.EINVAL}, {1: errno.ENOSPC}], ids=["einval-after-data", "enospc-first"])
def test_only_a_refused_first_direct_write_falls_back_the_rest_are_errors(tmp_path, monkeypatch, refuse):
    # EINVAL once data went out direct cannot be "this filesystem refuses O_DIRECT" (reopening plainly would
    # truncate what was written), and no other error is: both reach the caller.
    f = st.DirectFile(tmp_path / "out", staging=16384)
    _short_writes(monkeypatch, 1 << 30, refuse=refuse)
    with pytest.raises(OSError) as error:
        f.write(bytes(16384 * 2))
        f.close()
    assert error.value.errno == next(iter(refuse.values()))


def test_a_direct_file_gets_the_permissions_a_plain_file_would(tmp_path):
    # Shards must not come out executable or writable by others: the same mode as open(path, "wb") under the umask.
    import stat

    f = st.DirectFile(tmp_path / "direct")
    f.write(b"x")
    f.close()
    with open(tmp_path / "plain", "wb") as g:
        g.write(b"x")
    assert stat.S_IMODE((tmp_path / "direct").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
