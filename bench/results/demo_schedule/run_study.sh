#!/usr/bin/env bash
# The study's runs (RULE.md): bash bench/results/demo_schedule/run_study.sh 1|2|TASK  (from the repository root)
set -u
PY=${PY:-python}
OUT=bench/results/demo_schedule
M=full,uniform,es,es-epoch3,es-frac,es-stale3,eswp-epoch3,eswp-frac,eswp-stale3,uniform-time
run() {  # name, then demo arguments
    local name=$1; shift
    mkdir -p "$OUT/$name"
    echo "start $(date -u +%FT%TZ) $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/$name/load.txt"
    nice -n 5 $PY -m es_kernels demo --threads 1 --clock process --seeds 3 --methods "$M" --no-progress \
        --out "$OUT/$name" "$@" > "$OUT/$name/demo.log" 2>&1
    echo "end   $(date -u +%FT%TZ) $(cut -d' ' -f1-3 /proc/loadavg) rc=$?" >> "$OUT/$name/load.txt"
}
case "$1" in
    1) for t in digits digits_noise40 digits_noise60 lm mnist1d_noise60; do "$0" "$t"; done ;;
    2) for t in mnist1d mnist1d_noise40; do "$0" "$t"; done ;;
    digits) run digits --datasets digits ;;
    digits_noise40) run digits_noise40 --datasets digits --label-noise 0.4 ;;
    digits_noise60) run digits_noise60 --datasets digits --label-noise 0.6 ;;
    lm) run lm --task lm ;;
    mnist1d) run mnist1d --datasets mnist1d ;;
    mnist1d_noise40) run mnist1d_noise40 --datasets mnist1d --label-noise 0.4 ;;
    mnist1d_noise60) run mnist1d_noise60 --datasets mnist1d --label-noise 0.6 ;;
    *) echo "usage: $0 1|2|TASK" >&2; exit 2 ;;
esac
