#!/usr/bin/env bash
# Time `make demo` (venv + install + the whole `tpas demo --no-serve`) from a fresh clone.
#
#   benchmarks/demo_time.sh [REPO] [-- extra tpas demo args]
#
# REPO defaults to this checkout (its committed HEAD is cloned, so uncommitted edits are not timed).
# Writes benchmarks/results/demo_time.{json,md} and the demo's results table; the make log goes to
# benchmarks/results/tmp/demo_time.log. KEEP=1 keeps the clone (and its runs/demo) for a look or a
# screenshot:  TPAS_BROWSER_RUN=<clone>/runs/demo TPAS_SCREENSHOT=docs/screenshot.png pytest tests/test_browser.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="${1:-$(dirname "$here")}"
shift || true
[ "${1:-}" = "--" ] && shift
extra="$*"
results="$here/results"
mkdir -p "$results"
work="$(mktemp -d "${TMPDIR:-/tmp}/tpas-demo-time.XXXXXX")"
mkdir -p "$results/tmp"; log="$results/tmp/demo_time.log"
echo "cloning $repo into $work/tpas"
git clone --quiet "$repo" "$work/tpas"
commit="$(git -C "$work/tpas" rev-parse --short HEAD)"
run="$work/tpas/runs/demo"
start=$(date +%s)
set +e
( cd "$work/tpas" && make demo DEMO_ARGS="--no-serve --out runs/demo $extra" ) >"$log" 2>&1
rc=$?
set -e
end=$(date +%s)
secs=$((end - start))
echo "make demo: exit $rc after ${secs} s (log: $log)"
if [ $rc -ne 0 ]; then tail -30 "$log"; exit $rc; fi
python3 - "$run" "$secs" "$commit" "$results" "$(nproc)" "$extra" <<'PY'
import json, sys, time
run, secs, commit, out, cpus, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
rows = json.load(open(f"{run}/results.json"))["rows"]
steps = {}
import glob, os
for p in sorted(glob.glob(f"{run}/.steps/*.json")):
    steps[os.path.basename(p)[:-5]] = json.load(open(p)).get("seconds")
r1 = {r["label"]: r["metrics"].get("R@1") for r in rows}
summary = {"seconds": secs, "minutes": round(secs / 60, 1), "commit": commit, "cpus": int(cpus),
           "demo_args": extra, "step_seconds": steps, "R@1": r1, "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
json.dump(summary, open(f"{out}/demo_time.json", "w"), indent=2)
table = open(f"{run}/results.md").read()
md = (f"# make demo from a fresh clone\n\ncommit {commit}, {cpus} CPUs, extra args: '{extra}'\n\n"
      f"total (venv + install + demo --no-serve): **{secs} s ({secs/60:.1f} min)**\n\n"
      f"steps (s): {json.dumps(steps)}\n\n{table}")
open(f"{out}/demo_time.md", "w").write(md)
print(md)
PY
if [ "${KEEP:-0}" = 1 ]; then echo "kept the clone: $work/tpas (demo run: $run)"; else rm -rf "$work"; fi
