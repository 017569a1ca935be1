"""The report's ``summary``: how many sections ended ok / failed / skipped, and the issue's
targets (accuracy, bandwidth use, batching, the `rwkv` package, keystroke latency) as
value / op / limit / ratio / ok, read from the sections' figures; also into the log."""
from __future__ import annotations

from .plumbing import REPLAY_SHAPE


def targets_of(sections: dict, batch: int) -> list:
    """The targets, in order; ``ok`` is None where the figure is missing."""
    acc = sections["accuracy"].get("by_dtype", {})
    main = sections.get(f"bench_{REPLAY_SHAPE}", {})
    peer = sections["peer_rwkv"].get("shapes", {}).get(REPLAY_SHAPE, {})
    replay = sections[f"replay_{REPLAY_SHAPE}"]
    speedup = peer.get("speedup") or {}
    b = batch
    targets = []

    def target(name, value, limit, op):
        ok = None
        if isinstance(value, (int, float)):
            ok = value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit
        ratio = round(value / limit, 3) if isinstance(value, (int, float)) and limit else None
        targets.append({"target": name, "value": value, "op": op, "limit": limit, "ratio": ratio, "ok": ok})

    for dt in ("fp16", "bf16"):
        d = acc.get(dt, {})
        target(f"{dt} vs fp32 top-1 agreement", d.get("min_top1_agreement"), 0.99, ">=")
        target(f"{dt} vs fp32 max relative logit error", d.get("max_rel_err"), 2e-2, "<")
    target(f"{REPLAY_SHAPE} batch-1 decode / weight-bytes bandwidth limit",
           main.get("b1_fraction_of_bw_limit"), 0.5, ">=")
    target(f"{REPLAY_SHAPE} batch-{b} step / batch-1 step", main.get(f"b{b}_over_b1_step"), 1.3, "<=")
    target(f"{REPLAY_SHAPE} batch-{b} decode tok/s / rwkv package's", speedup.get(f"decode_b{b}_tok_s"), 3.0, ">=")
    target(f"{REPLAY_SHAPE} batch-1 decode tok/s / rwkv package's (information)",
           speedup.get("decode_b1_tok_s"), 3.0, ">=")
    target(f"keystroke -> first ghost text p50 ms ({REPLAY_SHAPE})", replay.get("first_text_ms_p50"), 15.0, "<=")
    target(f"keystroke -> all candidates' first line p50 ms ({REPLAY_SHAPE})",
           replay.get("all_candidates_ms_p50"), 100.0, "<=")
    return targets


def summarize(check) -> None:
    """Write ``summary`` into the check's report and log the sections and the targets."""
    sections = check.data["sections"]
    targets = targets_of(sections, check.args.batch)
    counts = {k: sum(1 for s in sections.values() if s.get("status") == k) for k in ("ok", "failed", "skipped")}
    check.data["summary"] = {"sections": counts, "targets": targets,
                             "targets_met": sum(1 for t in targets if t["ok"]),
                             "targets_missed": sum(1 for t in targets if t["ok"] is False),
                             "targets_without_figure": sum(1 for t in targets if t["ok"] is None)}
    check.log("== summary")
    for name, s in sections.items():
        check.log(f"   {name:14} {s.get('status'):8} {s.get('seconds', 0):7.1f} s  {s.get('error') or ''}")
    for t in targets:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["ok"]]
        v = t["value"]
        vs = f"{v:.4g}" if isinstance(v, float) else str(v)
        check.log(f"   {mark} {t['target']}: {vs} {t['op']} {t['limit']}"
                  + (f"  (ratio {t['ratio']})" if t["ratio"] is not None else ""))
