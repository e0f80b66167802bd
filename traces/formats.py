"""Format detection: which reader a job or FaaS trace file needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from colocate.errors import TraceFormatError
from traces.azure import FaasTrace, read_azure2019, read_azure2021
from traces.jobs import JobTrace
from traces.sacct import read_sacct_json, read_sacct_pipe
from traces.swf import read_swf
from traces.textfile import read_text

JOB_READERS: dict[str, Callable[[str | Path], JobTrace]] = {
    "swf": read_swf,
    "sacct-json": read_sacct_json,
    "sacct-pipe": read_sacct_pipe,
}
FAAS_READERS: dict[str, Callable[[str | Path], FaasTrace]] = {
    "azure2019": read_azure2019,
    "azure2021": read_azure2021,
}


def detect_jobs_format(path: str | Path) -> str:
    """``swf``, ``sacct-json`` or ``sacct-pipe`` from the file's first bytes."""
    text = read_text(path)
    head = text.lstrip()[:4096]
    first = head.splitlines()[0] if head else ""
    if head.startswith("{"):
        return "sacct-json"
    if "|" in first and "JobID" in first:
        return "sacct-pipe"
    if head.startswith(";") or (
        first and all(_is_number(x) for x in first.split()) and len(first.split()) == 18
    ):
        return "swf"
    raise TraceFormatError(
        "not a job trace I know; expected SWF, sacct --json or sacct -P output (or pass --jobs-format)",
        path=str(path),
        line=1,
    )


def detect_faas_format(path: str | Path) -> str:
    """``azure2019`` (a directory or an invocations file) or ``azure2021`` (records)."""
    p = Path(path)
    if p.is_dir():
        return "azure2019"
    first = read_text(p).lstrip().split("\n", 1)[0]
    if first.replace(" ", "").startswith("app,func,end_timestamp,duration"):
        return "azure2021"
    if "HashFunction" in first:
        return "azure2019"
    raise TraceFormatError(
        "not a FaaS trace I know; expected an Azure 2019 directory/invocations CSV or Azure 2021 records",
        path=str(p),
        line=1,
    )


def read_jobs(path: str | Path, fmt: str | None = None) -> JobTrace:
    """Read a job trace, detecting the format unless ``fmt`` names one of :data:`JOB_READERS`."""
    fmt = fmt or detect_jobs_format(path)
    if fmt not in JOB_READERS:
        raise TraceFormatError(
            f"unknown job trace format {fmt!r}; known: {', '.join(JOB_READERS)}", path=str(path)
        )
    return JOB_READERS[fmt](path)


def read_faas(path: str | Path, fmt: str | None = None) -> FaasTrace:
    """Read a FaaS trace, detecting the format unless ``fmt`` names one of :data:`FAAS_READERS`."""
    fmt = fmt or detect_faas_format(path)
    if fmt not in FAAS_READERS:
        raise TraceFormatError(
            f"unknown FaaS trace format {fmt!r}; known: {', '.join(FAAS_READERS)}", path=str(path)
        )
    return FAAS_READERS[fmt](path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
