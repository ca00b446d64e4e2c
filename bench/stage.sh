# Shared by bench/gpu_check_*.sh (sourced): run one stage under its own time limit, so one hang cannot eat the
# device budget. Needs OUT (the results folder); logs to OUT/NAME.log, appends rc and seconds to OUT/stages.txt.
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%-14s rc=%-3s %4ss (limit %ss)\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" | tee -a "$OUT/stages.txt"
}
