"""The ``pytest_gpu`` section (``pytest -m gpu`` over the test files with GPU tests, its
JUnit XML read into the report) and ``accuracy`` (the fp16 / bf16 vs CPU fp32 figures
tests/gpu/test_gpu_model.py records through ``RWKV_GPU_CHECK_METRICS``)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .plumbing import REPO, Skip, one_line, run_logged


def gpu_test_files() -> list:
    """The test files that hold GPU tests (``pytest.mark.gpu``), relative to the checkout."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8", errors="replace"))


def pytest_gpu(check) -> dict:
    if check.args.no_pytest:
        raise Skip("--no-pytest")
    check.need("pytest_gpu")
    files = gpu_test_files()
    metrics = check.work / "gpu_metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    junit = check.out / "pytest_junit.xml"
    env = dict(os.environ, RWKV_GPU_CHECK_METRICS=str(metrics))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs",
           f"--junitxml={junit}", *files]
    check.log("   " + " ".join(cmd))
    rc = run_logged(cmd, check.log, timeout=min(check.args.pytest_timeout, check.left() - 10), env=env)
    res = {"files": files, "returncode": rc, **junit_counts(junit)}
    check.ctx["metrics_file"] = metrics
    if rc == 124:
        res.update(_status="failed", _error="pytest timed out")
    elif res.get("failed") or res.get("errors") or rc not in (0, 5):
        names = ", ".join(f["test"] for f in res.get("failures", [])[:5])
        res.update(_status="failed", _error=f"{res.get('failed', 0)} failed, {res.get('errors', 0)} errors "
                                            f"(rc {rc}): {names}"[:300])
    return res


def accuracy(check) -> dict:
    path = check.ctx.get("metrics_file")
    records = []
    if path is not None and Path(path).is_file():
        records = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    acc = [r for r in records if r.get("kind") == "accuracy"]
    if not acc:
        check.require_cuda()
        raise RuntimeError("test_gpu_model.py recorded no accuracy figures (see pytest_gpu)")
    by_dtype = {}
    for r in acc:
        d = by_dtype.setdefault(r["dtype"], {"max_rel_err": 0.0, "min_top1_agreement": 1.0, "shapes": []})
        d["max_rel_err"] = max(d["max_rel_err"], r["max_rel_err"])
        d["min_top1_agreement"] = min(d["min_top1_agreement"], r["top1_agreement"])
        d["shapes"].append(r["shape"])
    return {"by_dtype": by_dtype, "results": acc,
            "snapshots": [r for r in records if r.get("kind") == "snapshots"],
            "pipeline": [r for r in records if r.get("kind") == "pipeline"]}


def junit_counts(path: Path) -> dict:
    """Counts of a pytest JUnit XML file, the failures by name and up to 20 skip reasons."""
    import xml.etree.ElementTree as ET
    if not path.is_file():
        return {}
    try:
        root = ET.parse(str(path)).getroot()
    except ET.ParseError as e:
        return {"junit_error": str(e)}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for s in suites:
        out["tests"] += int(s.get("tests", 0))
        out["failed"] += int(s.get("failures", 0))
        out["errors"] += int(s.get("errors", 0))
        out["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    out["failures"].append({"test": name, "kind": tag,
                                            "message": one_line(el.get("message") or el.text or "")})
            sk = case.find("skipped")
            if sk is not None and len(out["skip_reasons"]) < 20:
                reason = (sk.get("message") or "").strip()
                if reason not in out["skip_reasons"]:
                    out["skip_reasons"].append(reason)
    out["passed"] = out["tests"] - out["failed"] - out["errors"] - out["skipped"]
    return out
