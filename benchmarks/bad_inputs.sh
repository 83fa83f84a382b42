#!/usr/bin/env bash
# The bad-input catalogue of issue 13, run on a freshly generated mini-PAB and broken copies of it.
#
#   PY=.venv/bin/python benchmarks/bad_inputs.sh          (PYTHONPATH=src for an uninstalled checkout)
#
# For every case it prints the exit code and the first line the user reads: the command's own
# message ("tpas CMD: error: ..." / "tpas CMD: skipped ..."), else the first line of its answer.
# A case FAILS when its output holds a traceback, when it exits 0 on broken data without saying
# what it skipped, or when its check does not hold. The table also goes to
# benchmarks/results/bad_inputs.md. About 8 minutes on 2 busy CPU cores. KEEP=1 keeps the work folder.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PY:-python}"
TPAS=("$PY" -m tpas.cli)
work="$(mktemp -d "${TMPDIR:-/tmp}/tpas-bad-inputs.XXXXXX")"
results="$here/results"
mkdir -p "$results"
table="$work/table.md"
server_pid=""
failures=0
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  [ "${KEEP:-0}" = 1 ] && echo "work folder kept: $work" || rm -rf "$work"
}
trap cleanup EXIT

# first_line FILE: the command's own message, else the first line of its answer (progress bars and
# log lines are not what a user reads first when something goes wrong)
first_line() {
  tr '\r' '\n' <"$1" | grep -m1 -E '^tpas [a-z-]+: ' || tr '\r' '\n' <"$1" | grep -v -E '^[0-9:]{8} (INFO|WARNING|DEBUG) |^\s*$|it/s|img/s|batch/s|file/s' | head -1
}

# case NAME EXPECT -- COMMAND...: EXPECT is "fail" (broken data: non-zero exit), "skip" (exit 0 and a
# "skipped" line) or "ok" (exit 0)
case_() {
  local name="$1" expect="$2"; shift 3
  local out="$work/out.txt"
  "$@" >"$out" 2>&1
  local rc=$?
  local line verdict="ok"
  line="$(first_line "$out" | cut -c1-150)"
  grep -q "Traceback" "$out" && verdict="FAIL: traceback"
  case "$expect" in
    fail) [ "$rc" -ne 0 ] || verdict="FAIL: exit 0 on broken data" ;;
    skip) { [ "$rc" -eq 0 ] && grep -q "skipped" "$out"; } || verdict="FAIL: no skip report" ;;
    ok) [ "$rc" -eq 0 ] || verdict="FAIL: exit $rc" ;;
  esac
  [ "$verdict" = ok ] || failures=$((failures + 1))
  printf '| %s | %s | %s | `%s` |\n' "$name" "$rc" "$verdict" "${line//|/\\|}" | tee -a "$table"
}

# check NAME CONDITION-COMMAND DESCRIPTION: a fact that is not a command's exit (file modes, sizes, ...)
check() {
  local name="$1" description="$3" verdict="ok"
  bash -c "$2" >/dev/null 2>&1 || { verdict="FAIL"; failures=$((failures + 1)); }
  printf '| %s | - | %s | %s |\n' "$name" "$verdict" "$description" | tee -a "$table"
}

echo "work folder: $work"
cd "$work"
"${TPAS[@]}" synth mp --identities 40 --seed 13 --workers 2 >/dev/null 2>&1 || { echo "synth failed"; exit 1; }
variant() { rm -rf "$1"; cp -r mp "$1"; }
cut_half() { "$PY" -c "import sys; p=sys.argv[1]; b=open(p,'rb').read(); open(p,'wb').write(b[:len(b)//2])" "$1"; }
damage_inside() { "$PY" -c "import sys; p=sys.argv[1]; b=open(p,'rb').read(); open(p,'wb').write(b[:20]+bytes(len(b)-22)+b[-2:])" "$1"; }
cat >tiny.yaml <<'EOF'
model: {name: lite-tiny}
data: {format: pab, val_identities: 0, workers: 0}
train: {max_steps: 1, batch_size: 8, progress: false, threads: 1}
val: {every: -1, calibrate_rerank: 0}
EOF
last_train=$(tail -1 mp/annotation/train/pair_0.json | "$PY" -c "import json,sys; print(json.load(sys.stdin)['image'])")

printf '| case | exit | verdict | first line the user reads |\n|---|---|---|---|\n' | tee "$table"

# -- images -------------------------------------------------------------------------------------------
variant cut; cut_half cut/test/3.jpg
variant html; echo "<html>502 Bad Gateway</html>" >html/test/5.jpg
variant cuttrain; cut_half "cuttrain/$last_train"
variant miss; rm "miss/$last_train"
variant late; damage_inside late/test/4.jpg
EV=(--model lite-tiny --workers 0 --split test)
case_ "eval: truncated JPEG" fail -- "${TPAS[@]}" eval "${EV[@]}" --data cut --out ev1
case_ "eval: HTML page saved as .jpg" fail -- "${TPAS[@]}" eval "${EV[@]}" --data html --out ev2
case_ "eval: truncated JPEG, --on-bad-image skip" skip -- "${TPAS[@]}" eval "${EV[@]}" --data cut --out ev3 --on-bad-image skip
case_ "eval: damaged inside (passes pre-flight)" fail -- "${TPAS[@]}" eval "${EV[@]}" --data late --out ev4
case_ "eval: damaged inside, --on-bad-image skip" skip -- "${TPAS[@]}" eval "${EV[@]}" --data late --out ev5 --on-bad-image skip
case_ "train: truncated JPEG" fail -- "${TPAS[@]}" train --config tiny.yaml data.root=cuttrain --out run1
case_ "train: missing image outside the first batch" fail -- "${TPAS[@]}" train --config tiny.yaml data.root=miss --out run2
case_ "train: missing image, --on-bad-image skip" skip -- "${TPAS[@]}" train --config tiny.yaml data.root=miss --out run3 --on-bad-image skip
case_ "index: truncated JPEG" fail -- "${TPAS[@]}" index --model lite-tiny --data cut --out idx1 --workers 0
case_ "index: truncated JPEG, --on-bad-image skip" skip -- "${TPAS[@]}" index --model lite-tiny --data cut --out idx2 --workers 0 --on-bad-image skip

# -- check-data ----------------------------------------------------------------------------------------
variant anno
"$PY" - anno/annotation/test/attr.json <<'EOF'
import sys
path = sys.argv[1]
lines = open(path).read().splitlines()
lines[1] = lines[1][: len(lines[1]) - 40]                 # a line that ends early
lines[3] = lines[3].replace('"image_id"', '"imageid"')      # a missing field
lines[5] = lines[5].replace('"caption": [', '"caption": 7, "x": [')  # a wrong type
open(path, "w").write("\n".join(lines) + "\n")
EOF
rm anno/test/10.jpg
variant dup; head -1 dup/annotation/train/pair_0.json >>dup/annotation/train/pair_0.json
mkdir -p cwd
case_ "check-data: three bad lines in one split" fail -- "${TPAS[@]}" check-data anno --format pab --split test --workers 2
check "check-data: every bad line listed" "cd cwd && ${TPAS[*]} check-data ../anno --format pab --split test | grep -q 'annotation problems: 3'" "annotation problems: 3 (all three lines, not only the first)"
check "check-data: images of that split still checked" "cd cwd && ${TPAS[*]} check-data ../anno --format pab --split test | grep -q 'missing images: 1'" "missing images: 1 (test/10.jpg), although the split's annotations had errors"
check "check-data: a line that ends early" "cd cwd && ${TPAS[*]} check-data ../anno --format pab --split test | grep -q 'attr.json:2: malformed JSON: the line ends at column'" "attr.json:2: malformed JSON: the line ends at column N (where it stops, not column 1)"
check "check-data: writes nothing unasked" "test -z \"\$(ls -A cwd)\"" "the folder it ran in is still empty (a report only with --report)"
case_ "check-data: duplicate training image_id" fail -- "${TPAS[@]}" check-data dup --format pab --split train
check "check-data: duplicate named with both lines" "${TPAS[*]} check-data dup --format pab --split train | grep -q \"duplicate image_id .* (first seen at line 1)\"" "pair_0.json:N: duplicate image_id '...' (first seen at line 1)"

# -- models, configs, files, demo ----------------------------------------------------------------------
case_ "index --model lite" ok -- "${TPAS[@]}" index --model lite --data mp --out idx-lite --workers 0
case_ "search --model lite on that index" ok -- "${TPAS[@]}" search --index idx-lite --model lite "a man is running" --k 3
case_ "train --config pab-xvlm, checkpoint null" fail -- "${TPAS[@]}" train --config pab-xvlm data.root=mp --out run-xvlm
check "files follow the umask (022)" "test \"\$(stat -c %a ev3/metrics.json)\" = 644 && test \"\$(stat -c %a idx-lite/meta.json)\" = 644" "metrics.json and meta.json are 644 under umask $(umask), not 600"
sed 's/max_steps: 1/max_steps: 2/; s/val_identities: 0/val_identities: 2/; s/every: -1/every: 0/' tiny.yaml >demo.yaml
case_ "demo (tiny config)" ok -- "${TPAS[@]}" demo --out demo --identities 12 --config demo.yaml --rerank 4 --workers 1 --no-serve
check "demo keeps no checkpoints" "test ! -e demo/train/checkpoints && test ! -e demo/train/last && test ! -e demo/train/best && test \"\$(find demo -name '*.safetensors' | wc -l)\" = 1" "demo folder $(du -sh demo 2>/dev/null | cut -f1): no train/checkpoints, last/ or best/; one copy of the weights (model/)"

# -- reports -------------------------------------------------------------------------------------------
case_ "eval --post sca (report)" ok -- "${TPAS[@]}" eval "${EV[@]}" --data mp --out ev-sca --post sca
check "SCA report: scores in rank order, deep true match shown" "$PY - ev-sca/report.html <<'EOF'
import re, sys
page = open(sys.argv[1]).read()
deep = 0
for block in page.split('<div class=\"q\">')[1:]:
    cells = re.findall(r'<div>#(\d+) ([^<]+)</div>', block)
    numbers = [float(v) for r, v in cells if v not in ('SCA pick', 'true match')]
    assert numbers == sorted(numbers, reverse=True), cells
    stated = int(re.search(r'true match at rank (\d+)', block).group(1))
    if stated > 10:
        assert (str(stated), 'true match') in cells
        deep += 1
assert deep > 0
EOF" "every row's printed scores follow its ranks (SCA picks marked); true matches below rank 10 shown with their rank"

# -- the server ----------------------------------------------------------------------------------------
case_ "serve --host 0.0.0.0 without --allow-remote" fail -- "${TPAS[@]}" serve --index idx-lite --model lite --host 0.0.0.0
check "search prints no FAISS loader lines" "! ${TPAS[*]} search --index idx-lite --model lite 'a man' --k 1 2>&1 | grep -qi faiss" "tpas search output holds no 'faiss.loader: Could not load library with AVX2' lines"
export TPAS_SERVE_TOKEN="bad-inputs-token-$(date +%s%N)"
"${TPAS[@]}" serve --index idx-lite --model lite --port 0 >serve.log 2>&1 &
server_pid=$!
url=""
for _ in $(seq 1 300); do
  url=$(grep -o -m1 'http://127.0.0.1:[0-9]*/' serve.log || true)
  [ -n "$url" ] && break
  sleep 0.5
done
auth=(-H "Authorization: Bearer $TPAS_SERVE_TOKEN")
api() { curl -s -o "$work/body.json" -w '%{http_code} %{time_total}' "${auth[@]}" "$@"; }
if [ -z "$url" ]; then
  echo "| serve | - | FAIL: no address | $(tail -1 serve.log) |" | tee -a "$table"; failures=$((failures + 1))
else
  check "serve: no FAISS loader lines" "! grep -q faiss serve.log" "the server log up to 'search page at' has no faiss lines"
  first=$(api "${url}api/search?q=a+man+in+a+red+jacket+is+running&k=10" | cut -d' ' -f2)
  second=$(api "${url}api/search?q=a+woman+falls+down&k=10" | cut -d' ' -f2)
  check "serve: warmed up before ready" "$PY -c 'import sys; sys.exit(not float(\"$first\") < 0.5)'" "first query ${first}s, second ${second}s (round trip, curl)"
  for q in "%F0%9F%98%80%F0%9F%8F%83" "%E4%B8%80%E4%B8%AA%E7%94%B7%E4%BA%BA%E5%9C%A8%E8%B7%91%E6%AD%A5" "%FF%FE%FD"; do
    code=$(api "${url}api/search?q=$q" | cut -d' ' -f1)
    check "serve: unreadable query $q" "test $code = 200 && jq -e '.understood == false' $work/body.json" "$code understood=$(jq -c .understood body.json): $(jq -r .notice body.json | cut -c1-90)"
  done
  spaces=$("$PY" -c "print('man' + '%20' * 400 + 'running')")
  code=$(api "${url}api/search?q=$spaces" | cut -d' ' -f1)
  check "serve: man + 400 spaces + running" "test $code = 200" "$code, query read as \"$(jq -r .query body.json)\""
  api "${url}api/examples" >/dev/null
  check "serve: page re-rank default follows validation" "jq -e '.defaults.rerank == 0' $work/body.json" "/api/examples defaults: $(jq -c .defaults body.json) (model lite records no validated gain: ITC only)"
  no_token=$(curl -s -o /dev/null -w '%{http_code}' "${url}api/search?q=man")
  no_token_img=$(curl -s -o /dev/null -w '%{http_code}' "${url}images/0")
  with_token=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" "${url}images/0")
  page=$(curl -s -o /dev/null -w '%{http_code}' "${url}")
  check "serve: bearer token" "test $no_token = 401 && test $no_token_img = 401 && test $with_token = 200 && test $page = 200" "search without token $no_token, image without $no_token_img, image with $with_token, page $page"
fi

cp "$table" "$results/bad_inputs.md"
echo
echo "$failures failing cases; table in benchmarks/results/bad_inputs.md"
[ "$failures" -eq 0 ]
