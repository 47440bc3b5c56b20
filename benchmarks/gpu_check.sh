#!/usr/bin/env bash
# GPU check of the project, in one go, on a machine with an NVIDIA GPU (under 8 minutes):
#
#   bash benchmarks/gpu_check.sh [OUTDIR]     # OUTDIR: default $OUT, else ./gpu_report
#
# 1. checks that nvidia-smi exists and sees a GPU (else exits 2 with a message);
# 2. creates (or reuses) a virtual environment, default .venv-gpu (GPU_VENV=path to change;
#    the CPU .venv of `make test` is left alone), and installs what it needs from the package
#    registries only: torch with CUDA from download.pytorch.org (TORCH_VERSION, default 2.13.0;
#    the CUDA wheel indexes of TORCH_CUDA_INDEXES are tried in order, then PyPI's torch, whose
#    Linux wheel is a CUDA build), cupy-cuda12x, jax[cuda12], then the project with
#    `pip install -e '.[test,bench]'` (pyproject.toml's extras; constraints.txt is not used, it
#    pins the CPU test setup). An environment that already imports everything with CUDA is
#    reused as it is (SKIP_INSTALL=1 forces that);
# 3. runs the test suite's GPU parts (JAX tests run on the default backend, the GPU, and the
#    core's backend-parametrized tests with the jax backend; CuPy tests need the GPU):
#    `pytest tests -m "not slow" -k "jax or cupy"`, then benchmarks/gpu_smoke.py (torch on
#    CUDA against the CPU in float32 and float64, checkpoints moved CUDA <-> CPU, grng_jax on
#    the GPU against the CPU and its checkpoint GPU -> CPU), which the test suite has no GPU for;
# 4. runs the step-cost benchmark on the GPU: `python -m benchmarks.stepcost --quick
#    --device cuda` (torch rows on CUDA, JAX rows on JAX's default backend);
# 5. writes OUTDIR/report.md: environment (nvidia-smi, versions), pass/fail counts, the GPU
#    smoke lines and the step-cost targets and tables; logs and junit XML beside it.
#
# Offline (the device tool's lent GPU machine reaches no registry): with wheels in .whl/
# (`bash benchmarks/gpu_wheels.sh` on a machine that reaches the registries; carry ".whl"), or
# OFFLINE=1, no venv is made and nothing is fetched: the image's python3 (GPU_PYTHON to
# change) with its torch, jax and cupy runs everything, the wheels installed into
# /tmp/grng-site and the project put on PYTHONPATH. On the device tool:
#   run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
#
# Every phase runs under `timeout` against one deadline (BUDGET_S, default 470 s); a phase that
# fails or times out is reported and the script goes on. Exit status: 0 when every phase ran
# and passed, 1 otherwise, 2 when there is no GPU.

set -u -o pipefail

BUDGET_S=${BUDGET_S:-470}
START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${1:-${OUT:-./gpu_report}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
VENV=${GPU_VENV:-$ROOT/.venv-gpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CUDA_INDEXES=${TORCH_CUDA_INDEXES:-"cu126 cu128 cu129 cu130"}
LOG=$OUTDIR/gpu_check.log
STATUS=0
declare -A PHASE

cd "$ROOT" || exit 1
: >"$LOG"

say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_phase NAME MAX_SECONDS RESERVE_SECONDS CMD...: CMD under timeout min(MAX, time left -
# RESERVE), output appended to OUTDIR/NAME.log; records ok / failed (rc) / timed out
run_phase() {
    local name=$1 max=$2 reserve=$3 t rc
    shift 3
    t=$(($(left) - reserve))
    ((t > max)) && t=$max
    if ((t < 10)); then
        PHASE[$name]="not run (no time left)"
        STATUS=1
        say "$name: not run, no time left"
        return 1
    fi
    say "$name: start (limit ${t}s)"
    timeout --kill-after=10 "$t" "$@" >>"$OUTDIR/$name.log" 2>&1
    rc=$?
    if ((rc == 0)); then
        PHASE[$name]="ok"
    elif ((rc == 124 || rc == 137)); then
        PHASE[$name]="timed out after ${t}s"
        STATUS=1
    else
        PHASE[$name]="failed (exit $rc)"
        STATUS=1
    fi
    say "$name: ${PHASE[$name]}"
    return $rc
}

# ---------------------------------------------------------------------------------- 1. GPU
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: this script needs a machine with an NVIDIA GPU and" \
        "its driver (nothing was installed or run)" | tee -a "$LOG" >&2
    exit 2
fi
if ! nvidia-smi -L >"$OUTDIR/nvidia-smi-L.txt" 2>&1 || ! grep -q "GPU" "$OUTDIR/nvidia-smi-L.txt"; then
    echo "gpu_check: nvidia-smi sees no GPU: $(head -c 300 "$OUTDIR/nvidia-smi-L.txt")" \
        | tee -a "$LOG" >&2
    exit 2
fi
nvidia-smi >"$OUTDIR/nvidia-smi.txt" 2>&1
say "GPU: $(head -n 1 "$OUTDIR/nvidia-smi-L.txt")"

# ---------------------------------------------------------------------------- 2. environment
WHEELS=$ROOT/.whl
if [[ ${OFFLINE:-0} == 1 ]] || compgen -G "$WHEELS/*.whl" >/dev/null; then
    OFFLINE=1
    PY=$(command -v "${GPU_PYTHON:-python3}")
    VENV="the image's $PY (offline)"
    SITE=/tmp/grng-site
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        say "offline: installing $(ls "$WHEELS" | tr '\n' ' ')into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 || say "offline: wheel install failed"
    fi
    export PYTHONPATH=$SITE:$ROOT:$ROOT/adapters${PYTHONPATH:+:$PYTHONPATH}
else
    OFFLINE=0
    PY=$VENV/bin/python
fi
if [[ $OFFLINE == 0 && ! -x $PY ]]; then
    PYTHON=${PYTHON:-python3}
    say "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV" || { say "cannot create the venv"; exit 1; }
fi

ready() {
    "$PY" - <<'EOF' >/dev/null 2>&1
import cupy, jax, torch, grng_core, grng_torch, grng_jax, pytest, hypothesis, matplotlib
assert torch.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
assert jax.default_backend() == "gpu"
EOF
}

pipi() { "$PY" -m pip install --disable-pip-version-check --progress-bar off "$@"; }

install_all() {
    pipi --upgrade pip setuptools wheel || return 1
    local ok=0 idx
    for idx in $TORCH_CUDA_INDEXES; do
        say "torch==$TORCH_VERSION from https://download.pytorch.org/whl/$idx"
        if pipi "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/$idx"; then
            ok=1
            break
        fi
    done
    if ((ok == 0)); then
        say "no CUDA wheel of torch $TORCH_VERSION on those indexes: PyPI's torch"
        pipi "torch==$TORCH_VERSION" || pipi torch || return 1
    fi
    pipi cupy-cuda12x "jax[cuda12]" || return 1
    pipi -e ".[test,bench]" || pipi -e ".[test]" || return 1
    "$PY" -c "import torch; assert torch.cuda.is_available(), torch.__version__"
}

# `timeout` runs programs, not functions: the install runs in a child bash
export -f say left pipi install_all
export PY TORCH_VERSION TORCH_CUDA_INDEXES START LOG BUDGET_S

if [[ ${SKIP_INSTALL:-0} == 1 ]] || ready; then
    PHASE[install]="reused $VENV"
    say "install: reusing $VENV"
elif [[ $OFFLINE == 1 ]]; then
    PHASE[install]="offline, not ready: $("$PY" -c 'import cupy, jax, torch, grng_core, grng_torch, grng_jax, pytest, hypothesis, matplotlib; print("imports ok; torch cuda", torch.cuda.is_available(), "| jax", jax.default_backend())' 2>&1 | tail -n 1)"
    STATUS=1
    say "install: ${PHASE[install]}"
else
    run_phase install 330 140 bash -c install_all
fi

"$PY" - >"$OUTDIR/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for d in ("torch", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "cupy-cuda12x",
          "cupy-cuda13x", "numpy", "array-api-compat", "optax", "flax", "grng", "asdfghjkl",
          "kfac-jax", "pytest"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "not installed")
try:
    import torch
    print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available(),
          "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
except Exception as e:
    print("torch:", type(e).__name__, e)
try:
    import jax
    print("jax backend", jax.default_backend(), "| devices", jax.devices())
except Exception as e:
    print("jax:", type(e).__name__, e)
try:
    import cupy
    print("cupy CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "| devices",
          cupy.cuda.runtime.getDeviceCount())
except Exception as e:
    print("cupy:", type(e).__name__, e)
EOF

# ------------------------------------------------------------------------------- 3. tests
run_phase tests 170 120 "$PY" -m pytest tests -q -m "not slow" -k "jax or cupy" \
    -p no:cacheprovider -o addopts="" -rfEs --junitxml="$OUTDIR/junit.xml"
run_phase gpu_smoke 90 100 "$PY" -m benchmarks.gpu_smoke all

# ---------------------------------------------------------------------------- 4. step cost
run_phase stepcost 300 15 "$PY" -m benchmarks.stepcost --quick --device cuda \
    --out "$OUTDIR/stepcost"

# ------------------------------------------------------------------------------- 5. report
"$PY" - "$OUTDIR" "$BUDGET_S" "$(($(date +%s) - START))" \
    "install=${PHASE[install]:-not run}" "tests=${PHASE[tests]:-not run}" \
    "gpu_smoke=${PHASE[gpu_smoke]:-not run}" "stepcost=${PHASE[stepcost]:-not run}" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, budget, took = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
phases = dict(a.split("=", 1) for a in sys.argv[4:])


def text(name, default="(missing)"):
    p = out / name
    return p.read_text(errors="replace").strip() if p.exists() else default


md = ["# GPU check", "", f"Wall time {took} s (budget {budget} s).", "", "## Phases", ""]
md += [f"- {k}: {v}" for k, v in phases.items()]
md += ["", "## Environment", "", "```", text("versions.txt"), "", text("nvidia-smi.txt"), "```"]
md += ["", "## Tests: `pytest tests -m 'not slow' -k 'jax or cupy'`", ""]
junit = out / "junit.xml"
if junit.exists():
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        n = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        md.append(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, "
                  f"{n['skipped']} skipped (of {n['tests']}).")
        bad = [f"- {c.get('classname')}::{c.get('name')}" for s in suites
               for c in s.iter("testcase") if c.find("failure") is not None
               or c.find("error") is not None]
        md += ["", "Failed:", ""] + bad[:50] if bad else []
    except ET.ParseError as e:
        md.append(f"(junit.xml unreadable: {e})")
else:
    md.append("(no junit.xml: the tests did not run to the end; see tests.log)")
tail = text("tests.log", "").splitlines()[-15:]
md += ["", "```", *tail, "```"]
md += ["", "## GPU smoke (`python -m benchmarks.gpu_smoke`)", "", "```"]
md += [ln for ln in text("gpu_smoke.log", "").splitlines()
       if ln.startswith(("PASS", "FAIL", "SKIP", "gpu_smoke:"))] or ["(no output)"]
md += ["```", "", "## Step cost on the GPU (`python -m benchmarks.stepcost --quick --device "
       "cuda`)", ""]
sc = out / "stepcost" / "stepcost.md"
if sc.exists():
    body = sc.read_text(errors="replace")
    md.append(body.split("\n### ", 1)[0] if "## Targets" in body else body)
    tables = body.split("\n### ", 1)
    if len(tables) == 2:
        md += ["", "### " + tables[1].split("\nStep-cost microbenchmark", 1)[0]]
else:
    md += ["(no stepcost.md)", "```", *text("stepcost.log", "").splitlines()[-20:], "```"]
(out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
print(out / "report.md")
EOF
say "report: $OUTDIR/report.md (exit $STATUS)"
exit $STATUS
