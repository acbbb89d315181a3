"""Manifest sources (batch.plan.sources): every form on local disk and memory://, re-chunking, schema
unification across formats, the catalogue request file, text-format errors, bounded memory."""

from __future__ import annotations

import gzip
import io
import json
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batch.plan import sources
from batch.plan.manifest import ManifestError, plan
from batch.plan.manifest import read_manifest as manifest_read_manifest
from batch.plan.sources import CHUNK_ROWS, open_manifest, read_manifest
from batch.spec.config import parse_spec
from batch.store.schema import RESERVED_COLUMNS

ROWS = [{"id": "a", "prompt": "a cat", "seed": 1, "guidance_scale": 7.5, "team": "x"},
        {"id": "b", "prompt": "a dog", "seed": 2**63 - 1, "guidance_scale": 3.0, "team": "y"},
        {"id": "c", "prompt": "NA", "seed": None, "guidance_scale": 5.0, "team": None}]
COLUMNS = ["id", "prompt", "seed", "guidance_scale", "team"]


def _parquet_bytes(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("guidance_scale", pa.float64()),
        ("team", pa.string())])), buf)
    return buf.getvalue()


def _csv_bytes(rows, sep=",") -> bytes:
    def cell(v):
        return "" if v is None else str(v)
    return ("\n".join([sep.join(COLUMNS)] + [sep.join(cell(r[c]) for c in COLUMNS) for r in rows]) + "\n").encode()


def _jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    """A folder URI on local disk or on memory:// (removed afterwards) and a function writing bytes under it."""
    if request.param == "local":
        base = str(tmp_path)
        fs = fsspec.filesystem("file")
    else:
        base = f"memory://sdbatch-sources-{uuid.uuid4().hex}"
        fs = fsspec.filesystem("memory")

    def put(rel: str, data: bytes) -> str:
        uri = f"{base}/{rel}"
        fs.makedirs(uri.rsplit("/", 1)[0], exist_ok=True)
        with fsspec.open(uri, "wb") as fh:
            fh.write(data)
        return uri

    yield base, put
    if request.param == "memory":
        fs.rm(base, recursive=True)


def _rows(table: pa.Table) -> list[dict]:
    return table.select(COLUMNS).to_pylist()


FORMS = {
    "parquet": lambda put: put("m.parquet", _parquet_bytes(ROWS)),
    "pq-no-extension": lambda put: put("manifest", _parquet_bytes(ROWS)),
    "csv": lambda put: put("m.csv", _csv_bytes(ROWS)),
    "tsv": lambda put: put("m.tsv", _csv_bytes(ROWS, "\t")),
    "jsonl": lambda put: put("m.jsonl", _jsonl_bytes(ROWS)),
    "ndjson-gz": lambda put: put("m.ndjson.gz", gzip.compress(_jsonl_bytes(ROWS))),
    "csv-gz": lambda put: put("m.csv.gz", gzip.compress(_csv_bytes(ROWS))),
    "catalogue": lambda put: put("m.json", json.dumps({"input_data": {
        "columns": COLUMNS, "data": [[r[c] for c in COLUMNS] for r in ROWS]}}).encode()),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_file_form_reads_the_same_rows_with_task_types(root, form):
    uri = FORMS[form](root[1])
    source = open_manifest(uri)
    assert source.files == [uri]
    assert source.schema.field("seed").type == pa.int64() and source.schema.field("guidance_scale").type == pa.float64()
    table = read_manifest(uri)
    assert _rows(table) == ROWS  # seed 2**63-1 exact; "NA" stays a prompt; empty cell null
    assert manifest_read_manifest(uri).equals(table)  # manifest.read_manifest delegates
    assert source.num_rows() == (3 if form.startswith("p") else None)


def test_folder_glob_and_list_forms(root):
    base, put = root
    put("parts/part-0.parquet", _parquet_bytes(ROWS[:1]))
    put("parts/sub/part-1.csv", _csv_bytes(ROWS[1:2]))
    put("parts/part-2.jsonl", _jsonl_bytes(ROWS[2:]))
    put("parts/_SUCCESS", b"")
    put("parts/.hidden.csv", b"junk")
    put("parts/_tmp/part-9.parquet", b"junk")
    folder = read_manifest(f"{base}/parts")
    # sorted names: part-0.parquet, part-2.jsonl, sub/part-1.csv
    assert folder.column("id").to_pylist() == ["a", "c", "b"]
    assert [f.rsplit("/", 1)[-1] for f in open_manifest(f"{base}/parts").files] == [
        "part-0.parquet", "part-2.jsonl", "part-1.csv"]

    glob = open_manifest(f"{base}/parts/part-*")
    assert [f.rsplit("/", 1)[-1] for f in glob.files] == ["part-0.parquet", "part-2.jsonl"]
    assert _rows(read_manifest(f"{base}/parts/*/*.csv")) == ROWS[1:2]

    listed = read_manifest([f"{base}/parts/sub/part-1.csv", f"{base}/parts/part-*"])
    assert listed.column("id").to_pylist() == ["b", "a", "c"]
    assert _rows(listed.take([1, 0, 2])) == ROWS

    with pytest.raises(ManifestError, match="no data file matches"):
        open_manifest(f"{base}/parts/*.tsv")
    with pytest.raises(ManifestError, match="not found"):
        open_manifest([f"{base}/parts", f"{base}/absent.csv"])


@pytest.mark.parametrize("rows", [1, 4, 6, 100])
def test_batches_are_rechunked_across_files_to_exactly_rows(tmp_path, rows):
    folder = tmp_path / "parts"
    folder.mkdir()
    sizes = [5, 7, 0, 3, 4]
    n = 0
    for i, size in enumerate(sizes):
        part = [{"id": f"r{n + k}", "prompt": "p", "seed": n + k} for k in range(size)]
        n += size
        if i == 4:
            (folder / f"p{i}.csv").write_text("id,prompt,seed\n" + "".join(f"{r['id']},p,{r['seed']}\n" for r in part))
        else:
            pq.write_table(pa.Table.from_pylist(part, schema=pa.schema(
                [("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int32() if i == 1 else pa.int64())])),
                folder / f"p{i}.parquet", row_group_size=2)
    source = open_manifest(str(folder))
    batches = list(source.iter_batches(rows))
    assert [b.num_rows for b in batches] == [rows] * (n // rows) + ([n % rows] if n % rows else [])
    assert all(b.schema.equals(source.schema) for b in batches)
    whole = read_manifest(str(folder))
    assert pa.Table.from_batches(batches).equals(whole)
    assert whole.column("id").to_pylist() == [f"r{i}" for i in range(n)]
    assert whole.schema.field("seed").type == pa.int64()  # int32 part widened
    with pytest.raises(ValueError, match="positive"):
        next(source.iter_batches(0))


def test_schema_clash_between_csv_and_parquet_names_both_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.csv").write_text("id,prompt,seed\na,x,1\n")
    pq.write_table(pa.table({"id": ["b"], "prompt": ["y"], "seed": ["abc"]}), folder / "b.parquet")
    with pytest.raises(ManifestError, match=r"column 'seed' is int64 in .*a\.csv but string in .*b\.parquet"):
        open_manifest(str(folder))
    # a carried column: inferred int64 in the CSV, double in the Parquet file: widened, values kept
    (folder / "b.parquet").unlink()
    (folder / "a.csv").write_text("id,prompt,score\na,x,1\n")
    pq.write_table(pa.table({"id": ["b"], "prompt": ["y"], "score": [2.5]}), folder / "b.parquet")
    assert read_manifest(str(folder)).column("score").to_pylist() == [1.0, 2.5]


def test_catalogue_parameters_are_row_defaults_and_index_becomes_id(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"input_data": {
        "columns": ["prompt", "guidance_scale"],
        "data": [["a cat", None], ["a dog", 3.0]],
        "index": [10, "k"],
        "parameters": {"num_inference_steps": 30, "guidance_scale": 7.5}}}))
    table = read_manifest(str(path))
    assert table.column_names == ["id", "prompt", "guidance_scale", "num_inference_steps"]
    assert table.to_pylist() == [
        {"id": "10", "prompt": "a cat", "guidance_scale": 7.5, "num_inference_steps": 30},
        {"id": "k", "prompt": "a dog", "guidance_scale": 3.0, "num_inference_steps": 30}]
    # the rows plan like any manifest's
    p = plan(table, parse_spec({"defaults": {"height": 64, "width": 64}}), RESERVED_COLUMNS)
    assert p.failed.num_rows == 0 and sorted(p.items.column("num_inference_steps").to_pylist()) == [30, 30]

    # one column: rows may be bare values; no index: ids are positions; top-level parameters; id column kept
    path.write_text(json.dumps({"input_data": {"columns": ["prompt"], "data": ["x", "y"]},
                                "parameters": {"seed": 5}}))
    assert read_manifest(str(path)).to_pylist() == [{"id": "0", "prompt": "x", "seed": 5},
                                                    {"id": "1", "prompt": "y", "seed": 5}]
    path.write_text(json.dumps({"input_data": {"columns": ["id", "prompt"], "data": [["q", "x"]], "index": [3]}}))
    assert read_manifest(str(path)).to_pylist() == [{"id": "q", "prompt": "x"}]


@pytest.mark.parametrize("doc, match", [
    ([1, 2], "no input_data object"),
    ({"inputs": {}}, "no input_data object"),
    ({"input_data": {"columns": "prompt", "data": []}}, "columns must be a non-empty list"),
    ({"input_data": {"columns": ["prompt"], "data": {"a": 1}}}, "data must be a list of rows"),
    ({"input_data": {"columns": ["id", "prompt"], "data": [["a", "x"], ["b"]]}}, r"data\[1\] must be a list of 2"),
    ({"input_data": {"columns": ["prompt", "prompt"], "data": []}}, r"repeated column name\(s\) \['prompt'\]"),
    ({"input_data": {"columns": ["prompt"], "data": ["x"], "index": [1, 2]}}, "index must be a list as long as"),
    ({"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"steps": 3}}}, "unknown parameter 'steps'"),
    ({"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"seed": "7"}}}, "parameter seed must be an integer"),
    ({"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {}}, "parameters": {}}, "both inside"),
    ({"input_data": {"columns": ["prompt"], "data": ["x"], "extra": 1}}, r"unknown key\(s\) \['extra'\]"),
    ({"input_data": {"columns": ["prompt", "seed"], "data": [["x", 1], ["y", 1.5]]}}, r"data\[1\]: seed must be an integer"),
])
def test_bad_catalogue_files_name_the_problem(tmp_path, doc, match):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=match) as err:
        open_manifest(str(path)).iter_batches().__next__()
    assert "request.json" in str(err.value)


def test_catalogue_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "request.json"
    path.write_text('{"input_data":\n {"columns": [}')
    with pytest.raises(ManifestError, match=r"request\.json: not valid JSON .* line 2"):
        open_manifest(str(path))


def test_csv_errors_name_the_row_and_column(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,seed,num_images\na,x,1,1\nb,y,abc,1\n")
    with pytest.raises(ManifestError, match=r"m\.csv: data row 2, column 'seed': cannot read 'abc' as int64"):
        read_manifest(str(path))
    path.write_text('id,prompt,seed\na,x,1\nb,"multi\nline, quoted",2\nc,z,3,4\n')
    with pytest.raises(ManifestError, match=r"m\.csv: malformed CSV row .*expected 3 fields, got 4: 'c,z,3,4'"):
        read_manifest(str(path))
    path.write_text("id,prompt,id\na,x,b\n")
    with pytest.raises(ManifestError, match=r"repeated column name\(s\) \['id'\]"):
        open_manifest(str(path))
    path.write_text("")
    with pytest.raises(ManifestError, match="needs a header line"):
        open_manifest(str(path))
    # a carried column's type comes from the first CHUNK_ROWS rows; a later value that does not fit is named
    monkeypatch.setattr(sources, "CHUNK_ROWS", 4)
    path.write_text("id,prompt,score\n" + "".join(f"r{i},p,{i}\n" for i in range(5)) + "r5,p,high\n")
    with pytest.raises(ManifestError, match=r"data row 6, column 'score': cannot read 'high' as int64 \(its type "
                                            r"was inferred"):
        list(open_manifest(str(path)).iter_batches(2))
    # quoted empty string is "", an empty cell is null; a multi-line quoted prompt survives
    path.write_text('id,prompt,negative_prompt\na,"two\nlines",""\nb,y,\n')
    assert read_manifest(str(path)).to_pylist() == [{"id": "a", "prompt": "two\nlines", "negative_prompt": ""},
                                                   {"id": "b", "prompt": "y", "negative_prompt": None}]
    # a byte-order mark and CRLF line ends (spreadsheet exports) read the same
    path.write_bytes(b"\xef\xbb\xbfid,prompt,seed\r\na,x,1\r\n")
    assert read_manifest(str(path)).to_pylist() == [{"id": "a", "prompt": "x", "seed": 1}]


def test_jsonl_errors_name_the_line(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl: line 3: not valid JSON"):
        read_manifest(str(path))
    path.write_text('{"id": "a", "prompt": "x"}\n["b", "y"]\n')
    with pytest.raises(ManifestError, match=r"line 2: must be a JSON object"):
        read_manifest(str(path))
    path.write_text('{"id": "a", "prompt": "x", "seed": 1}\n{"id": "b", "prompt": "y", "seed": 1.5}\n')
    with pytest.raises(ManifestError, match=r"line 2: seed must be an integer .* got 1\.5"):  # not truncated to 1
        read_manifest(str(path))
    path.write_text('{"id": "a", "prompt": "x", "guidance_scale": true}\n')
    with pytest.raises(ManifestError, match=r"line 1: guidance_scale must be a number"):
        read_manifest(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\r\n')
    assert read_manifest(str(path)).to_pylist() == [{"id": "a", "prompt": "x"}]
    monkeypatch.setattr(sources, "CHUNK_ROWS", 2)  # columns are fixed by the first CHUNK_ROWS rows
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "c", "prompt": "z", "k": 1}\n')
    with pytest.raises(ManifestError, match=r"line 3: column\(s\) \['k'\] do not appear in the first 2 rows"):
        read_manifest(str(path))
    path.write_text('{"id": "a", "prompt": "x", "k": 1}\n{"id": "b", "prompt": "y"}\n{"id": "c", "prompt": "z", '
                    '"k": "one"}\n')
    with pytest.raises(ManifestError, match=r"line 3: column 'k': cannot read 'one' as int64"):
        read_manifest(str(path))


def test_unreadable_inputs_are_manifest_errors(tmp_path):
    (tmp_path / "m.parquet.gz").write_bytes(gzip.compress(_parquet_bytes(ROWS)))
    with pytest.raises(ManifestError, match="compressed Parquet file cannot be streamed"):
        open_manifest(str(tmp_path / "m.parquet.gz"))
    (tmp_path / "noext").write_text("id,prompt\n")
    with pytest.raises(ManifestError, match="noext: not a readable Parquet file"):
        open_manifest(str(tmp_path / "noext"))
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ManifestError, match=r"bad\.csv\.gz"):
        read_manifest(str(tmp_path / "bad.csv.gz"))
    for bad in ([], [""], 3):
        with pytest.raises(ManifestError, match="must be a URI or a non-empty list"):
            open_manifest(bad)


_PEAK = """
import sys
import pyarrow as pa
from batch.plan.sources import open_manifest
source = open_manifest(sys.argv[1])
seen, last = 0, None
for batch in source.iter_batches(int(sys.argv[2])):
    seen, last = seen + batch.num_rows, batch.column("seed")[-1].as_py()
print(seen, last, source.num_rows(), pa.default_memory_pool().max_memory())
"""


@pytest.mark.parametrize("form", ["parquet", "csv"])
def test_iter_batches_never_materialises_a_large_file(tmp_path, form):
    """2M rows (72 MB of Arrow data; Parquet in 64Ki-row row groups): the Arrow pool's peak in a fresh process
    that opens the manifest and iterates over it stays far below the decoded size."""
    import os
    import subprocess
    import sys

    import pyarrow.csv as pcsv

    n = 2_000_000
    ids = pc.cast(pa.array(np.arange(n)), pa.string())
    table = pa.table({"id": ids, "prompt": pc.binary_join_element_wise("prompt ", ids, ""),
                      "seed": pa.array(np.arange(n, dtype=np.int64))})
    decoded = table.nbytes
    path = tmp_path / f"big.{form}"
    if form == "parquet":
        pq.write_table(table, path, row_group_size=65536)
    else:
        pcsv.write_csv(table, path)
    del table, ids
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(CHUNK_ROWS)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    seen, last, rows, peak = int(out[0]), int(out[1]), out[2], int(out[3])
    assert (seen, last, rows) == (n, n - 1, str(n) if form == "parquet" else "None")
    assert decoded > 60e6 and 0 < peak < decoded / 4, (peak, decoded)


def test_spec_and_locations_take_a_list_of_manifests(tmp_path):
    from batch.plan.locations import input_rules, manifest_folder

    spec = parse_spec({"manifest": [str(tmp_path / "a" / "m.csv"), "memory://bucket/b/*.jsonl"]})
    assert isinstance(spec.manifest, list)
    assert parse_spec({"manifest": ["x.parquet"]}).manifest == "x.parquet"
    with pytest.raises(Exception, match="at least one URI"):
        parse_spec({"manifest": []})
    (tmp_path / "a").mkdir()
    allowed, base = input_rules(spec)
    assert allowed == [str((tmp_path / "a").resolve()), "memory:///bucket/b"] and base == allowed[0]
    assert manifest_folder("s3://bucket/jobs/*/m.csv") == "s3://bucket/jobs"
    assert manifest_folder(str(tmp_path / "a" / "*.csv")) == str((tmp_path / "a").resolve())


def test_cli_validate_reads_several_manifests(tmp_path, capsys):
    from batch.cli import main

    (tmp_path / "a.csv").write_text("id,prompt\na,x\n")
    (tmp_path / "b.jsonl").write_text('{"id": "b", "prompt": "y", "seed": 3}\n')
    assert main(["validate", str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 2 and report["rows_ok"] == 2


@pytest.mark.slow  # a moto server (~4 s here); every form also runs on memory:// in the fast tests
def test_forms_on_loopback_s3():
    """A folder, a glob and a list on S3 (moto on loopback, s3fs): the same rows as on local disk."""
    from conftest import loopback_s3

    with loopback_s3("sdbatch-sources") as options:
        fs = fsspec.filesystem("s3", **options)
        fs.pipe_file("sdbatch-sources/m/part-0.parquet", _parquet_bytes(ROWS[:1]))
        fs.pipe_file("sdbatch-sources/m/part-1.csv.gz", gzip.compress(_csv_bytes(ROWS[1:2])))
        fs.pipe_file("sdbatch-sources/m/part-2.jsonl", _jsonl_bytes(ROWS[2:]))
        fs.pipe_file("sdbatch-sources/m/_SUCCESS", b"")
        assert _rows(read_manifest("s3://sdbatch-sources/m", options)) == ROWS
        source = open_manifest("s3://sdbatch-sources/m/part-*", options)
        assert source.files == [f"s3://sdbatch-sources/m/part-{i}{ext}"
                                for i, ext in enumerate([".parquet", ".csv.gz", ".jsonl"])]
        assert [b.num_rows for b in source.iter_batches(2)] == [2, 1]
        listed = read_manifest(["s3://sdbatch-sources/m/part-2.jsonl", "s3://sdbatch-sources/m/part-0.parquet"],
                               options)
        assert listed.column("id").to_pylist() == ["c", "a"]
        with pytest.raises(ManifestError, match="not found"):
            open_manifest("s3://sdbatch-sources/absent.csv", options)
