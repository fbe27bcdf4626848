"""`orderflow`: the operator's command line. `orderflow dlq ...` reviews, retries and discards dead
letters through core/dead_letters.py, and starts, follows and steers bulk redrives through
core/redrives.py (the same code as the API), reading the same settings (DATABASE_URL,
TEMPORAL_ADDRESS, TEMPORAL_TASK_QUEUE, ...); `orderflow sinks ...` breaks and heals the dev sinks of
`make run` (SINKS_URL) to watch retries and dead letters happen.

Exit codes: 0 done; 1 the command was refused (unknown ID, letter not open, workflow refused);
2 bad usage; 3 a service (database, Temporal, sinks) could not be reached."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import httpx
from sqlalchemy import make_url

from core.models import DeadLetterStatus, Step
from core.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from temporalio.client import Client

    from core.models import DeadLetter
    from core.redrives import RedriveProgress

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3
SINKS = ("warehouse", "smtp")
# Where each sink's fault controls live under SINKS_URL.
FAULT_PATHS = {"warehouse": "/webhooks/faults", "smtp": "/mail/faults"}
# `dlq retry --all --follow`: how often the progress is read, and its bar's width.
FOLLOW_INTERVAL_SECONDS = 0.5
BAR_WIDTH = 30


class Refused(Exception):
    """The command cannot be done; the message says why."""


class Unreachable(Exception):
    """A service the command needs did not answer."""


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, so the output reads (and greps) as a table."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return " ".join(str(value).split())


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _error(letter: DeadLetter) -> str:
    return _short(f"{letter.error_type}: {letter.error_message}", 60)


def letter_rows(letters: Sequence[DeadLetter]) -> list[list[object]]:
    return [
        [
            letter.id,
            letter.order_id,
            letter.step,
            letter.occurrence,
            letter.status,
            letter.attempts,
            _error(letter),
            letter.created_at,
        ]
        for letter in letters
    ]


LETTER_HEADERS = ("ID", "ORDER", "STEP", "OCC", "STATUS", "ATTEMPTS", "ERROR", "CREATED")


def describe(letter: DeadLetter) -> str:
    fields: list[tuple[str, object]] = [
        ("id", letter.id),
        ("order", letter.order_id),
        ("step", letter.step),
        ("occurrence", letter.occurrence),
        ("status", letter.status),
        ("resolution", letter.resolution),
        ("permanent", "yes" if letter.permanent else "no"),
        ("attempts", letter.attempts),
        ("error type", letter.error_type),
        ("error", letter.error_message),
        ("workflow", f"{letter.workflow_id} (run {letter.run_id})"),
        ("first attempt", letter.first_attempt_at),
        ("created", letter.created_at),
        ("updated", letter.updated_at),
        ("resolved", letter.resolved_at),
        ("discarded by", letter.discarded_by),
        ("discard reason", letter.discard_reason),
    ]
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {_cell(value)}" for name, value in fields)


async def dlq(args: argparse.Namespace, settings: Settings) -> str:
    # Imported here: the Temporal SDK takes seconds to import on a busy machine, and the `sinks`
    # commands need none of it.
    from sqlalchemy.exc import SQLAlchemyError

    from core.db import create_engine, create_sessionmaker
    from core.dead_letters import (
        CommandRejected,
        CommandUnconfirmed,
        DeadLetterFilter,
        DeadLetterNotFound,
        DeadLetterOperator,
        get_dead_letter,
        list_dead_letters,
    )
    from core.outages import DependencyUnavailable
    from core.redrives import RedriveNotFound, RedriveRefused, RedriveUnconfirmed

    engine = create_engine(settings)
    sessions = create_sessionmaker(engine)
    try:
        if args.action == "list":
            status = None if args.status == "all" else args.status
            where = DeadLetterFilter(
                status=status, step=args.step, order_id=args.order, error_type=args.error_type
            )
            async with sessions() as session:
                letters, total = await list_dead_letters(
                    session, where, limit=args.limit, offset=args.offset
                )
            shown = f"{len(letters)} of {total} dead letter(s)"
            if not letters:
                return shown
            return f"{table(LETTER_HEADERS, letter_rows(letters))}\n{shown}"
        if args.action == "show":
            async with sessions() as session:
                return describe(await get_dead_letter(session, args.id))

        temporal = await _temporal(settings)
        if args.action == "redrive":
            return await steer_redrive(args, temporal)
        operator = DeadLetterOperator(sessions, temporal)
        if args.action == "discard":
            letter = await operator.discard(args.id, args.reason, args.actor)
            return f"dead letter {letter.id} ({letter.order_id} {letter.step}): {letter.status}"
        if args.id is not None:
            letter = await operator.retry(args.id)
            return (
                f"dead letter {letter.id} ({letter.order_id} {letter.step}): {letter.status}; "
                f"follow it with `orderflow dlq list --order {letter.order_id} --status all`"
            )
        return await bulk_retry(args, settings, sessions, temporal)
    except (DeadLetterNotFound, CommandRejected, RedriveNotFound, RedriveRefused) as refused:
        raise Refused(str(refused)) from refused
    except (CommandUnconfirmed, RedriveUnconfirmed, DependencyUnavailable) as unconfirmed:
        raise Unreachable(str(unconfirmed)) from unconfirmed
    except (SQLAlchemyError, OSError) as failure:
        raise Unreachable(f"database {_safe_url(settings)}: {failure}") from failure
    finally:
        await engine.dispose()


async def bulk_retry(
    args: argparse.Namespace,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    temporal: Client,
) -> str:
    """Starts a redrive of the matching open letters (a workflow: it goes on without this
    command) and, with --follow, shows its progress until it is over."""
    from core.dead_letters import DeadLetterFilter, list_dead_letters
    from core.redrives import RedriveFilter, start_redrive

    where = RedriveFilter(step=args.step, error_type=args.error_type)
    async with sessions() as session:
        _, matching = await list_dead_letters(
            session,
            DeadLetterFilter(
                status=DeadLetterStatus.OPEN, step=where.step, error_type=where.error_type
            ),
            limit=1,
            offset=0,
        )
    if not matching:
        return "no open dead letter matches"
    redrive_id = await start_redrive(
        temporal,
        settings.TEMPORAL_TASK_QUEUE,
        where,
        per_second=args.per_second,
        limit=args.limit,
    )
    print(
        f"redrive {redrive_id}: {min(matching, args.limit)} open dead letter(s) at most "
        f"{args.per_second:g}/s",
        flush=True,
    )
    if not args.follow:
        return (
            f"it runs on in Temporal: `orderflow dlq redrive show {redrive_id}`, "
            f"or `... pause|resume|cancel {redrive_id}`"
        )
    final = await follow(temporal, redrive_id)
    if final.skipped:
        raise Refused(f"{summary(final)}; last skipped:\n" + "\n".join(final.last_skips))
    return summary(final)


async def follow(temporal: Client, redrive_id: str) -> RedriveProgress:
    """Polls the redrive until it is over: a progress bar on a terminal, else a line per change."""
    from core.redrives import OVER, RedriveUnconfirmed, redrive_progress

    tty = sys.stdout.isatty()
    shown = ""
    while True:
        try:
            current = await redrive_progress(temporal, redrive_id)
        except RedriveUnconfirmed:
            current = None  # a worker restarting: the redrive waits in Temporal, so do we
        if current is not None:
            line = progress_line(current, bar=tty)
            if line != shown:
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
                shown = line
            if current.state in OVER:
                if tty:
                    print(flush=True)
                return current
        await asyncio.sleep(FOLLOW_INTERVAL_SECONDS)


def progress_line(progress: RedriveProgress, *, bar: bool) -> str:
    counts = (
        f"{progress.sent}/{progress.total} sent, {progress.resolved} resolved, "
        f"{progress.failed_again} failed again, {progress.skipped} skipped "
        f"({progress.state.replace('_', ' ')})"
    )
    if not bar:
        return counts
    done = (progress.sent + progress.skipped) / progress.total if progress.total else 1.0
    filled = round(done * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {counts}"


def summary(progress: RedriveProgress) -> str:
    took = (progress.finished_at or progress.started_at) - progress.started_at
    return (
        f"{progress.state}: sent {progress.sent} of {progress.total}, resolved "
        f"{progress.resolved}, failed again {progress.failed_again}, skipped {progress.skipped} "
        f"in {took:.1f}s (at most {progress.per_second:g}/s)"
    )


async def steer_redrive(args: argparse.Namespace, temporal: Client) -> str:
    from core.redrives import cancel_redrive, pause_redrive, redrive_progress, resume_redrive

    command = {
        "show": redrive_progress,
        "pause": pause_redrive,
        "resume": resume_redrive,
        "cancel": cancel_redrive,
    }[args.command]
    progress = await command(temporal, args.id)
    return f"redrive {progress.redrive_id}: {progress_line(progress, bar=False)}"


async def _temporal(settings: Settings) -> Client:
    from core.temporal import connect_temporal

    try:
        return await connect_temporal(settings)
    except RuntimeError as failure:  # the SDK reports a failed connect as RuntimeError
        raise Unreachable(f"Temporal at {settings.TEMPORAL_ADDRESS}: {failure}") from failure


def _safe_url(settings: Settings) -> str:
    return make_url(settings.DATABASE_URL).render_as_string(hide_password=True)


async def sinks(args: argparse.Namespace, settings: Settings) -> str:
    url = settings.SINKS_URL.rstrip("/") + FAULT_PATHS[args.sink]
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            if args.action == "heal":
                response = await http.delete(url)
            elif args.action == "show":
                response = await http.get(url)
            else:
                response = await http.put(url, json=_fault_changes(args))
    except httpx.HTTPError as failure:
        raise Unreachable(
            f"dev sinks at {settings.SINKS_URL} ({failure}); are they running (`make run`)?"
        ) from failure
    if response.status_code == 422:
        raise Refused(f"the {args.sink} sink refused these faults: {response.text}")
    if not response.is_success:
        raise Refused(f"the {args.sink} sink answered {response.status_code}: {response.text}")
    faults: dict[str, object] = response.json()
    return f"{args.sink} faults now:\n" + table(
        ("FAULT", "VALUE"), [[name, value] for name, value in faults.items()]
    )


def _fault_changes(args: argparse.Namespace) -> dict[str, object]:
    changes: dict[str, object] = {}
    for option, field in (
        ("fail_next", "fail_next"),
        ("rate", "fail_rate"),
        ("status", "status"),
        ("latency_ms", "latency_ms"),
        ("retry_after", "retry_after"),
    ):
        value = getattr(args, option)
        if value is not None:
            changes[field] = value
    if args.reject:
        changes["reject_recipients"] = args.reject
    if args.sink == "smtp" and "retry_after" in changes:
        raise Refused("--retry-after is an HTTP header; the SMTP sink has no use for it")
    if args.sink == "warehouse" and "reject_recipients" in changes:
        raise Refused("--reject names e-mail recipients; it applies to the smtp sink")
    if not changes:
        raise Refused(
            "name at least one fault: --fail-next, --rate, --status, --latency-ms, "
            "--retry-after or --reject"
        )
    return changes


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="orderflow",
        description="Operate orderflow: dead letters (dlq) and the dev sinks' faults (sinks).",
    )
    groups = root.add_subparsers(dest="group", required=True)

    dlq_parser = groups.add_parser("dlq", help="review, retry and discard dead letters")
    dlq_actions = dlq_parser.add_subparsers(dest="action", required=True)
    steps = [step.value for step in Step]

    listing = dlq_actions.add_parser("list", help="dead letters as a table, oldest first")
    listing.add_argument(
        "--status",
        default=DeadLetterStatus.OPEN.value,
        choices=[*(s.value for s in DeadLetterStatus), "all"],
        help="default: open",
    )
    listing.add_argument("--step", choices=steps)
    listing.add_argument("--order", metavar="ORDER_ID")
    listing.add_argument("--error-type", metavar="TYPE")
    listing.add_argument("--limit", type=_positive_int, default=50)
    listing.add_argument("--offset", type=_non_negative_int, default=0)

    show = dlq_actions.add_parser("show", help="one dead letter in full")
    show.add_argument("id", type=_positive_int)

    retry = dlq_actions.add_parser("retry", help="run a parked step again (one, or --all)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=_positive_int)
    which.add_argument("--all", action="store_true", help="every open dead letter that matches")
    retry.add_argument("--step", choices=steps, help="with --all: only this step")
    retry.add_argument("--error-type", metavar="TYPE", help="with --all: only this error type")
    retry.add_argument(
        "--per-second", type=_positive_float, default=5.0, help="with --all: pace (default 5)"
    )
    retry.add_argument("--limit", type=_positive_int, default=1000, help="with --all")
    retry.add_argument(
        "--follow", action="store_true", help="with --all: show the redrive's progress to its end"
    )

    redrive = dlq_actions.add_parser("redrive", help="a bulk redrive's progress; steer it")
    redrive.add_argument("command", choices=("show", "pause", "resume", "cancel"))
    redrive.add_argument("id", metavar="REDRIVE_ID")

    discard = dlq_actions.add_parser("discard", help="give up on a parked step, saying why")
    discard.add_argument("id", type=_positive_int)
    discard.add_argument("--reason", required=True)
    discard.add_argument("--actor", default="operator", help="who decided (default: operator)")

    sinks_parser = groups.add_parser("sinks", help="break and heal the dev sinks (make run)")
    sink_actions = sinks_parser.add_subparsers(dest="action", required=True)
    fault = sink_actions.add_parser("fault", help="inject faults into a sink")
    fault.add_argument("sink", choices=SINKS)
    fault.add_argument("--fail-next", type=_non_negative_int, help="fail the next N calls")
    fault.add_argument("--rate", type=float, help="then fail this fraction (0..1) of calls")
    fault.add_argument("--status", type=int, help="what a failed call answers (HTTP or SMTP)")
    fault.add_argument("--latency-ms", type=_non_negative_int, help="delay every call")
    fault.add_argument("--retry-after", help="warehouse: Retry-After sent with a failure")
    fault.add_argument("--reject", action="append", metavar="EMAIL", help="smtp: answer 550")
    for action, text in (("heal", "clear every fault"), ("show", "the faults in force")):
        sink_actions.add_parser(action, help=text).add_argument("sink", choices=SINKS)
    return root


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    bulk_filter = getattr(args, "step", None) or getattr(args, "error_type", None)
    if args.group == "dlq" and args.action == "retry" and not args.all and bulk_filter:
        parser().error("--step and --error-type filter a bulk retry: use them with --all")
    if args.group == "dlq" and args.action == "retry" and not args.all and args.follow:
        parser().error("--follow follows a bulk retry: use it with --all")
    settings = Settings()
    command = dlq if args.group == "dlq" else sinks
    try:
        print(asyncio.run(command(args, settings)))
    except Refused as refused:
        print(f"orderflow: {refused}", file=sys.stderr)
        return EXIT_REFUSED
    except Unreachable as unreachable:
        print(f"orderflow: cannot reach {unreachable}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
