#!/usr/bin/python3
"""`sacct` for a SLURM without accounting (launchers/slurm_local_up.sh installs it as STATE_DIR/bin/sacct).

Answers `sacct -o FIELDS --parsable2 -j ID ...`, the query submitit polls job states with, from what slurmctld
still knows (`scontrol show job -o`, finished jobs for MinJobAge seconds) and, for jobs it has forgotten, from the
job completion log (JobCompLoc in slurm.conf). Each job appears once, in its current state: an array's pending
remainder as `ID_[2-3%2]`, its started tasks as `ID_N`, a requeued job as PENDING until it runs again. Standard
library only: it runs under the system python3, whatever environment calls it.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

# Output column -> key in `scontrol show job -o` (the job completion log's `Name` is renamed to JobName on reading).
FIELDS = {
    "JobID": None,  # formatted from JobId, ArrayJobId and ArrayTaskId
    "JobIDRaw": "JobId",
    "JobName": "JobName",
    "Partition": "Partition",
    "State": "JobState",
    "ExitCode": "ExitCode",
    "NodeList": "NodeList",
    "Start": "StartTime",
    "End": "EndTime",
}
# A new `Key=` starts at a space followed by a key; anything else is part of the previous value (job names,
# commands and reasons may contain spaces).
KEY = re.compile(r"(?:^| )([A-Za-z][\w:/]*)=")


def parse_record(line: str) -> dict[str, str]:
    """`Key=Value Key=Value ...` -> dict; the first occurrence of a key wins (a command line may repeat one)."""
    record: dict[str, str] = {}
    matches = list(KEY.finditer(line))
    for match, after in zip(matches, matches[1:] + [None]):
        value = line[match.end() : after.start() if after else len(line)]
        record.setdefault(match.group(1), value.strip())
    return record


def slurm_conf_value(key: str) -> str | None:
    """`key`'s value in the slurm.conf the client commands read (SLURM_CONF, else Debian's default path)."""
    path = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.split("#", 1)[0].strip().partition("=")
                if name.strip().lower() == key.lower():
                    return value.strip()
    except OSError:
        pass
    return None


def live_jobs(job_ids: list[str]) -> list[dict[str, str]]:
    """Records slurmctld holds for `job_ids` (all its jobs when empty); unknown ids are skipped."""
    records = []
    for job_id in job_ids or [""]:
        cmd = ["scontrol", "show", "job", "-o"] + ([job_id] if job_id else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            if "Invalid job id" in done.stderr:
                continue
            sys.exit(f"sacct: {' '.join(cmd)} failed: {done.stderr.strip()}")
        records += [parse_record(line) for line in done.stdout.splitlines() if line.startswith("JobId=")]
    return records


def completed_jobs() -> list[dict[str, str]]:
    """Records of the job completion log, the last one per job (a requeued job has one per run)."""
    location = slurm_conf_value("JobCompLoc")
    latest: dict[str, dict[str, str]] = {}
    if location:
        try:
            with open(location) as handle:
                for line in handle:
                    if line.startswith("JobId="):
                        record = parse_record(line.rstrip("\n"))
                        record["JobName"] = record.pop("Name", "")
                        latest[record["JobId"]] = record
        except FileNotFoundError:
            pass  # no job has finished yet
    return list(latest.values())


def display_id(record: dict[str, str]) -> str:
    """sacct's JobID: `ID`, `ARRAYID_TASK`, or `ARRAYID_[TASKS]` for an array's not-yet-started remainder."""
    array_id, task = record.get("ArrayJobId"), record.get("ArrayTaskId")
    if not array_id or task is None:
        return record["JobId"]
    return f"{array_id}_{task}" if task.isdigit() else f"{array_id}_[{task}]"


def matches(record: dict[str, str], wanted: str) -> bool:
    return wanted in (record["JobId"], record.get("ArrayJobId"), display_id(record))


def select(job_ids: list[str]) -> list[dict[str, str]]:
    live = live_jobs(job_ids)
    known = {record["JobId"] for record in live}
    finished = [r for r in completed_jobs() if r["JobId"] not in known]
    if job_ids:
        finished = [r for r in finished if any(matches(r, wanted) for wanted in job_ids)]
    return sorted(live + finished, key=lambda r: int(r["JobId"]))


def cell(record: dict[str, str], field: str) -> str:
    if field == "JobID":
        return display_id(record)
    value = record.get(FIELDS[field], "")
    if field == "NodeList" and value in ("", "(null)"):
        return "None assigned"
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sacct", allow_abbrev=False,
        description="sacct stand-in for a SLURM without accounting: answers --parsable2 queries from slurmctld "
        "and the job completion log.",
    )
    parser.add_argument("-o", "--format", default="JobID,JobName,Partition,State,ExitCode")
    parser.add_argument("-j", "--jobs", action="append", default=[], help="job ids, comma-separated or repeated")
    parser.add_argument("-P", "--parsable2", action="store_true", required=True,
                        help="required: this stand-in prints only the '|'-separated form")
    parser.add_argument("-n", "--noheader", action="store_true")
    parser.add_argument("-X", "--allocations", action="store_true", help="accepted; job steps are never listed")
    args = parser.parse_args(argv)

    canonical = {name.lower(): name for name in FIELDS}
    fields = []
    for name in args.format.split(","):
        if name.strip().lower() not in canonical:
            parser.error(f"unknown field {name!r} in --format; this stand-in knows {','.join(FIELDS)}")
        fields.append(canonical[name.strip().lower()])
    job_ids = [job for group in args.jobs for job in group.split(",") if job]

    rows = [] if args.noheader else ["|".join(fields)]
    rows += ["|".join(cell(record, field) for field in fields) for record in select(job_ids)]
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
