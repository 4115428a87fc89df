#!/usr/bin/env bash
# Run on the GPU machine from the checkout root, after scripts/gpu-build.sh
# here and with .gpu carried: compute-sanitizer's four tools (memcheck,
# racecheck, initcheck, synccheck) over every GPU test executable and a bf16
# run of the 2-layer qwen3-30b-a3b synthetic model with every stage
# captured (so the capture copies are checked too). Logs go under $OUT; a
# table of error summaries is printed last. Exit 1 when any tool reports an
# error. TOOLS, ONLY (names matching a regex) and LIMIT_S (seconds per
# command) narrow a rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
logs=.gpu/sanitize-logs
mkdir -p "$out" "$logs"
export MOETRACE_GPU=1 MOETRACE_FIXTURES="$PWD/.gpu/fixtures"
{
    echo "date: $(date -u +%F)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1 | sed 's/^/gpu: /'
    compute-sanitizer --version | tail -1 | sed 's/^/sanitizer: /'
} | tee "$out/machine.txt"
cat >"$logs/bf16-2layer.ron" <<RON
(
    model: Synthetic(preset: "qwen3-30b-a3b", seed: 7, layers: 2),
    prompt: Tokens([1, 17, 423, 45, 300, 5, 77, 100]),
    generate: 2,
    backend: Cuda(device: 0, dtype: Bf16),
    capture: (stages: "all", out_dir: "$PWD/.gpu/sanitize-capture"),
)
RON
sed -e 's/Bf16/F32/' -e 's/sanitize-capture/sanitize-capture-f32/' "$logs/bf16-2layer.ron" >"$logs/f32-2layer.ron"
tools=${TOOLS:-memcheck racecheck initcheck synccheck}
limit=${LIMIT_S:-150}
for tool in $tools; do
    for exe in .gpu/bin/test-* moetrace moetrace-f32 moetrace-zeroed oom; do
        name=$(basename "$exe")
        extra=(--print-limit 20)
        case "$tool" in
            memcheck) extra+=(--leak-check full) ;;
            # cuBLAS's Hopper GEMMs (nvjet_sm90_*) synchronise their TMA
            # pipelines with mbarriers that racecheck does not model: it
            # reports hazards inside them (counted by kernel below).
            # Excluding them (--kernel-name-exclude kns=nvjet) makes the
            # sanitizer itself fail with a hardware exception on the H100,
            # so every kernel is instrumented.
            racecheck) ;;
            # initcheck does not see those GEMMs' TMA stores either: it calls
            # the next read of their output uninitialised. Every report is
            # kept (without host backtraces, which take minutes) and counted
            # by kernel or host copy below.
            initcheck) extra=(--print-limit 100000000 --show-backtrace no) ;;
        esac
        case "$exe" in
            # The test that runs out of device memory on purpose: its
            # failed allocation is the point, so API errors are not
            # reported; memory accesses are still checked.
            oom)
                name=test-gpu_memory-oom
                cmd=(.gpu/bin/test-gpu_memory --test-threads=1 out_of_memory)
                extra+=(--report-api-errors no) ;;
            */test-gpu_memory) cmd=("$exe" --test-threads=1 --skip out_of_memory) ;;
            # The symbols name the backend op behind each report.
            moetrace) cmd=(.gpu/bin/moetrace-syms run -q --config "$logs/bf16-2layer.ron") ;;
            moetrace-f32) cmd=(.gpu/bin/moetrace-syms run -q --config "$logs/f32-2layer.ron") ;;
            # Bf16 with every cuBLAS output zeroed before the GEMM writes
            # it: what initcheck then reports is not about TMA stores.
            moetrace-zeroed) cmd=(env MOETRACE_SANITIZE_ZERO_GEMM_OUTPUTS=1 .gpu/bin/moetrace-syms run -q --config "$logs/bf16-2layer.ron") ;;
            *) cmd=("$exe" --test-threads=1) ;;
        esac
        # ONLY (a regular expression over the names) narrows a rerun. The
        # out-of-memory test's kernels are those of the other tests; only
        # memcheck (the failed-allocation path) runs it.
        [[ "$name" =~ ${ONLY:-.} ]] || continue
        [ "$name" = test-gpu_memory-oom ] && [ "$tool" != memcheck ] && continue
        [ "$name" = moetrace-zeroed ] && [ "$tool" != initcheck ] && continue
        log="$logs/$tool-$name.log"
        start=$(date +%s)
        timeout "$limit" compute-sanitizer --tool "$tool" "${extra[@]}" "${cmd[@]}" >"$log" 2>&1
        code=$?
        secs=$(($(date +%s) - start))
        summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
        [ $code = 124 ] && summary="TIMEOUT after ${limit}s; $summary"
        # Written as it goes, so a run cut short still returns its rows
        # and logs (a log holds at most 20 reports; the device tool
        # returns few files, so the logs come back packed).
        printf '%-10s %-22s exit %-3s %4ss  %s\n' "$tool" "$name" "$code" "$secs" "$summary" | tee -a "$out/table.txt"
        if grep -q "Race reported" "$log"; then
            grep -oE "access at [A-Za-z0-9_]+" "$log" | awk '{print $3}' | sort | uniq -c |
                sed "s/^/    $tool $name hazard in kernel: /" | tee -a "$out/kernels.txt"
        fi
        if grep -qE "^========= [A-Z].* of size|Host API memory access error" "$log"; then
            # Where the reports are: the kernel that made the access, or a
            # copy to the host (with its size).
            awk '/^=========     at / { sub(/\+0x[0-9a-f]+.*/, "", $0); sub(/^=========     at /, "", $0); k["kernel " substr($0, 1, 60)]++ }
                /Host API memory access error/ { k["copy to the host of " $(NF - 1) " bytes"]++ }
                END { for (x in k) print k[x], x }' "$log" | sort -rn |
                sed "s/^/    $tool $name: /" | tee -a "$out/kernels.txt"
        fi
        tar -C "$logs" -czf "$out/logs.tar.gz" .
    done
done
rm -rf .gpu/sanitize-capture .gpu/sanitize-capture-f32
echo
echo "compute-sanitizer table"
cat "$out/table.txt"
! grep -vE "ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards" "$out/table.txt" | grep -q .
