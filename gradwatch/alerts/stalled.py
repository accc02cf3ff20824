"""The service's own rule: a run that records nothing new for `stalled_after` seconds while its
process lives. Diagnosis rules read measurements; this one reads the clock, so it lives here."""

from __future__ import annotations

from gradwatch.alerts.rules import STALLED_RULE
from gradwatch.diagnose import Evidence, Finding

TITLE = "Run stalled: no new step recorded"


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 120 else f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def stalled(silent_for: float, after: float, last_step: int | None, pid: int | None) -> list[Finding]:
    """A `stalled_run` finding when the run has recorded no new step for `silent_for` >= `after`
    seconds (the caller knows its process still lives); else nothing."""
    if silent_for < after:
        return []
    where = f"after step {last_step}" if last_step is not None else "before its first step"
    summary = (f"no new step recorded for {_duration(silent_for)} {where}, while the training process "
               f"{'(pid ' + str(pid) + ') ' if pid else ''}still runs",)
    causes = ("the job hangs: a deadlock, a data loader worker that died or waits, a collective "
              "(all-reduce) that a crashed rank never joins",
              "a long phase without optimizer steps: evaluation, checkpointing, data preparation",
              "the run writes its log where this service does not look (another GRADWATCH_HOME or host)")
    remedies = (f"see where it waits: py-spy dump --pid {pid or 'PID'} (or faulthandler.dump_traceback_later)",
                "if long pauses are expected, raise alerts.stalled_after in the service config",
                "for distributed jobs, check every rank's log and NCCL_DEBUG=INFO output for a rank that left")
    evidence = Evidence(summary, {"value": float(silent_for), "threshold": float(after)},
                        steps=(last_step,) if last_step is not None else ())
    return [Finding(STALLED_RULE, "warning", TITLE, evidence, causes, remedies)]
