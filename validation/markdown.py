"""report.md: what a person reads first; every figure says what it was compared with."""

from __future__ import annotations

from typing import Any


def fmt_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def bound_sign(f: dict[str, Any]) -> str:
    return {"max": "<=", "min": ">=", "equal": "must equal"}[f["bound"]]


def _tokenizer(part: dict[str, Any]) -> list[str]:
    lines = [f"### Tokenizer: **{part['status']}**", ""]
    if part["status"] == "not-run":
        return lines + [part["reason"], ""]
    lines += [f"Reference: {part['reference']}. Text set: {part['text_set']} ({part['texts']} texts).", "",
              "| tokenizer | result | first mismatch |", "|---|---|---|"]
    for r in part["tokenizers"]:
        m = r.get("first_mismatch")
        detail = (f"{r['check']} of `{m['label']}`: " + (f"ids {m['ids']} vs {m['reference_ids']} at {m['at']}"
                  if r["check"] == "encode" else f"{m['decoded']!r} vs {m['reference_decoded']!r}")) if m else ""
        lines.append(f"| {r['tokenizer']} | {r['status']}{' (' + r['reason'] + ')' if r.get('reason') else ''} | {detail} |")
    labels = dict.fromkeys(label for r in part["tokenizers"] for label in r.get("known_differences", {}))
    for label in labels:
        who = [r["tokenizer"] for r in part["tokenizers"] if r.get("known_differences", {}).get(label) == "differs"]
        lines.append(f"\nKnown difference `{label}` (not gated): {', '.join(who) or 'none'} differ.")
    return lines + [""]


def _section(name: str, part: dict[str, Any]) -> list[str]:
    lines = [f"### {name.capitalize()}: **{part['status']}**", ""]
    if part["status"] == "same-as-fidelity":
        return lines + [part["reason"], ""]
    lines += [f"Reference weights: {part['reference_weights']}. Gates: `{part['precision_gates']}`.", ""]
    weights = part.get("weights")
    if weights:
        lines += [f"Stored weights: **{weights['status']}**, {weights['checked']} tensors checked ({weights['method']})"
                  + (f"; {weights['mismatch_count']} differ: {'; '.join(weights['mismatches'][:5])}"
                     if weights["mismatches"] else "") + (f"; {weights['reason']}" if weights.get("reason") else ""), ""]
    case, g, gates = part["case"], part["generation"], part["gates"]
    reached = (f"; a row of {case['reach']} tokens reaches position {case['positions'] - 1}" if case.get("reach")
               else f"; positions 0 to {case['positions'] - 1}" if "positions" in case else "")
    lines += [f"Inputs: {case['source']}, prompt lengths {case['prompt_lengths']}, chunk {case['chunk']}, "
              f"{case['new_tokens']} decode steps{reached}.", "",
              "| metric | worst | gate |", "|---|---|---|"]
    for k, v in part["worst"].items():
        gate = "(reported, not gated)" if k == "top1_worst_step" else gates.get(k)
        lines.append(f"| {k} | {fmt_value(v)} | {fmt_value(gate)} |")
    for k in ("teacher_forced_match", "free_running_match"):
        lines.append(f"| {k} | {fmt_value(g[k])} | {fmt_value(gates[k])} |")
    c = part["corpus"]
    pct, dp = c["kl_percentiles"], c["delta_p_pct"]
    lines += ["", f"Corpus ({c['positions']} positions):", "",
              "| statistic | value | gate |", "|---|---|---|",
              f"| mean KL | {c['mean_kl']:.3g} ± {c['mean_kl_stderr']:.2g} | {fmt_value(gates.get('corpus_mean_kl'))} |",
              f"| KL p99 | {pct['p99']:.3g} | {fmt_value(gates.get('corpus_kl_p99'))} |",
              f"| KL max / p99.9 / p95 / p90 / median | {pct['max']:.3g} / {pct['p99.9']:.3g} / {pct['p95']:.3g} / "
              f"{pct['p90']:.3g} / {pct['median']:.3g} | |",
              f"| same top token | {c['same_top_pct']:.2f} ± {c['same_top_pct_stderr']:.2f} % | |",
              f"| Δp of the reference's top token | mean {dp['mean']:.3g} %, RMS {dp['rms']:.3g} %, "
              f"p1 {dp['p1']:.3g} %, p99 {dp['p99']:.3g} % | |",
              f"| perplexity reference / artifact | {c['ppl_reference']:.4g} / {c['ppl_artifact']:.4g} "
              f"(ratio {c['ppl_ratio']:.4f} ± {c['ln_ppl_ratio_stderr']:.2g} in ln) | |", ""]
    if part["failures"]:
        lines += [f"{len(part['failures'])} gate failure(s):", ""]
        lines += [f"- {f['metric']} at {f['step']} = {fmt_value(f['value'])} ({bound_sign(f)} {fmt_value(f['threshold'])})"
                  for f in part["failures"][:50]]
        lines.append("")
    lines += ["| step | positions | max_abs | mean_abs | cosine | top1 | kl |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['positions']} | {fmt_value(s['max_abs'])} | {fmt_value(s['mean_abs'])} | "
              f"{fmt_value(s['cosine'])} | {fmt_value(s['top1'])} | {fmt_value(s['kl'])} |" for s in part["steps"]]
    return lines + [""]


def _adapters(adapters: dict[str, Any]) -> list[str]:
    """One row per switchable adapter: the runner with it active against the reference with it merged."""
    lines = ["### Switchable adapters", "", "Each runs in the artifact's runner with the adapter active, against the "
             "reference with the same adapter merged into the weights (fidelity gates).", "",
             "| adapter | status | max abs | KL | top-1 | corpus mean KL |", "|---|---|---|---|---|---|"]
    for name, part in adapters.items():
        worst, corpus = part["fidelity"]["worst"], part["fidelity"].get("corpus") or {}
        lines.append(f"| {name} | **{part['status']}** | {fmt_value(worst.get('max_abs'))} | "
                     f"{fmt_value(worst.get('kl'))} | {fmt_value(worst.get('top1'))} | "
                     f"{fmt_value(corpus.get('mean_kl'))} |")
    return lines + [""]


def render(report: dict[str, Any]) -> str:
    a, p, lat, fp = report["artifact"], report["parity"], report["latency"], report["fingerprint"]
    lines = [f"# Validation report: {a['model']} -> {a['target']} ({a['precision']}, {a['device']})", "",
             f"Measured on: {fp['cpu']} ({fp['logical_cores']} logical cores), {fp['os']}; "
             f"threads {fp.get('threads')}; runtime {fp['runtime']}", ""]
    if a.get("shape"):
        lines += [f"Model: {a['shape']}", ""]
    if fp.get("device"):
        lines += [f"Device: {fp['device']}", ""]
    lines += [f"## Parity: **{p['status']}** (level `{p['level']}`)", ""]
    if p["status"] != "not-run":
        ref = p["reference"]
        lines += [f"Reference: {ref['kind']}, {ref['dtype']}, weights from {ref['weights']}. Corpus: "
                  f"{p['corpus_source']['text']} as {p['corpus_source']['ids']} ({p['corpus_source']['tokens']} tokens).",
                  "", "![parity](parity.png)", ""]
        lines += _section("fidelity", p["fidelity"]) + _section("quality", p["quality"])
        if p.get("tokenizer"):
            lines += _tokenizer(p["tokenizer"])
        if p.get("adapters"):
            lines += _adapters(p["adapters"])
    lines += [f"## Latency: {lat['status']} (level `{lat['level']}`)", ""]
    if lat["status"] == "measured":
        lines += ["| prefill tokens | median ms | p90 ms |", "|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |" for r in lat["prefill"]]
        lines += ["", "| decode at cache fill | median ms/token | p90 ms | tokens/s |", "|---|---|---|---|"]
        lines += [f"| {r['fill']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['tokens_per_s']:.1f} |"
                  for r in lat["decode"]]
        lines += [f"\nBatch {lat['batch']}, {lat['repeats']} timed runs after {lat['warmup']} warm-up per point."]
        lines += [f"Note: {note}." for note in lat.get("notes", [])]
        lines += ["", f"Peak host RSS (process): {lat['peak_rss_mb']} MB; device memory: "
                      f"{lat['device_memory_mb'] if lat['device_memory_mb'] is not None else 'n/a'}", "",
                  "![latency](latency.png)", ""]
    return "\n".join(lines)
