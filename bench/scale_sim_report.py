"""The figures of bench/scale_sim.py: one level's summary from INFO deltas and the simulated
workers' timings, its printed lines, and the per-worker / per-sample model docs/SCALE.md uses."""

from __future__ import annotations


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile of ``values`` (nearest rank), rounded to µs when they are ms; None for none."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 3)


def summarise(n: int, sample_s: float, window: float, before: dict, after: dict, got: list[dict], probe: list[float],
              ops: list[int], clients: list[int], waiting: list[int], backlog: int, enqueue_s: float) -> dict:
    def delta(key: str) -> float:
        return float(after.get(key, 0)) - float(before.get(key, 0))

    ms: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for g in got:
        for k, v in g["ms"].items():
            ms.setdefault(k, []).extend(v)
        for k, v in g["counts"].items():
            counts[k] = counts.get(k, 0) + v
    cmds = {}
    for name, st in after["commandstats"].items():
        calls = st["calls"] - before["commandstats"].get(name, {}).get("calls", 0)
        usec = st["usec"] - before["commandstats"].get(name, {}).get("usec", 0)
        if calls:
            cmds[name] = {"per_s": round(calls / window, 1), "usec_per_call": round(usec / calls, 2)}
    done = counts.get("outcome done", 0)
    # The fleet's commands: all of them (commands inside scripts and transactions included, as
    # commandstats counts them) but this driver's probe PINGs and INFOs.
    mine = sum(after["commandstats"].get(c, {}).get("calls", 0) - before["commandstats"].get(c, {}).get("calls", 0)
               for c in ("ping", "info"))
    total_ops = (delta("total_commands_processed") - mine) / window
    return {
        "workers": n, "sample_s": sample_s, "window_s": round(window, 1), "backlog": backlog,
        "enqueue_s": round(enqueue_s, 2),
        "samples_per_s": round(done / window, 1), "ideal_samples_per_s": round(n / sample_s, 1) if sample_s else None,
        "queue_left": waiting[-1] if waiting else None,
        "redis_cpu_cores": round((delta("used_cpu_sys") + delta("used_cpu_user")) / window, 3),
        "redis_main_thread_cpu_cores": round((delta("used_cpu_sys_main_thread") + delta("used_cpu_user_main_thread"))
                                             / window, 3),
        "ops_per_s": round(total_ops, 1), "ops_per_s_per_worker": round(total_ops / n, 2),
        "instantaneous_ops_per_sec_mean": round(sum(ops) / len(ops), 1) if ops else None,
        "instantaneous_ops_per_sec_max": max(ops) if ops else None,
        "ops_per_sample": round(total_ops / (done / window), 1) if done else None,
        "net_in_kib_s": round(delta("total_net_input_bytes") / window / 1024, 1),
        "net_out_kib_s": round(delta("total_net_output_bytes") / window / 1024, 1),
        "connected_clients": max(clients) if clients else None,
        "used_memory_mib": round(after["used_memory"] / 2**20, 1),
        "mem_clients_normal_mib": round(after.get("mem_clients_normal", 0) / 2**20, 1),
        "probe_ping_ms": {"p50": pct(probe, 0.5), "p99": pct(probe, 0.99), "max": pct(probe, 1.0), "n": len(probe)},
        "latency_ms": {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)} for k, v in sorted(ms.items())},
        "counts": counts,
        "commands": dict(sorted(cmds.items(), key=lambda kv: -kv[1]["per_s"])),
    }


CLAIMS = ("admission.admit_reference", "admission.admit", "records.claim")  # the claim, as the code has it


def show(r: dict) -> None:
    lat = r["latency_ms"]
    if r["refused"]:
        print(f"  N={r['workers']}: {r['started']} workers connected; refused: {r['refused']}", flush=True)

    def p(op: str) -> str:
        x = lat.get(op)
        return f"{x['p50']}/{x['p99']}" if x else "-"

    what = "idle" if r["idle"] else f"sample_s={r['sample_s']:<5}" + ("" if r["manifest"] else " (no manifest)")
    print(f"  N={r['workers']:>5} {what} samples/s {r['samples_per_s']:>7} (ideal "
          f"{r['ideal_samples_per_s']}) | Redis CPU {r['redis_cpu_cores']:.3f} (main {r['redis_main_thread_cpu_cores']:.3f})"
          f" | ops/s {r['ops_per_s']:>8} ({r['ops_per_s_per_worker']}/worker, {r['ops_per_sample']}/sample) | clients "
          f"{r['connected_clients']}", flush=True)
    print(f"     ms p50/p99: ping {r['probe_ping_ms']['p50']}/{r['probe_ping_ms']['p99']} claim {p(next((k for k in CLAIMS if k in lat), 'records.claim'))} "
          f"complete {p('records.complete')} renew {p('records.renew')} beat {p('heartbeat.beat')} "
          f"reaper pass {p('heartbeat.confirmed_orphans (reaper)')} beat lag {p('beat lag (simulator health)')}",
          flush=True)


def model(out: dict) -> dict:
    """The two terms of docs/SCALE.md's estimate, from the runs at the largest N where every
    worker is busy (a backlog left at the end): a least-squares line through (samples/s,
    value) gives the fleet's commands and Redis CPU per busy worker (the intercept / N: beats,
    events) and per sample (the slope). The idle run gives the same per idle worker (its
    kombu poll, a BRPOP a second, replaces the samples)."""
    idle = out["idle"]
    n = idle["started"]
    busy = [r for r in out["levels"] + out["breaking"]
            if r["workers"] == idle["workers"] and (r["queue_left"] or 0) > 0 and r["samples_per_s"] > 0]

    def fit(key: str) -> tuple[float, float]:
        xs, ys = [r["samples_per_s"] for r in busy], [r[key] for r in busy]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        return my - slope * mx, slope

    out_model: dict = {"idle_worker_ops_per_s": round(idle["ops_per_s"] / n, 2),
                       "idle_worker_cpu_us_per_s": round(idle["redis_cpu_cores"] / n * 1e6, 1),
                       "busy_runs": [(r["sample_s"], r["samples_per_s"]) for r in busy]}
    if len(busy) >= 2:
        ops0, ops1 = fit("ops_per_s")
        cpu0, cpu1 = fit("redis_cpu_cores")
        out_model.update(busy_worker_ops_per_s=round(ops0 / n, 2), ops_per_sample=round(ops1, 1),
                         busy_worker_cpu_us_per_s=round(cpu0 / n * 1e6, 1), cpu_ms_per_sample=round(cpu1 * 1e3, 3))
    return out_model