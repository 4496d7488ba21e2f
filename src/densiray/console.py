"""What a person sees while densiray works: one compact live view, everything else in a log file.

``densiray train``, ``tune`` and ``quickstart`` print a single status line that rewrites itself in a
terminal (epochs and the metric for a run; trials done/running/stopped, the best so far and the time
left for a sweep) and plain lines, one per event, when the output is a file. Ray's, Tune's and Serve's
own log lines go to ``densiray.log`` in the run folder, named at the end; ``--verbose`` shows them
instead (and Tune's tables).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command stops as it does on Ctrl-C."""


_sigterm_stops = False
terminated = False  # a SIGTERM arrived (Ray turns the exception raised inside ray.get into a KeyboardInterrupt)
ray_lost = False  # ... and reached this process's own local Ray too (api.local_ray_gone): skip Ray's shutdown


def stop_on_sigterm() -> None:
    """Make SIGTERM (``ray job stop``, container runtimes, systemd, ``kill``) stop this process as Ctrl-C
    does: :class:`Terminated` is raised in the main thread, so a run stops at once and can resume.

    ``ray.init`` installs a native handler that prints a stack trace and lets a driver go on training;
    :func:`densiray.api.ensure_ray` calls this again after Ray starts once the command line asked for it.
    """
    import signal
    import threading

    global _sigterm_stops
    if threading.current_thread() is not threading.main_thread():
        return
    _sigterm_stops = True

    def stop(signum, frame):
        global terminated, ray_lost
        terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while stopping ends it at once
        if "ray" in sys.modules:
            from densiray import api

            ray_lost = api.local_ray_gone()  # sent to the process group: Ray's processes stop too
        # Ray's handler, and later Ray's shutdown, would wait 60 s for a GCS that is gone
        on_ctrl_c = None if ray_lost else signal.getsignal(signal.SIGINT)
        if callable(on_ctrl_c) and on_ctrl_c is not signal.default_int_handler:
            # Ray Train's, during a run: it aborts the run's controller, which hands back the run's resource
            # request. Killed without it, the controller's request holds the nodes for 180 s, and an elastic
            # run submitted again meanwhile finds no room and waits.
            with contextlib.suppress(SystemExit, Exception):
                on_ctrl_c(signal.SIGINT, frame)
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)


def default_sigterm() -> None:
    """SIGTERM ends the process again (the default), e.g. once a command has finished."""
    import signal
    import threading

    if _sigterm_stops and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Loggers whose lines belong in the log file, not on the console.
NOISY = ("ray", "ray.tune", "ray.train", "ray.serve", "ray.data", "deepspeed", "DeepSpeed", "filelock", "torch",
         "transformers", "peft", "optuna")


class Live:
    """One status line: rewritten in place on a terminal; on a file, a plain line only when ``final`` or when
    the text changed and ``every_s`` passed (so a log is not flooded)."""

    def __init__(self, stream=None, every_s: float = 30.0):
        self._stream = stream  # None: whatever sys.stdout is when writing (and picklable: Tune saves callbacks)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s
        self._last, self._last_t, self._width = "", 0.0, 0

    @property
    def stream(self):
        return self._stream or sys.stdout

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}

    def update(self, text: str, final: bool = False) -> None:
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
            self.stream.flush()
        elif final or (text != self._last and time.monotonic() - self._last_t >= self.every_s):
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_t = time.monotonic()
        self._last = text

    def print(self, text: str) -> None:
        """A permanent line above the live one."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.tty and self._last:
            self.update(self._last)

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


@contextlib.contextmanager
def logs_to(log_file: str | os.PathLike | None, verbose: bool = False):
    """Within the block, Ray's, Tune's, Serve's and the libraries' log lines go to ``log_file`` instead of
    the console (restored afterwards); yields the file, or None with ``verbose`` or no file (nothing changes)."""
    if verbose or log_file is None:
        yield None
        return
    import ray  # noqa: F401  (Ray and Serve set up their loggers on import: do that first, then take them over)
    import ray.serve  # noqa: F401

    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in NOISY:
        logger = logging.getLogger(name)
        streams = [h for h in logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        saved.append((logger, streams, logger.propagate))
        for h in streams:
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield path
    finally:
        for logger, streams, propagate in saved:
            logger.removeHandler(handler)
            for h in streams:
                logger.addHandler(h)
            logger.propagate = propagate
        handler.close()


@contextlib.contextmanager
def stdout_to(log_file: str | os.PathLike | None):
    """Within the block, what is printed to stdout (e.g. Ray's driver thread relaying a cluster error such
    as "ServeController.graceful_shutdown failed" while Serve shuts down) is appended to ``log_file``."""
    if log_file is None:
        yield
        return
    with open(log_file, "a") as f, contextlib.redirect_stdout(f):
        yield


def quiet_env(verbose: bool) -> None:
    """Before Ray starts: keep Ray's start-up banner and worker INFO lines off the console."""
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter honours verbose=0 (no boxes, no tables)
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def mixture_line(members: list[dict]) -> str:
    """What ``densiray tune`` and the quickstart say about an exported mixture of trials."""
    return (f"the exported model mixes {len(members)} trials, chosen on the validation rows: "
            + ", ".join(f"{m['trial_id']} ({m['weight']:.2f})" for m in members) + "  (--ensemble 1: the winner alone)")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class EpochView:
    """The live line of a training run: ``epoch 12/100  val_log_lik -1.1203  best -1.1190 (epoch 10)  3.1 s/epoch``."""

    def __init__(self, metric: str, epochs: int, live: Live | None = None):
        self.metric, self.epochs, self.live = metric, epochs, live or Live()
        self.t0 = time.monotonic()

    def __call__(self, m: dict) -> None:
        epoch = int(m.get("epoch", 0)) + 1
        per = (time.monotonic() - self.t0) / max(epoch - int(m.get("resumed_from_epoch", 0) or 0), 1)
        best = m.get(f"best_{self.metric}")
        text = (f"epoch {epoch}/{self.epochs}  {self.metric} {_fmt(m.get(self.metric))}  "
                f"best {_fmt(best)} (epoch {m.get('best_epoch')})  {per:.1f} s/epoch")
        self.live.update(text, final=not self.live.tty and (epoch % 10 == 0 or epoch >= self.epochs))

    def close(self) -> None:
        self.live.close()


def trial_view(metric: str, mode: str, trials: int, max_epochs: int, time_budget_s: float | None,
               live: Live | None = None):
    """A Ray Tune callback drawing the sweep's live line: done / running / stopped early (by ASHA or by
    patience, before ``max_epochs``) / failed, the best score so far and the time left; on a file, a
    line per finished trial."""
    from ray.tune import Callback

    live = live or Live()

    class TrialView(Callback):
        def __init__(self):
            self.t0, self.running, self.done, self.stopped, self.failed = time.monotonic(), set(), 0, 0, 0
            self.best: tuple[float, str] | None = None
            self.epochs: dict[str, int] = {}

        def _line(self, final: bool = False) -> None:
            shown = metric.removeprefix("best_")
            best = f"best {shown} {self.best[0]:.4f} ({self.best[1]})" if self.best else f"best {shown} -"
            left = ""
            if time_budget_s:
                left = f"  {max(0.0, time_budget_s - (time.monotonic() - self.t0)):.0f} s left"
            live.update(f"sweep  {self.done + self.failed}/{trials} done ({self.stopped} stopped early, "
                        f"{self.failed} failed), {len(self.running)} running  {best}{left}", final=final)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._line()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.epochs[trial.trial_id] = int(result.get("training_iteration", 0))
            score = result.get(metric)
            if isinstance(score, (int, float)) and score == score:
                if self.best is None or (score > self.best[0] if mode == "max" else score < self.best[0]):
                    self.best = (float(score), trial.trial_id)
            self._line()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.done += 1
            self.stopped += self.epochs.get(trial.trial_id, 0) < max_epochs
            self._line(final=not live.tty)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.failed += 1
            self._line(final=not live.tty)

        def on_experiment_end(self, trials, **info):
            self._line(final=True)

    return TrialView()
