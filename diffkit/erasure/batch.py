"""Batch erasure: many concepts x methods, one artifact each, resumable, failures isolated.

A batch file (YAML)::

    model: zoo:sd15                 # optional; --model wins
    defaults: {steps: 200, retain_prompts: ["a blue circle"]}   # fields for every job
    methods: [esd, salun]           # crossed with every entry of concepts
    per_method: {salun: {beta: 0.5}}                            # fields for one method's jobs
    concepts:
      - red                         # a concept
      - {concept: [star, stars], anchor: circle, name: star}   # jobs esd-star, salun-star
    jobs:                           # optional explicit jobs
      - {method: esd, concept: blue, parameters: esd-u, name: esd-u-blue}

Each job writes ``<out>/<name>`` (default name ``<method>-<first concept word(s)>``). A finished job
(its sidecar exists, same config) is skipped; an interrupted one resumes from its checkpoint; a job
that raises is reported and the batch goes on. Every job's config is validated before any training.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .config import ErasureConfig, read_yaml

BATCH_KEYS = ("model", "defaults", "methods", "per_method", "concepts", "jobs", "mixed_precision")


@dataclass(frozen=True)
class BatchJob:
    name: str
    config: ErasureConfig


@dataclass
class JobOutcome:
    name: str
    config: ErasureConfig
    status: str  # trained | resumed | skipped | failed
    seconds: float
    final_loss: float | None = None
    error: str | None = None


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:48] or "concept"


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value)


def parse_batch(data: dict, source: str = "batch file") -> tuple[str | None, list[BatchJob]]:
    """(model, jobs) from a parsed batch file; every job's config is built (validated) here."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(BATCH_KEYS)}")
    defaults = _mapping(data.get("defaults"), f"{source}: defaults")
    if "mixed_precision" in data:
        defaults["mixed_precision"] = data["mixed_precision"]
    per_method = _mapping(data.get("per_method"), f"{source}: per_method")
    methods = data.get("methods") or []
    if isinstance(methods, str):
        methods = [methods]
    concepts = data.get("concepts") or []
    if not isinstance(concepts, list) or not isinstance(methods, list):
        raise ValueError(f"{source}: methods and concepts must be lists")
    if concepts and not methods:
        raise ValueError(f"{source}: concepts are given but no methods to run them with")
    specs: list[dict] = []
    for entry in concepts:
        fields = {"concept": entry} if isinstance(entry, (str, list)) else _mapping(entry, f"{source}: concept entry")
        label = fields.pop("name", None)  # a concept's label: its jobs are named <method>-<label>
        for m in methods:
            spec = {**defaults, **_mapping(per_method.get(m), f"{source}: per_method.{m}"), **fields, "method": m}
            if label:
                spec["name"] = f"{m}-{label}"
            specs.append(spec)
    for entry in data.get("jobs") or []:
        fields = _mapping(entry, f"{source}: job entry")
        m = fields.get("method", defaults.get("method", "esd"))
        specs.append({**defaults, **_mapping(per_method.get(m), f"{source}: per_method.{m}"), **fields})
    if not specs:
        raise ValueError(f"{source} defines no jobs (give methods + concepts, or jobs)")
    jobs, seen = [], {}
    for i, spec in enumerate(specs):
        name = spec.pop("name", None)
        concept = spec.get("concept")
        first = concept if isinstance(concept, str) else (concept[0] if concept else "")
        name = str(name) if name else f"{spec.get('method', 'esd')}-{slug(str(first))}"
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
            raise ValueError(f"{source}: job name {name!r} must be letters, digits, '.', '_' or '-'")
        if name in seen:
            raise ValueError(f"{source}: two jobs are named {name!r} (jobs {seen[name]} and {i}); give them names")
        seen[name] = i
        try:
            config = ErasureConfig.from_dict(spec)
        except ValueError as e:
            raise ValueError(f"{source}: job {name!r}: {e}") from None
        jobs.append(BatchJob(name, config))
    precisions = {j.config.mixed_precision for j in jobs}
    if len(precisions) > 1:
        raise ValueError(f"{source}: all jobs of a batch must share mixed_precision, got {sorted(precisions)}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{source}: model must be a string, got {model!r}")
    return model, jobs


def read_batch(path: str | Path) -> tuple[str | None, list[BatchJob]]:
    return parse_batch(read_yaml(path), f"batch file {str(path)!r}")


def run_batch(pipe, jobs: list[BatchJob], out: str | Path, *, accelerator=None, progress: bool = True,
              log=print) -> list[JobOutcome]:
    """Run ``jobs`` one after another on ``pipe`` (restored to the base model between jobs)."""
    from .engine import erase, make_accelerator

    out = Path(out)
    acc = accelerator or make_accelerator(jobs[0].config.mixed_precision)
    outcomes = []
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            result = erase(pipe, job.config, out / job.name, accelerator=acc, progress=progress)
            loss = result.sidecar.get("metrics", {}).get("final_loss")
            outcomes.append(JobOutcome(job.name, job.config, result.status, time.perf_counter() - t0, loss))
            if acc.is_main_process:
                note = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
                log(f"[{i + 1}/{len(jobs)}] {job.name}: {result.status}{note}")
        except Exception as e:  # a failing job is reported; the batch goes on
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            outcomes.append(JobOutcome(job.name, job.config, "failed", time.perf_counter() - t0, error=msg))
            if acc.is_main_process:
                log(f"[{i + 1}/{len(jobs)}] {job.name}: FAILED: {type(e).__name__}: {msg}")
                if not isinstance(e, ValueError):
                    log(traceback.format_exc().rstrip())
        finally:
            pipe.unload_erasure()
    return outcomes


def summary_table(outcomes: list[JobOutcome]) -> str:
    """A plain-text table: job, method, concept, status, steps, final loss, seconds."""
    head = ("job", "method", "concept", "status", "steps", "final loss", "seconds")
    rows = [head]
    for o in outcomes:
        loss = f"{o.final_loss:.4g}" if o.final_loss is not None else "-"
        status = o.status if o.error is None else f"failed: {o.error}"[:60]
        rows.append((o.name, o.config.method, ", ".join(o.config.concept)[:30], status, str(o.config.steps), loss,
                     f"{o.seconds:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
