"""Our safetensors header reader against the safetensors library (issue 26, class 5): what the library refuses,
`read_header` refuses too, and so export (exit 2), inspect (a problem listed) and merge --lora (exit 2, no
traceback) refuse it before the library ever sees the file.

Law of the fuzz: `read_header` accepts <=> `safetensors.safe_open` accepts, except the refusals listed in
STRICTER_ON_PURPOSE (each with why). Mutations are made on the header's text, so they reach what a dict cannot
hold: duplicate keys, NaN, -0, lone surrogate escapes, numbers out of range, deep nesting, raw byte edits.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fixtures.bad_inputs import read_raw
from qexport.errors import InputError
from qexport.io.safetensors_file import read_header
from tests.acceptance.test_hostile_inputs import MINI, SINGLE, assert_refused, make_adapter_files, run_main

ENTRY = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


def header_file(path: Path, text: str, data: bytes = bytes(8)) -> Path:
    raw = text.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def library_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except BaseException as e:  # SafetensorError; a Rust panic is a pyo3 PanicException (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False
    return True


def we_accept(path: Path) -> tuple[bool, str]:
    try:
        read_header(path)
    except InputError as e:
        return False, str(e)
    return True, ""


# ---------------------------------------------------------------------------------------------------------------
# What the library refuses, one case each: read_header refuses it too.

REFUSED_BY_THE_LIBRARY = {
    "two __metadata__": '{"__metadata__":{},"__metadata__":{},"a":%s}' % ENTRY,
    "two null __metadata__": '{"__metadata__":null,"__metadata__":null,"a":%s}' % ENTRY,
    "NaN in an entry": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"note":NaN}}',
    "Infinity in an entry": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"note":Infinity}}',
    "-Infinity in an entry": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"note":-Infinity}}',
    "a field twice in an entry": '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "shape twice in an entry": '{"a":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}}',
    "a lone leading surrogate in a name": '{"\\ud800":%s}' % ENTRY,
    "a lone trailing surrogate in a name": '{"\\udc00a":%s}' % ENTRY,
    "a lone surrogate in metadata": '{"__metadata__":{"k":"\\ud800"},"a":%s}' % ENTRY,
    "a lone surrogate in an extra field": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":"\\udfff"}}',
    "a float past the double range": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":1e400}}',
    "an integer past the double range": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":%s}}' % ("9" * 400),
    "an integer of 5000 digits": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":%s}}' % ("9" * 5000),
    "-0 as an offset": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}',
    "-0 in a shape": '{"a":{"dtype":"F32","shape":[2,-0],"data_offsets":[0,0]}}',
    "128 levels of nesting": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":%s}}' % ("[" * 126 + "]" * 126),
    "900 levels of nesting": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":%s}}' % ("[" * 898 + "]" * 898),
}
ACCEPTED_BY_THE_LIBRARY = {
    "127 levels of nesting": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":%s}}' % ("[" * 125 + "]" * 125),
    "an escaped surrogate pair": '{"\\ud83d\\ude00":%s}' % ENTRY,
    "-0 in an extra field": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":-0}}',
    "an integer past 2**64 in an extra field": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":%s}}' % ("9" * 30),
    "a float below the double range": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"n":1e-400}}',
    "whitespace around the object": ' \n\t{"a":%s}\r ' % ENTRY,
    "null __metadata__": '{"__metadata__":null,"a":%s}' % ENTRY,
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_THE_LIBRARY))
def test_a_header_the_library_refuses_is_refused(case, tmp_path):
    path = header_file(tmp_path / "x.safetensors", REFUSED_BY_THE_LIBRARY[case])
    assert not library_accepts(path)  # the premise, checked against the installed library
    accepted, _ = we_accept(path)
    assert not accepted


@pytest.mark.parametrize("case", sorted(ACCEPTED_BY_THE_LIBRARY))
def test_a_header_the_library_accepts_is_accepted(case, tmp_path):
    path = header_file(tmp_path / "x.safetensors", ACCEPTED_BY_THE_LIBRARY[case])
    assert library_accepts(path)
    accepted, error = we_accept(path)
    assert accepted, error


def test_a_header_longer_than_the_librarys_100_000_000_bytes_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(8 + 100_000_001 + 8)  # sparse: nothing is written
    assert not library_accepts(path)
    accepted, error = we_accept(path)
    assert not accepted and "100,000,000" in error


# ---------------------------------------------------------------------------------------------------------------
# The commands: the refusal comes from our reader, as one line naming the file.


@pytest.fixture(scope="module")
def mini(build_model):
    return build_model("qwen3", **MINI)


def splice(path: Path, edit) -> None:
    """Rewrite a safetensors file's header text through `edit(text) -> text`, data unchanged."""
    header, data = read_raw(path)
    header_file(path, edit(json.dumps(header, separators=(",", ":"))), data)


EDITS = {
    "two __metadata__": lambda t: t.replace("{", '{"__metadata__":{},"__metadata__":{"format":"pt"},', 1),
    "NaN in an entry": lambda t: t.replace('"dtype":', '"note":NaN,"dtype":', 1),
    "dtype twice in an entry": lambda t: t.replace('"dtype":', '"dtype":"F32","dtype":', 1),
}


@pytest.fixture
def src(mini, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(mini, folder)
    return folder


@pytest.mark.parametrize("case", sorted(EDITS))
def test_export_refuses_a_header_the_library_refuses_naming_the_file(case, src, tmp_path):
    splice(src / SINGLE, EDITS[case])
    rc, err = run_main("export", str(src), "--out", str(tmp_path / "out"), "--formats", "int4", "--quiet")
    assert_refused(rc, err, SINGLE)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_tensor_named_twice_although_the_library_keeps_the_last(src, tmp_path):
    splice(src / SINGLE, lambda t: t.replace('{"', '{"model.norm.weight":{"dtype":"F32","shape":[0],'
                                                  '"data_offsets":[0,0]},"', 1))
    assert library_accepts(src / SINGLE)  # the library keeps the last copy; another reader may keep the first
    rc, err = run_main("export", str(src), "--out", str(tmp_path / "out"), "--formats", "int4", "--quiet")
    assert_refused(rc, err, SINGLE, "model.norm.weight", "twice")


@pytest.mark.parametrize("case", sorted(EDITS))
def test_inspect_lists_a_header_the_library_refuses_as_a_problem(case, src, capsys):
    from qexport.cli.main import main

    splice(src / SINGLE, EDITS[case])
    rc = main(["inspect", str(src)])
    out = capsys.readouterr().out
    assert rc == 1 and "none found" not in out and SINGLE in out


@pytest.mark.parametrize("case", sorted(EDITS))
def test_merge_refuses_an_adapter_header_the_library_refuses_in_one_line(case, src, tmp_path):
    adapter = make_adapter_files(src, tmp_path / "adapter", {"target_modules": ["q_proj"]})
    splice(adapter / "adapter_model.safetensors", EDITS[case])
    rc, err = run_main("merge", "--base", str(src), "--lora", str(adapter), "--out", str(tmp_path / "m"), "--quiet")
    assert_refused(rc, err, "adapter_model.safetensors")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------
# The fuzz: mutations of a valid header, as text and as bytes.

# Where read_header refuses what the library accepts, on purpose; each named by a phrase of its one-line error.
STRICTER_ON_PURPOSE = {
    # A key twice: the library keeps the last tensor or metadata value (and ignores repeats inside unknown fields),
    # other JSON readers keep the first; a file two readers read differently is refused.
    "twice": "duplicate keys",
    # dtypes the library reads that no qexport format reads or writes (U16, C64, sub-byte floats, ...)
    "unknown dtype": "DTYPES",
    # torch cannot build a tensor of rank > 8, nor a dimension past 2**40 even when empty (the library accepts both
    # for zero-size tensors)
    "or a dimension above 2**40": "MAX_DIMS / MAX_DIM",
    # the library also reads an entry written as an array ["F32", [2], [0, 8]]; no writer produces it
    "header entry is not an object": "entries as arrays",
}

VALID = {"__metadata__": {"format": "pt"},
         "a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
         "b": {"dtype": "I8", "shape": [4], "data_offsets": [12, 16]},
         "c": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]}}
DATA = bytes(range(16))

# JSON tokens a mutation may write anywhere a value goes, non-standard ones included
ODD_VALUES = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "-0", "-0.0", "0.0", "2.0", "1e400", "-1e400", "1e-400", "9" * 25, "9" * 400,
    "18446744073709551615", "18446744073709551616", "-1", "true", "null", '""', '"\\ud800"', '"\\udc00"',
    '"\\ud83d\\ude00"', "[]", "{}", "[" * 126 + "]" * 126, "[" * 125 + "]" * 125, '{"k":1,"k":2}', '"F32"',
    '"U16"', '"f32"', "[0,8]", "[0,8,9]", "[2]", "[1,1,1,1,1,1,1,1,1,2]", '["F32",[2],[0,8]]',
])


def text_mutations():
    key = st.sampled_from(["__metadata__", "a", "b", "c", "dtype", "shape", "data_offsets", "format", "note",
                           "\\ud800", ""])
    return st.one_of(
        # a key written again, before or after the original
        st.tuples(st.just("duplicate"), st.sampled_from(["__metadata__", "a", "b", "c", "dtype", "shape",
                                                         "data_offsets", "format"]), st.booleans()),
        # a field added to an entry, the metadata or the top level
        st.tuples(st.just("add"), st.sampled_from(['"a":{', '"b":{', '"c":{', '"__metadata__":{', '{']),
                  st.tuples(key, ODD_VALUES)),
        # a value replaced by an odd token
        st.tuples(st.just("replace"), st.sampled_from(['"F16"', '"I8"', "[2,3]", "[4]", "[0]", "[0,12]", "[12,16]",
                                                       "[16,16]", '"pt"', "12", "16"]), ODD_VALUES),
        # one byte of the header text changed, inserted or removed
        st.tuples(st.just("byte"), st.integers(0, 400), st.tuples(st.sampled_from(["set", "insert", "delete"]),
                                                                   st.integers(0, 255))),
        # the data section resized, the length prefix changed
        st.tuples(st.just("resize"), st.integers(-17, 9), st.none()),
        st.tuples(st.just("length"), st.integers(-3, 3), st.none()),
    )


def mutated_file(mutations) -> bytes:
    text = json.dumps(VALID, separators=(",", ":"))
    data, length_delta = DATA, 0
    for kind, where, what in mutations:
        if kind == "duplicate":
            start = text.find(f'"{where}":')
            if start < 0:
                continue
            value_end = _value_end(text, start + len(where) + 3)
            pair = text[start:value_end]
            text = (text[:start] + pair + "," + text[start:]) if what else (text[:value_end] + "," + pair
                                                                          + text[value_end:])
        elif kind == "add":
            at = text.find(where)
            if at >= 0:
                at += len(where)
                key, value = what
                text = text[:at] + f'"{key}":{value}' + ("" if text[at] == "}" else ",") + text[at:]
        elif kind == "replace":
            text = text.replace(where, what, 1)
        elif kind == "byte":
            raw = bytearray(text.encode("utf-8", "surrogatepass"))
            op, value = what
            at = where % (len(raw) + (op == "insert"))
            if op == "set" and raw:
                raw[at % len(raw)] = value
            elif op == "insert":
                raw.insert(at, value)
            elif raw:
                del raw[at % len(raw)]
            text = raw.decode("utf-8", "surrogateescape")
        elif kind == "resize":
            data = data[:len(data) + where] if where < 0 else data + bytes(where)
        elif kind == "length":
            length_delta += where
    raw = text.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


def _value_end(text: str, start: int) -> int:
    """Index just past the JSON value starting at `start` (balanced brackets, strings skipped)."""
    depth, i, in_string = 0, start, False
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            if depth == 0:
                return i
            depth -= 1
            if depth == 0:
                return i + 1
        elif ch == "," and depth == 0:
            return i
        i += 1
    return i


def assert_same_verdict(raw: bytes, folder: Path) -> None:
    path = folder / "x.safetensors"
    path.write_bytes(raw)
    library, (ours, error) = library_accepts(path), we_accept(path)
    if ours:
        assert library, "read_header accepts a file the safetensors library refuses"
    elif library:
        reasons = [why for phrase, why in STRICTER_ON_PURPOSE.items() if phrase in error]
        assert reasons, f"the library accepts, read_header refuses without a listed reason: {error}"


FUZZ = dict(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)


@settings(max_examples=400, derandomize=True, **FUZZ)  # about 3 s here
@given(mutations=st.lists(text_mutations(), min_size=1, max_size=3))
@example(mutations=[("duplicate", "__metadata__", False)])
@example(mutations=[("add", '"a":{', ("note", "NaN"))])
@example(mutations=[("duplicate", "dtype", True)])
def test_read_header_and_the_library_agree_on_mutated_headers(mutations, tmp_path):
    assert_same_verdict(mutated_file(mutations), tmp_path)


@pytest.mark.slow
@settings(max_examples=20_000, **FUZZ)
@given(mutations=st.lists(text_mutations(), min_size=1, max_size=6))
def test_read_header_and_the_library_agree_on_mutated_headers_deep(mutations, tmp_path):
    assert_same_verdict(mutated_file(mutations), tmp_path)
