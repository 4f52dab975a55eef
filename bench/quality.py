"""Quality on real data: every method on orders A, B, C at one budget, and a small GORP sweep.

Each (method, order[, sweep setting]) is one ordinary runner launch (``python launch/train.py``, one
rank, its own master port and output directory); up to ``--jobs`` of them run at once on the one
GPU (a 135M model is launch-bound: one process uses a fraction of the device). Quality numbers do
not depend on the concurrency; train times measured under it are not comparable to isolated runs,
and the report says so.

    python bench/quality.py --out runs/quality --data-dir data/cl_benchmark --jobs 18 --deadline 500
    python bench/quality.py --out runs/sweep --data-dir data/cl_benchmark --no-main --sweep gorp,olora
    python bench/quality.py --report --runs runs/quality runs/sweep --results-dir bench/results --tag h200 \
        --notes bench/results/quality_h200_notes.md
    DS_ACCELERATOR=cpu python bench/quality.py --smoke --out /tmp/quality_smoke --data-dir <cl_benchmark>
    python bench/quality.py --out runs/long --data-dir data/cl_benchmark --orders SHARED10,MIXED --seeds 1,2,3
    python bench/long_report.py --runs runs/long --tag h100   # the seeded long / mixed-kind report

The budget is the same for every method: order A 100 optimizer steps per task and 300 test
examples per task, orders B and C 60 steps and 200 examples; 16 examples per step (``mtl`` trains
the sum of the tasks' steps on the mixed data). ``--deadline`` stops launching and ends the runs
still going (SIGTERM, then SIGKILL) that many seconds after the start, so that the finished runs'
results come back within a device's time limit. Every run writes ``results.json`` when it ends;
``runs.jsonl`` in ``--out`` records each launch (one JSON line when it ends, also printed).

``--report`` collects whatever finished under the ``--runs`` directories and writes into
``--results-dir``: ``quality_<tag>.md`` (methods × AA, BWT, FWT, forgetting, train time, peak
memory averaged over orders; AA / BWT per order; R per method and order; the sweep's sensitivity;
the issue's targets checked; ``--notes``' text after the header), ``quality_<tag>.json`` and heatmaps
``quality_<tag>_<order>_<method>_R.png`` (the method comparison's runs only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("gorp", "o-lora", "seq-lora", "galore", "seq-ft", "mtl")
ORDERS = ("A", "B", "C")
# order -> (optimizer steps per task, test examples per task). SHARED10: the ten shared tasks (the
# long order 4 without the tasks the shared copy lacks); MIXED: classification, instruction and chat
# tasks in one sequence (MIXED_TASKS). Their budgets are smaller per task so that 3 seeds of every
# method fit one device call (docs/protocol.md's sampling error grows accordingly: it is reported).
BUDGETS = {"A": (100, 300), "B": (60, 200), "C": (60, 200), "SHARED10": (40, 100), "MIXED": (40, 100)}
#: The mixed-kind sequence (bench/derived_tasks.py builds the GEN/ tasks from the CL_Benchmark files):
#: accuracy, ROUGE-L (headline), accuracy, exact match (chat), ROUGE-L (embedded word reversal).
MIXED_TASKS = ("SC/amazon", "GEN/agnews_headline", "TC/dbpedia", "GEN/dbpedia_name", "emb_reverse")
#: Tasks evaluated in every row and never trained (the generalisation column). SHARED10 trains every
#: shared task, so its unseen task is the embedded instruction task (does the sequence keep the
#: model's instruction following?); MIXED leaves two real tasks out.
EVAL_TASKS = {"SHARED10": ("emb_reverse",), "MIXED": ("SC/SST-2", "NLI/RTE")}
#: Methods an order compares where not all six (the issue: gorp against seq-lora and o-lora).
ORDER_METHODS = {"MIXED": ("gorp", "seq-lora", "o-lora")}
TASK_COUNTS = {"A": 4, "B": 4, "C": 4, "SHARED10": 10, "MIXED": len(MIXED_TASKS)}
SMOKE_BUDGET = (2, 4)
GLOBAL_BATCH = 16

# One setting changed at a time from the defaults (the embedded preset: ε_S 0.99, k 8, T 20, s 0.25,
# lr_full 5e-6, new adapters started off S, projectors aligned). Labels name the change. The sweep in
# bench/results/quality_h200.md ran around the preset before it (ε_S 0.9, T 10): its entries
# eps_S=0.99 and T=20 are the two that are now eps_S=0.9 and T=10.
SWEEPS: dict[str, list[dict[str, Any]]] = {
    "gorp": [  # priority 1 first; within a priority, in this order (what a deadline cuts comes last)
        {"label": "default", "method": "gorp", "settings": {}},
        {"label": "eps_S=0.9", "method": "gorp", "settings": {"shared_threshold": 0.9}},
        {"label": "eps_S=0.8", "method": "gorp", "settings": {"shared_threshold": 0.8}},
        {"label": "lr_full=2e-5", "method": "gorp", "settings": {"lr_full": 2e-5}},
        {"label": "scale=1", "method": "gorp", "settings": {"scale": 1.0}},
        {"label": "T=10", "method": "gorp", "settings": {"update_gap": 10}},
        {"label": "k=16", "method": "gorp", "settings": {"rank": 16}},
        {"label": "init_off_shared=off", "method": "gorp", "settings": {"lora_init_off_shared": False}},
        {"label": "align_projector=off", "method": "gorp", "settings": {"align_projector": False}},
        {"label": "eps_S=0.95", "method": "gorp", "settings": {"shared_threshold": 0.95}, "priority": 3},
        {"label": "scale=0.5", "method": "gorp", "settings": {"scale": 0.5}, "priority": 3},
        {"label": "T=5", "method": "gorp", "settings": {"update_gap": 5}, "priority": 3},
        {"label": "k=4", "method": "gorp", "settings": {"rank": 4}, "priority": 3},
        {"label": "lr_full=1e-6", "method": "gorp", "settings": {"lr_full": 1e-6}, "priority": 3},
        {"label": "lr_lora=5e-4", "method": "gorp", "settings": {"lr_lora": 5e-4}, "priority": 3},
    ],
    # O-LoRA's λ1 on the orders where the default protected least in an earlier measurement.
    "olora": [
        {"label": "lambda1=2", "method": "o-lora", "settings": {"olora_lambda": 2.0}, "orders": ["B", "C"],
         "priority": 2},
        {"label": "lambda1=0.1", "method": "o-lora", "settings": {"olora_lambda": 0.1}, "orders": ["B", "C"],
         "priority": 2},
    ],
}


def fail(message: str) -> None:
    print(f"gorp_ds: error: {message}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """One launch: ``group`` "main" (a method with its defaults) or "sweep"; ``label`` the setting."""

    group: str
    order: str
    method: str
    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    priority: int = 1  # sweep entries: lower launches first
    seed: int | None = None  # None: the runner's default seed (the A, B, C comparison)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.order}/{self.label}" + ("" if self.seed is None else f"/s{self.seed}")

    def output_dir(self, out: Path) -> Path:
        safe = "".join(c if c.isalnum() or c in "._=-" else "_" for c in self.label)
        return out / self.group / self.order / safe / ("" if self.seed is None else f"s{self.seed}")

    def results_file(self, out: Path) -> Path:
        return self.output_dir(out) / self.method / "results.json"


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def check_settings(settings: dict[str, Any], where: str) -> None:
    """Sweep settings must be run settings (flat names, as ``--print-config`` lists them)."""
    from gorp_ds.cl.config import SETTINGS

    fixed = {"method", "methods", "order", "data_dir", "output_dir", "max_steps_per_task", "eval_samples"}
    for name in settings:
        if name not in SETTINGS:
            close = [s for s in SETTINGS if name.replace("-", "_") in s][:5]
            fail(f"{where}: unknown setting {name!r} (run settings are flat names such as shared_threshold, rank, "
                 f"update_gap{'; did you mean ' + ', '.join(close) + '?' if close else ''})")
        if name in fixed:
            fail(f"{where}: {name!r} is set by the benchmark itself (the budget is the same for every run)")


def load_sweeps(spec: str | None, orders: list[str]) -> list[Run]:
    """``--sweep gorp,olora`` (built-in lists) or ``--sweep FILE.json`` (a list of {label, method,
    settings[, orders][, priority]}); each entry runs on its own orders or ``orders``."""
    if not spec:
        return []
    entries: list[dict[str, Any]] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part in SWEEPS:
            entries += SWEEPS[part]
            continue
        path = Path(part)
        if not path.is_file():
            fail(f"--sweep {part}: neither a built-in sweep ({', '.join(SWEEPS)}) nor a JSON file")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            fail(f"--sweep {part}: not valid JSON ({err})")
        if not isinstance(loaded, list) or not all(isinstance(e, dict) and "label" in e for e in loaded):
            fail(f"--sweep {part}: expected a JSON list of objects with 'label', 'method' and 'settings'")
        entries += loaded
    runs = []
    for entry in entries:
        method = entry.get("method", "gorp")
        if method not in METHODS:
            fail(f"--sweep entry {entry['label']!r}: unknown method {method!r} (methods: {', '.join(METHODS)})")
        settings = dict(entry.get("settings") or {})
        check_settings(settings, f"--sweep entry {entry['label']!r}")
        for order in entry.get("orders") or orders:
            runs.append(Run("sweep", order, method, f"{method}_{entry['label']}", settings,
                            int(entry.get("priority", 1))))
    return runs


def command(run: Run, args: argparse.Namespace, out: Path, model: str, ds_config: Path) -> list[str]:
    steps, samples = SMOKE_BUDGET if args.smoke else BUDGETS[run.order]
    if run.order == "MIXED":  # the derived tasks live beside links to --data-dir's folders
        sequence = ["--data-dir", str(out / "data"), "--tasks", ",".join(MIXED_TASKS)]
    else:
        sequence = ["--data-dir", args.data_dir, "--order", run.order]
    if run.order in EVAL_TASKS:
        sequence += ["--eval-tasks", ",".join(EVAL_TASKS[run.order])]
    if run.seed is not None:
        sequence += ["--seed", str(run.seed)]
    argv = [sys.executable, str(REPO / "launch" / "train.py"), "--ds_config", str(ds_config), "--model", model,
            *sequence, "--method", run.method,
            "--max-steps-per-task", str(steps), "--eval-samples", str(samples),
            "--global-batch-size", str(4 if args.smoke else GLOBAL_BATCH),
            "--eval-batch-size", str(min(samples, args.eval_batch_size)),
            "--output-dir", str(run.output_dir(out)), "--overwrite",
            "--checkpoints", "false", "--export", "false", "--predictions", "false", "--save-every", "0"]
    for name, value in run.settings.items():
        argv += [f"--{name.replace('_', '-')}", _flag_value(value)]
    return argv


# The methods the targets compare on every order; the other two matter less where a deadline cuts.
CORE_METHODS = ("gorp", "mtl", "o-lora", "seq-lora")


def launch_order(runs: list[Run]) -> list[Run]:
    """What a deadline may cut comes last: every method on the longest order (its runs also take the
    longest: started first, the tail is short), then the core methods of the other orders, then
    galore and seq-ft there; the sweep after the comparison, by its entries' priority, then in list order."""
    longest = max((r.order for r in runs), key=lambda o: BUDGETS[o][0] * BUDGETS[o][1] * TASK_COUNTS[o], default="A")
    priority = {m: i for i, m in enumerate(CORE_METHODS + tuple(m for m in METHODS if m not in CORE_METHODS))}

    def key(item: tuple[int, Run]) -> tuple:
        index, run = item
        if run.group != "main":
            return (3, run.priority, index)
        tier = 0 if run.order == longest else (1 if run.method in CORE_METHODS else 2)
        return (tier, run.seed or 0, run.order, priority[run.method])

    return [run for _, run in sorted(enumerate(runs), key=key)]


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def bench_ds_config(out: Path) -> Path:
    """zero2.json without TensorBoard: no event files and no per-step gradient-norm reads."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.pop("tensorboard", None)
    path = out / "ds_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _metrics(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: result["metrics"].get(k) for k in ("AA", "BWT", "FWT", "forgetting")}


def schedule(runs: list[Run], args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Launch up to ``--jobs`` runs at once until all ended or the deadline; record each in runs.jsonl."""
    from tqdm import tqdm

    model = args.model
    if args.smoke:
        from tests.support.tiny_model import make_tiny_model_dir

        # A chat template, for the chat task of the MIXED sequence (the tiny tokenizer has none).
        template = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
                    "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
        model = str(make_tiny_model_dir(out / "tiny_model", chat_template=template))
    ds_config = bench_ds_config(out)
    if any(r.order == "MIXED" for r in runs):
        from bench.derived_tasks import build_data_dir

        build_data_dir(Path(args.data_dir), out / "data")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ledger = out / "runs.jsonl"
    start = time.monotonic()
    pending = [r for r in runs if args.rerun or not r.results_file(out).is_file()]
    for r in runs:
        if r not in pending:
            print(json.dumps({"run": r.key, "status": "done before", **_metrics(r.results_file(out))}), flush=True)
    running: dict[str, tuple[Run, subprocess.Popen, float, dict[str, int]]] = {}
    records: list[dict[str, Any]] = []
    ports: set[int] = set()
    stopping = False
    bar = tqdm(total=len(pending), desc="runs", dynamic_ncols=True, mininterval=2.0)

    def finish(key: str, status: str) -> None:
        run, proc, launched, peak = running.pop(key)
        record = {"run": run.key, **asdict(run), "status": status, "returncode": proc.returncode,
                  "wall_s": round(time.monotonic() - launched, 1), "max_concurrent": peak["n"],
                  "output_dir": str(run.output_dir(out).relative_to(out)),
                  "log": str((out / "logs" / f"{run.key.replace('/', '_')}.log").relative_to(out)),
                  **_metrics(run.results_file(out))}
        records.append(record)
        with open(ledger, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        bar.update(1)

    while pending or running:
        elapsed = time.monotonic() - start
        if args.deadline and elapsed > args.deadline and not stopping:
            stopping = True
            bar.write(f"deadline {args.deadline:.0f} s: {len(running)} runs stopped, {len(pending)} not started")
            for _, proc, _, _ in running.values():
                proc.send_signal(signal.SIGTERM)
            for run in pending:
                records.append({"run": run.key, **asdict(run), "status": "not started"})
                with open(ledger, "a") as handle:
                    handle.write(json.dumps(records[-1]) + "\n")
            pending = []
            grace_until = time.monotonic() + 10
        if stopping and time.monotonic() > grace_until:
            for _, proc, _, _ in running.values():
                if proc.poll() is None:
                    proc.kill()
        while pending and len(running) < args.jobs and not stopping:
            run = pending.pop(0)
            env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port(ports)),
                   # Many processes share the host's cores: one BLAS/OpenMP thread and one compile
                   # worker each (the split-master update is compiled once per gorp/galore process).
                   "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "TORCHINDUCTOR_COMPILE_THREADS": "1"}
            log = open(out / "logs" / f"{run.key.replace('/', '_')}.log", "w")
            proc = subprocess.Popen(command(run, args, out, model, ds_config), cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            log.close()
            running[run.key] = (run, proc, time.monotonic(), {"n": 0})
        for key, (run, proc, _, peak) in list(running.items()):
            peak["n"] = max(peak["n"], len(running))
            if proc.poll() is not None:
                ok = proc.returncode == 0 and run.results_file(out).is_file()
                finish(key, "done" if ok else ("stopped at the deadline" if stopping else "failed"))
        time.sleep(0.5)
    bar.close()
    failed = [r for r in records if r["status"] == "failed"]
    for record in failed:
        tail = (out / record["log"]).read_text(errors="replace").strip().splitlines()[-5:]
        print(f"{record['run']} failed (exit {record['returncode']}), {record['log']}:\n  " + "\n  ".join(tail),
              file=sys.stderr)
    done = sum(r["status"] == "done" for r in records)
    print(f"{done} of {len(records)} runs finished in {time.monotonic() - start:.0f} s "
          f"(at most {args.jobs} at once); ledger {ledger}", flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for the runs, their logs and runs.jsonl")
    parser.add_argument("--data-dir", help="CL_Benchmark-layout directory holding dbpedia, amazon, yelp, agnews")
    parser.add_argument("--orders", default=",".join(ORDERS), help="orders of the method comparison (A,B,C)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods of the comparison")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated run seeds: each run of the comparison once per seed (default: the "
                             "runner's seed, one run each)")
    parser.add_argument("--no-main", action="store_true", help="skip the method comparison (sweep only)")
    parser.add_argument("--sweep", default=None,
                        help=f"sweeps to run too: built-in {', '.join(SWEEPS)} and/or JSON files (comma-separated)")
    parser.add_argument("--sweep-orders", default="A", help="orders of sweep entries that name none (A)")
    parser.add_argument("--model", default="embedded", help="the runner's --model (default: the embedded SmolLM2)")
    parser.add_argument("--jobs", type=int, default=12, help="runs at once on the one device")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds after the start: stop launching, end the runs still going (0: none)")
    parser.add_argument("--eval-batch-size", type=int, default=64,
                        help="generation batch (the runner's default; larger batches raise the peak memory reported)")
    parser.add_argument("--rerun", action="store_true", help="also run what already has results.json in --out")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: tiny random LLaMA, 2 steps per task, 4 test examples, batch 4")
    parser.add_argument("--report", action="store_true", help="write the report of --runs and exit")
    parser.add_argument("--runs", nargs="+", default=None, help="--report: run directories (each a --out)")
    parser.add_argument("--results-dir", default=str(REPO / "bench" / "results"), help="--report: where to write")
    parser.add_argument("--tag", default="h200", help="--report: file names quality_<tag>*")
    parser.add_argument("--notes", default=None,
                        help="--report: a markdown file whose text goes right after the report's header")
    args = parser.parse_args()

    if args.report:
        from bench.quality_report import write_report

        dirs = [Path(d) for d in (args.runs or ([args.out] if args.out else []))]
        if not dirs:
            fail("--report needs --runs DIR [DIR ...] (directories a benchmark wrote with --out)")
        missing = [str(d) for d in dirs if not (d / "runs.jsonl").is_file()]
        if missing:
            fail(f"--runs {missing[0]}: no runs.jsonl there (not a directory this benchmark wrote with --out)")
        notes = None
        if args.notes:
            if not Path(args.notes).is_file():
                fail(f"--notes {args.notes}: no such file (a markdown file to put after the report's header)")
            notes = Path(args.notes).read_text()
        print(write_report(dirs, Path(args.results_dir), args.tag, notes))
        return
    if not args.out:
        fail("--out is required (where the runs go)")
    if not args.data_dir or not Path(args.data_dir).is_dir():
        fail(f"--data-dir {args.data_dir}: not a directory (a CL_Benchmark layout with dbpedia, amazon, yelp, agnews)")
    if args.jobs < 1:
        fail(f"--jobs {args.jobs}: must be at least 1")
    orders = [o.strip().upper() for o in args.orders.split(",") if o.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for order in orders + [o.strip().upper() for o in args.sweep_orders.split(",") if o.strip()]:
        if order not in BUDGETS:
            fail(f"--orders/--sweep-orders: unknown order {order!r} (this benchmark's orders: {', '.join(BUDGETS)}; "
                 "the papers' orders 1-3 need yahoo, which this data lacks)")
    for method in methods:
        if method not in METHODS:
            fail(f"--methods: unknown method {method!r} (methods: {', '.join(METHODS)})")
    sweep_orders = [o.strip().upper() for o in args.sweep_orders.split(",") if o.strip()]
    try:
        seeds = [None] if args.seeds is None else [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        fail(f"--seeds {args.seeds}: expected comma-separated integers such as 1,2,3")
    runs = [] if args.no_main else [Run("main", o, m, m, seed=seed) for seed in seeds for o in orders for m in methods
                                    if m in ORDER_METHODS.get(o, METHODS)]
    runs += [replace(r, seed=seed) for seed in seeds for r in load_sweeps(args.sweep, sweep_orders)]
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not runs:
        fail("nothing to run (--no-main without --sweep)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = launch_order(runs)
    budgets = {o: SMOKE_BUDGET for o in BUDGETS} if args.smoke else BUDGETS
    (out / "plan.json").write_text(json.dumps({"budgets": budgets, "global_batch": 4 if args.smoke else GLOBAL_BATCH,
                                               "smoke": args.smoke,
                                               "jobs": args.jobs, "runs": [asdict(r) for r in runs]}, indent=2))
    schedule(runs, args, out)


if __name__ == "__main__":
    main()
