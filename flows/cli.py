"""`rlheal`: validate and run studies.

`validate` makes every check `run` makes before it writes anything (config, model, store,
study name, free space) and prints the store space each stage will need.

Exit status: 0 success, 1 a stage failed (re-run to resume), 2 bad input (config
file, field or store named in the message; nothing was written), 3 the store's disk
filled up during the run (the message names the store and the space needed; finished
artifacts are kept, the unfinished one is discarded: free space and re-run to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from rlheal import space
from rlheal.config import ConfigError, StudyConfig, load_config
from rlheal.store import StoreError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_SPACE = 1, 2, 3


def _validate(args: argparse.Namespace) -> StudyConfig | None:
    from flows import preflight

    if args.explain:
        from rlheal.config import explain_markdown

        print(explain_markdown(), end="")
        return None
    if args.config is None:
        raise ConfigError("validate: name a config file (or pass --explain to list every field)")
    cfg = load_config(args.config, getattr(args, "store", None), args.set)
    preflight.check(cfg, args.force, not args.no_space_check)
    print(f"{args.config}: ok (study {cfg.name!r}, store {cfg.store})")
    return cfg


STAGES = ["data", "model", "pretrain", "sft", "rl", "eval", "drift", "svd", "edit", "report"]


def _status(args: argparse.Namespace) -> int:
    from rlheal.caching import open_store
    from rlheal.progress import Progress, format_status

    cfg = load_config(args.config, args.store, args.set)
    study_dir = open_store(cfg.store).study_dir(cfg.name)
    progress = Progress(study_dir, cfg.name)
    print(format_status(cfg.name, progress.summary(), STAGES, progress.running_now(), progress.notes()))
    return 0


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.store, args.set)
    # Stage modules log through the standard library; let Prefect forward them to the UI.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rlheal")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # the checks log before the run
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = _temporary_server()
    from flows import preflight

    # validate's checks (model, store, study name, free space): before anything is written
    args.cfg, args.estimate = cfg, preflight.check(cfg, args.force, not args.no_space_check)
    # up (or failed, and the flow run tries again) before it is used; a failed check does not
    # wait for it: Prefect stops a started server at exit
    if server is not None:
        server.join()
    from rlheal.caching import open_store

    open_store(cfg.store).check_writable()
    open_store(cfg.store).claim_study(cfg.name, cfg.claim(), args.force)
    from flows.study import study
    from rlheal.progress import Progress, Watcher

    order = [s for s in STAGES if (s != "pretrain" or cfg.pretrain.enabled) and (s != "drift" or cfg.drift.enabled)]
    with Watcher(Progress(open_store(cfg.store).study_dir(cfg.name), cfg.name), order, stream=sys.stderr):  # today's stderr, not import time's
        state = study(config_path=str(Path(args.config).absolute()), store=cfg.store, overrides=args.set, return_state=True)
    if not state.is_completed():
        err = _exception(state)
        if err is not None and space.no_space_cause(err, cfg.store, _still_needed(cfg, args.estimate)):
            raise err  # main() says what a full disk needs
        print(f"study {cfg.name!r} did not complete ({state.name}); run the same command again to resume", file=sys.stderr)
        return EXIT_FAILED
    print(f"study {cfg.name!r} complete: tables in {open_store(cfg.store).tables_dir(cfg.name)}")
    return 0


def _temporary_server() -> threading.Thread | None:
    """Without PREFECT_API_URL, Prefect starts a temporary API server at the first flow run:
    5-8 s on 2 cores, which a finished study's cached re-run spent waiting (issue 18). Started
    here in a thread, it comes up while the config is checked and the stages are imported;
    the flow run finds it (Prefect keeps one temporary server per process and stops it at
    exit)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        try:
            SubprocessASGIServer().start()
        except Exception as err:  # the flow run starts it again and reports what fails
            logging.getLogger("rlheal.cli").debug("temporary server not started early: %s", err)

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread


def _exception(state) -> BaseException | None:
    """The exception a failed flow run ended with (a stage's own), if Prefect kept it."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception:
        return None
    return err if isinstance(err, BaseException) else None


def _still_needed(cfg: StudyConfig, estimate: space.Estimate) -> int:
    from flows import preflight
    from rlheal.store import Store

    return estimate.still_needed(preflight.done_fractions(Store(cfg.store), cfg.name))


def no_space_message(cause: BaseException, cfg: StudyConfig | None, estimate: space.Estimate | None) -> str:
    """What a full disk says: the store, its free space, the space the study needs, what to do."""
    reason = str(cause) if len(str(cause)) < 200 else str(cause)[:197] + "..."
    if cfg is None:
        return f"out of disk space ({reason}); free some space and run the same command again"
    root = Path(cfg.store).expanduser().absolute()
    need = ""
    if estimate is not None:
        need = f", and study {cfg.name!r} needs about {space.human(_still_needed(cfg, estimate))} more there ({space.human(estimate.peak)} in all, at its peak)"
    return (
        f"the store {root} ran out of disk space ({reason}): its filesystem has {space.human(space.free_bytes(root))} free{need}. "
        "Finished artifacts are kept and the one being written was discarded: free some space (or move the store "
        "to a larger disk and pass --store) and run the same command again to resume."
    )


def _compare(args: argparse.Namespace) -> int:
    from flows.replicates import compare

    from rlheal.store import Store

    store = Store(args.store)
    names = list(dict.fromkeys(args.studies))
    out = compare({n: store.tables_dir(n) for n in names}, Path(args.out) if args.out else store.replicates_dir(names))
    print(f"compared {len(names)} studies: {out / 'replicates.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlheal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a study config file")
    r = sub.add_parser("run", help="run (or resume) a study")
    for cmd in (v, r):
        cmd.add_argument("--force", action="store_true", help="run even if the study was started with another config")
        cmd.add_argument("--no-space-check", action="store_true", help="print the store-space estimate but do not refuse a disk that looks too small")
    r.add_argument("-v", "--verbose", action="store_true", help="also print the stages' and libraries' log lines and loading bars (the Prefect UI has them either way)")
    st = sub.add_parser("status", help="progress of a study, read from the store (no server needed)")
    c = sub.add_parser("compare", help="judge the paper's findings on replicate studies (e.g. seeds) side by side")
    c.add_argument("studies", nargs="+", metavar="STUDY", help="study names in the store")
    c.add_argument("--store", default="store", help="artifact store directory (default: ./store)")
    c.add_argument("--out", help="output folder (default: <store>/replicates/<names joined by +>)")
    v.add_argument("--explain", action="store_true", help="print every config field with its type, default and description (docs/config.md), and exit")
    v.add_argument("config", nargs="?")
    for cmd in (r, st):
        cmd.add_argument("config")
    for cmd in (v, r, st):
        cmd.add_argument("--store", help="artifact store directory (overrides the config's `store`)")
        cmd.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                         help="override one config field, e.g. --set name=toy-seed1 --set data.train_seed=1 (repeatable)")
    return p


def console(verbose: bool) -> None:
    """What the terminal shows. Loggers stay at INFO (the Prefect UI gets every line); without
    -v only warnings and errors reach the console, and no loading bars, so the progress line
    is what a user reads. Set before the libraries are imported: they read it once."""
    # one torch thread per task unless the user says otherwise: n_workers tasks share the
    # cores (on 2 cores, 2 threads under contention ran 10x slower); read by torch at import
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # TRL's dataset preparation
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # the flow's and Dask workers' Prefect console
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console(getattr(args, "verbose", True))
    try:
        if args.command == "validate":
            _validate(args)
            return 0
        return {"status": _status, "run": _run, "compare": _compare}[args.command](args)
    except (ConfigError, StoreError) as err:
        print(f"rlheal: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        cfg, estimate = getattr(args, "cfg", None), getattr(args, "estimate", None)
        store = cfg.store if cfg else getattr(args, "store", None)
        cause = space.no_space_cause(err, store, _still_needed(cfg, estimate) if cfg and estimate else 0)
        if cause is None:
            raise
        print(f"rlheal: error: {no_space_message(cause, cfg, estimate)}", file=sys.stderr)
        return EXIT_NO_SPACE


if __name__ == "__main__":
    sys.exit(main())
