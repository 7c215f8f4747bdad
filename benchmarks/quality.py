"""Every quality benchmark at its documented settings, one after the other, then the report step.

    python -m benchmarks.quality                      # everything (about 3.7 hours on the 2-core CPU)
    python -m benchmarks.quality --part tables        # the model's bar, guidance, DeepCache, pruning (< 1 hour)
    python -m benchmarks.quality --part erasure       # both erasure tables (< 3 hours)
    python -m benchmarks.quality --only guiders_quality deepcache_quality
    python -m benchmarks.quality --resume             # skip the runs a previous (killed) call finished
    python -m benchmarks.quality --plan               # print the plan and the time budget, run nothing
    python -m benchmarks.quality --smoke              # each benchmark's logic check (tiny models)

Each benchmark is a script of its own (``benchmarks/NAME.py``) that writes its JSON to
``benchmarks/results/``; this runner only fixes the settings (the sample sizes of issue 16: >= 256 images a
setting for guidance, DeepCache and pruning; >= 128 images a group and attack success over >= 32 prompts
for erasure), runs them in turn (never two at once: the machine has 2 cores), and records each finished run
in ``benchmarks/results/quality_run.json`` (its command, seconds and exit status; written atomically after
every run) so that ``--resume`` continues after a kill. Several scripts also resume inside a run (their own
``.partial.json``). Finally ``benchmarks/report.py`` regenerates every README/docs table from the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUN_LOG = "quality_run.json"
#: Issue 16's budget for the whole run on the 2-core CPU; ``--plan`` sets the planned and the measured minutes
#: against it.
BUDGET_MINUTES = 180
PARTS = ("tables", "erasure")


@dataclass(frozen=True)
class QualityRun:
    """One benchmark script with its documented settings and the minutes it takes on the 2-core CPU."""

    name: str
    args: tuple[str, ...]
    minutes: float
    smoke_args: tuple[str, ...] = ("--smoke",)
    why: str = ""
    resume_args: tuple[str, ...] = field(default=())
    #: "tables" (the model's bar and the guidance, DeepCache and pruning tables) or "erasure" (both erasure tables)
    part: str = "tables"

    def command(self, smoke: bool, resume: bool) -> list[str]:
        args = self.smoke_args if smoke else self.args + (self.resume_args if resume else ())
        return [sys.executable, str(ROOT / "benchmarks" / f"{self.name}.py"), *args]

    def shown(self, smoke: bool = False) -> str:
        """The command as the run log names it: by its settings, without the resume flag (a run resumed inside
        is the same run)."""
        return " ".join(["python", *self.command(smoke, False)[1:]]).replace(str(ROOT) + "/", "")


#: In the order they run: the cheap checks of the model first, so a broken model fails fast. The minutes are
#: for the 2-core CPU, as measured on 2026-12-07 (rounded up); the run log records what each took.
RUNS = (
    QualityRun("oracle_accuracy", (), 2, why="the oracle's per-factor accuracy on 2048 fresh renders"),
    # 2048 held-out images (the bar asks >= 512): about 200-500 a single value, so its interval is ~ +-5 points
    QualityRun("reference_model", ("--threads", "2", "--heldout", "2048"), 7,
               why="the model's bar: 2048 held-out prompts naming all four factors, 256 synonym-only, 128 swap pairs"),
    QualityRun("guidance_quality", ("--n", "256", "--inversion-n", "16"), 9,
               smoke_args=("--model", "tiny", "--n", "8", "--inversion-n", "2", "--steps", "5",
                           "--inversion-steps", "5", "--tag", "_smoke"),
               why="CFG / APG / CFG++ at 256 images a setting, inversion figures"),
    QualityRun("guiders_quality", (), 16, why="every diffusers guider at two scales, 256 images a setting; APG sweep"),
    QualityRun("deepcache_quality", ("--n", "256"), 5, resume_args=("--resume",),
               why="DeepCache uniform and non-uniform, N = 2/3/5, 256 images a configuration"),
    QualityRun("pruning_quality", ("--n", "256", "--calib", "64", "--learn-steps", "25", "--epochs", "4",
                                   "--skip-random"), 12, resume_args=("--resume",),
               why="mask learning at the default settings (64 calibration prompts, 25 steps, 4 epochs), 256 images; "
                   "no random-mask control rows (they double the time)"),
    # UnlearnDiffAtk at a fifth of its reference budget (10 of 50 timesteps x 40 iterations, early stop kept):
    # at the full budget an unbroken prompt costs ~95 s on this CPU, 32 prompts x 6 jobs would take 5 hours.
    # Per job about 9 minutes (6 jobs and 3 originals: 53 min), most of it UnlearnDiffAtk (32 prompts, ~19 s each).
    QualityRun("erasure_quality", ("--n-prompts", "64", "--seeds", "0", "1", "--attack-prompts", "32",
                                   "--attack", "unlearndiffatk", "soft-prompt", "--attack-timesteps", "10",
                                   "--probes", "noise-search", "completion"), 53, part="erasure",
               resume_args=("--resume",),
               why="ESD and SalUn, 128 images a group, UnlearnDiffAtk (1/5 budget), the soft-prompt attack and both "
                   "probes over 32 forget prompts"),
    QualityRun("erasure_methods", ("--n-prompts", "64", "--seeds", "0", "1", "--attack-prompts", "32",
                                   "--attack", "unlearndiffatk", "soft-prompt", "--attack-timesteps", "10",
                                   "--probes", "noise-search", "completion",
                                   "--esd-steps", "300", "--esd-lr", "5e-4", "--salun-steps", "100", "--salun-lr",
                                   "2e-4", "--salun-batch", "4", "--salun-images", "16", "--sample-steps", "10",
                                   "--inference-steps", "15", "--adv-steps", "200", "--adv-lr", "2e-4",
                                   "--doco-steps", "200", "--doco-lr", "5e-4", "--attack-steps", "20",
                                   "--reuse", "benchmarks/results/erasure_quality.json"), 59, part="erasure",
               resume_args=("--resume",),
               why="AdvUnlearn and DoCo beside ESD and SalUn on the same groups and attacks (ESD and SalUn reused "
                   "from erasure_quality's run, their settings checked)"),
)


def by_name() -> dict[str, QualityRun]:
    return {r.name: r for r in RUNS}


def _measured_minutes(run: QualityRun, measured: dict) -> float | None:
    """Minutes of the run log's finished run of ``run`` at the plan's settings (another command measured
    something else)."""
    done = measured.get(run.name)
    ok = done and done.get("returncode") == 0 and done.get("command") == run.shown()
    return done["seconds"] / 60 if ok else None


def plan(runs, measured: dict | None = None) -> str:
    """The runs with their planned minutes (and the minutes the run log measured, where it has them), each part's
    total and the whole plan's against the budget; a measured total only when every run of it was measured."""
    measured = measured or {}
    took = {r.name: _measured_minutes(r, measured) for r in runs}
    lines = [f"{'benchmark':<20} {'part':<8} {'minutes':>7} {'measured':>8}  settings"]

    def shown(m: float | None) -> str:
        return "-" if m is None else f"{m:.0f}"

    def sums(group) -> tuple[float, float | None]:
        ms = [took[r.name] for r in group]
        return sum(r.minutes for r in group), None if None in ms else sum(ms)

    for r in runs:
        lines.append(f"{r.name:<20} {r.part:<8} {r.minutes:>7g} {shown(took[r.name]):>8}  "
                     f"{' '.join(r.args) or '(its defaults)'} — {r.why}")

    for part in PARTS:
        group = [r for r in runs if r.part == part]
        if group:
            planned, m = sums(group)
            lines.append(f"part {part:<15} {planned:>7g} {shown(m):>8}")
    total, m = sums(runs)
    worst = max(total, m or 0)
    verdict = (f"over it by {worst - BUDGET_MINUTES:g}: run the parts in turn" if worst > BUDGET_MINUTES
               else "within it")
    lines.append(f"{'total':<20} {total:>7g} {shown(m):>8}  (budget {BUDGET_MINUTES} minutes on 2 cores: {verdict})")
    return "\n".join(lines)


def _load_log(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def _save_log(path: Path, log: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from diffkit.artifacts import atomic_write_json

    atomic_write_json(path, log, indent=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(by_name()), default=None, metavar="NAME",
                    help=f"run only these (of {', '.join(by_name())})")
    ap.add_argument("--part", choices=PARTS, default=None, help="run only this part's benchmarks")
    ap.add_argument("--resume", action="store_true", help="skip runs the run log records as finished with the "
                    "same command")
    ap.add_argument("--plan", action="store_true", help="print the plan and its time budget; run nothing")
    ap.add_argument("--smoke", action="store_true", help="each benchmark's logic check instead of the real run")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate the tables at the end")
    args = ap.parse_args(argv)
    runs = [by_name()[n] for n in args.only] if args.only else list(RUNS)
    runs = [r for r in runs if args.part in (None, r.part)]
    log_path = RESULTS / ("quality_run_smoke.json" if args.smoke else RUN_LOG)
    print(plan(runs, _load_log(log_path)["runs"]))
    if args.plan:
        return 0
    # The log keeps each benchmark's last run: a run of some benchmarks (--only, --part) replaces their entries and
    # keeps the others', so the plan's measured total covers the whole plan.
    log = _load_log(log_path)
    failed = []
    for run in runs:
        cmd = run.command(args.smoke, args.resume)
        shown = run.shown(args.smoke)
        done = log["runs"].get(run.name)
        if args.resume and done and done.get("returncode") == 0 and done.get("command") == shown:
            print(f"== {run.name}: finished before ({done['seconds']:.0f} s), skipped")
            continue
        print(f"== {run.name}: {shown}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT)
        log["runs"][run.name] = dict(command=shown, returncode=rc, seconds=round(time.time() - t0, 1),
                                     finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        _save_log(log_path, log)
        if rc != 0:
            failed.append(run.name)
    if not args.no_report and not args.smoke:
        subprocess.check_call([sys.executable, str(ROOT / "benchmarks" / "report.py")], cwd=ROOT)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
