"""Trace readers: good input gives the documented values, bad input one clear TraceFormatError."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from colocate.errors import TraceFormatError
from traces import bundled
from traces.azure import read_azure2019, read_azure2021
from traces.daint import read_daint
from traces.formats import detect_faas_format, detect_jobs_format, read_faas, read_jobs
from traces.sacct import read_sacct_json, read_sacct_pipe
from traces.swf import read_swf

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "traces"
MIB = 1024**2

SWF = """; Version: 2.2
; UnixStartTime: 1000000
; MaxNodes: 4
; MaxProcs: 16
;
 1  0  10  100  4  50  1024  4  200  2048  1  1  1  -1  1  1  -1  -1
 2  5   0    0  2  -1    -1  2  200    -1  5  1  1  -1  1  1  -1  -1
 3  7   3   60  8  -1    -1  8  100    -1  1  2  1  -1  1  1  -1  -1
"""


def write(tmp_path: Path, name: str, text: str, compress: bool = False) -> Path:
    path = tmp_path / name
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_swf_reads_header_times_and_usage(tmp_path: Path, compress: bool) -> None:
    trace = read_swf(write(tmp_path, "t.swf.gz" if compress else "t.swf", SWF, compress))
    assert (trace.max_nodes, trace.max_procs, trace.unix_start_time) == (4, 16, 1_000_000)
    assert trace.job_id.tolist() == [1, 3]  # job 2 never ran
    assert trace.skipped == {"never ran (run time <= 0)": 1}
    assert trace.start_s.tolist() == [1_000_010, 1_000_010]
    assert trace.end_s.tolist() == [1_000_110, 1_000_070]
    assert trace.cpu_used_ratio[0] == pytest.approx(0.5)
    assert np.isnan(trace.cpu_used_ratio[1])
    assert trace.memory_used_bytes[0] == 4 * 1024 * 1024  # 1024 KB per processor x 4
    assert trace.memory_alloc_bytes[0] == 4 * 2048 * 1024


def test_swf_bad_field_names_line_and_field(tmp_path: Path) -> None:
    bad = SWF.replace(" 3  7   3   60", " 3  7   x   60")
    with pytest.raises(TraceFormatError) as err:
        read_swf(write(tmp_path, "bad.swf", bad))
    assert err.value.line == 8
    assert err.value.field == "3 (wait_time)"
    assert "bad.swf:8: field 3 (wait_time)" in str(err.value)


def test_swf_short_line_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match=r"short.swf:6: 17 fields, SWF lines have 18"):
        read_swf(write(tmp_path, "short.swf", SWF.replace("1  1  -1  -1\n 2", "1  1  -1\n 2")))


def test_swf_given_json_says_swf_was_expected(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError) as err:
        read_swf(FIXTURES / "sacct_22.05.json")
    assert err.value.expected_format == "swf"


def test_missing_file_and_broken_gzip_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="no such file"):
        read_swf(tmp_path / "absent.swf")
    broken = tmp_path / "broken.swf.gz"
    broken.write_bytes(gzip.compress(SWF.encode())[:40])
    with pytest.raises(TraceFormatError, match="broken gzip"):
        read_swf(broken)


def test_bundled_hpc2n_excerpt_has_measured_usage() -> None:
    trace = read_swf(bundled.HPC2N_EXCERPT)
    assert len(trace) == 3145
    assert trace.max_procs == 240
    assert np.isfinite(trace.cpu_used_ratio).mean() > 0.8
    assert np.nanmedian(trace.cpu_used_ratio) == pytest.approx(1.0, abs=0.01)


def test_sacct_json_jobs_usage_and_pending_skipped() -> None:
    trace = read_sacct_json(FIXTURES / "sacct_22.05.json")
    assert trace.job_id.tolist() == [101, 102]
    assert trace.skipped == {"never started or no cores": 1}
    assert trace.cores.tolist() == [4, 8]
    assert trace.nodes.tolist() == [1, 2]
    assert (trace.end_s - trace.start_s).tolist() == [3600, 1800]
    assert trace.memory_alloc_bytes.tolist() == [8192 * MIB, 16384 * MIB]
    assert trace.cpu_used_ratio[0] == pytest.approx(7200 / (3600 * 4))
    assert trace.memory_used_bytes[0] == 4 * 512 * MIB  # step max RSS x 4 tasks
    assert np.isnan(trace.memory_used_bytes[1])


def test_sacct_pipe_jobs_with_steps_folded_in() -> None:
    trace = read_sacct_pipe(FIXTURES / "sacct_22.05_pipe.txt")
    assert trace.job_id.tolist() == [201, 202, 204]
    assert (trace.start_s - trace.submit_s).tolist() == [60, 100, 30]
    assert trace.memory_alloc_bytes.tolist() == [8000 * MIB, 8 * 2000 * MIB, 4000 * MIB]
    assert trace.memory_used_bytes[0] == 4 * 512 * MIB
    assert trace.memory_used_bytes[1] == 1024**3 * 2
    assert trace.cpu_used_ratio[0] == pytest.approx(0.5)
    assert trace.cpu_used_ratio[2] == pytest.approx(190 / 240)


def test_sacct_pipe_bad_time_names_line_and_field(tmp_path: Path) -> None:
    text = (
        (FIXTURES / "sacct_22.05_pipe.txt").read_text().replace("2022-11-28T10:08:30", "yesterday")
    )
    with pytest.raises(TraceFormatError) as err:
        read_sacct_pipe(write(tmp_path, "s.txt", text))
    assert (err.value.line, err.value.field) == (8, "Start")


def test_sacct_pipe_without_header_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="expected sacct -P output"):
        read_sacct_pipe(write(tmp_path, "s.txt", SWF))


def test_sacct_json_broken_json_names_line(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match=r"j.json:2: not JSON"):
        read_sacct_json(write(tmp_path, "j.json", '{"jobs": [\n  {,}]}'))


def test_azure2019_bundled_slice() -> None:
    trace = read_azure2019(bundled.AZURE2019)
    assert trace.invocations.shape == (500, 480)
    assert trace.first_minute == 480
    assert trace.total_invocations == 3_037_902
    assert np.all(trace.duration_s > 0) and np.all(trace.memory_bytes > 0)


AZ19_INV = "HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f1,http,1,0,2\no,a,f2,timer,0,5,0\n"
AZ19_DUR = "HashOwner,HashApp,HashFunction,Average,Count,Minimum,Maximum\no,a,f1,500,3,1,900\n"
AZ19_MEM = "HashOwner,HashApp,SampleCount,AverageAllocatedMb\no,a,10,128\n"


def test_azure2019_per_app_memory_and_missing_duration(tmp_path: Path) -> None:
    write(tmp_path, "invocations.csv", AZ19_INV)
    write(tmp_path, "durations.csv", AZ19_DUR)
    write(tmp_path, "memory.csv", AZ19_MEM)
    trace = read_azure2019(tmp_path)
    assert trace.invocations.tolist() == [[1, 0, 2], [0, 5, 0]]
    assert trace.duration_s.tolist() == [0.5, 0.5]  # f2 gets the median
    assert trace.memory_bytes.tolist() == [128 * MIB, 128 * MIB]  # per app
    assert any("without duration" in n for n in trace.notes)


def test_azure2019_bad_count_names_minute(tmp_path: Path) -> None:
    write(tmp_path, "invocations.csv", AZ19_INV.replace("0,5,0", "0,five,0"))
    write(tmp_path, "durations.csv", AZ19_DUR)
    write(tmp_path, "memory.csv", AZ19_MEM)
    with pytest.raises(TraceFormatError) as err:
        read_azure2019(tmp_path)
    assert (err.value.line, err.value.field) == (3, "2")


def test_azure2021_records_binned_per_minute(tmp_path: Path) -> None:
    text = "app,func,end_timestamp,duration\na,f,10.0,1.0\na,f,70.5,0.5\na,g,130,20\n"
    trace = read_azure2021(write(tmp_path, "r.csv", text))
    assert trace.function_ids == ("a/f", "a/g")
    assert trace.invocations.tolist() == [[1, 1], [0, 1]]  # g started at 110 s
    assert trace.duration_s.tolist() == [0.75, 20.0]


def test_azure2021_negative_duration_is_named(tmp_path: Path) -> None:
    text = "app,func,end_timestamp,duration\na,f,10.0,1.0\na,f,70.5,-3\n"
    with pytest.raises(TraceFormatError) as err:
        read_azure2021(write(tmp_path, "r.csv", text))
    assert (err.value.line, err.value.field) == (3, "duration")


def test_daint_bundled_reproduces_published_idle_figures() -> None:
    """Copik et al. (IPDPS'24): idle cores mean 6.65 %, free memory mean 80.6 %."""
    summary = read_daint(bundled.DAINT_UTILIZATION).summary()
    assert summary["samples"] == 11624
    assert summary["idle_cores_mean_pct"] == pytest.approx(6.65, abs=0.01)
    assert summary["free_memory_mean_pct"] == pytest.approx(80.6, abs=0.05)
    assert summary["idle_cores_p95_pct"] == pytest.approx(24.2, abs=0.05)
    assert summary["free_memory_min_pct"] == pytest.approx(64.1, abs=0.05)


def test_daint_bad_fraction_is_named(tmp_path: Path) -> None:
    header = ",date,idle_cpus,partially_idle_cpus,partially_free_mem,free_mem,allocated_nodes,idle_nodes,other_nodes,total_nodes\n"
    row = "0,18-03-22 17:35:39,0.02,0.02,1.7,0.02,6800,186,255,7241\n"
    with pytest.raises(TraceFormatError) as err:
        read_daint(write(tmp_path, "out_0.csv", header + row))
    assert (err.value.line, err.value.field) == (2, "partially_free_mem")


def test_format_detection() -> None:
    assert detect_jobs_format(bundled.HPC2N_EXCERPT) == "swf"
    assert detect_jobs_format(FIXTURES / "sacct_22.05.json") == "sacct-json"
    assert detect_jobs_format(FIXTURES / "sacct_22.05_pipe.txt") == "sacct-pipe"
    assert detect_faas_format(bundled.AZURE2019) == "azure2019"
    assert len(read_jobs(FIXTURES / "sacct_22.05_pipe.txt")) == 3
    assert read_faas(bundled.AZURE2019).minutes == 480


def test_unknown_job_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="not a job trace I know"):
        read_jobs(write(tmp_path, "x.csv", "a,b,c\n1,2,3\n"))


def test_swf_compensating_field_counts_are_caught(tmp_path: Path) -> None:
    """17 fields on one line and 19 on the next add up to 36: still an error, not shifted jobs."""
    lines = SWF.splitlines()
    lines[5] = lines[5].rsplit(" ", 1)[0]  # 17 fields
    lines[7] = lines[7] + " -1"  # 19 fields
    with pytest.raises(TraceFormatError, match=r":6: 17 fields"):
        read_swf(write(tmp_path, "c.swf", "\n".join(lines) + "\n"))


def test_sacct_json_newer_number_objects(tmp_path: Path) -> None:
    """Slurm 23.02+ wraps numbers as {"set": true, "number": N}; both shapes read alike."""
    import json

    def num(n: int) -> dict[str, object]:
        return {"set": True, "infinite": False, "number": n}

    doc = {
        "jobs": [
            {
                "job_id": 7,
                "time": {
                    "submission": num(100),
                    "start": num(160),
                    "end": num(760),
                    "total": {"seconds": 600, "microseconds": 0},
                },
                "required": {"CPUs": num(2), "memory_per_node": num(1024)},
                "tres": {
                    "allocated": [{"type": "cpu", "count": 2}, {"type": "mem", "count": 2048}]
                },
                "steps": [],
            }
        ]
    }
    trace = read_sacct_json(write(tmp_path, "new.json", json.dumps(doc)))
    assert trace.job_id.tolist() == [7]
    assert (trace.start_s - trace.submit_s).tolist() == [60]
    assert trace.memory_alloc_bytes.tolist() == [2048 * MIB]
    assert trace.cpu_used_ratio[0] == pytest.approx(0.5)


def test_sacct_json_job_without_time_is_named(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError) as err:
        read_sacct_json(write(tmp_path, "j.json", '{"jobs": [{"job_id": 1}]}'))
    assert err.value.field == "jobs[0]"
