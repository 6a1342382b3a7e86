#!/usr/bin/env bash
# Soak test (not run in CI): edgebridge between sequence-numbered devices and a real
# Mosquitto upstream, at a steady rate, with an upstream outage every OUTAGE_PERIOD.
# Reports RSS over time, drops (from the gateway's metrics) and loss/duplicates/order
# (from the sequence numbers the upstream subscriber received).
#
#   scripts/soak.sh                                   # 30 min, outage every 5 min
#   scripts/soak.sh long                              # 2 hours, outage every 10 min
#   DURATION=360 OUTAGE_PERIOD=60 scripts/soak.sh     # 6 min, outage every minute
#
# Memory verdict: RSS at the end against RSS after the warm-up (the first sample at
# WARMUP seconds, when the first outage starts): flat means within 10%.
#
# Parameters (environment):
#   DURATION       seconds of load (default 1800)
#   OUTAGE_PERIOD  seconds between the starts of two upstream outages (default 300)
#   OUTAGE_LENGTH  seconds the upstream stays down each time (default OUTAGE_PERIOD / 3)
#   RATE           messages per second in total (default 8000). The gateway forwards ~33k
#                  msg/s flat out here (README "Performance"), but this load generator
#                  (mosquitto_pub, python), the upstream and its subscriber take most of
#                  the two cores: at 16000 the gateway got half a core and fell behind.
#   DEVICES        device connections sharing RATE (default 10)
#   SAMPLE         seconds between two RSS samples (default 10)
#   WARMUP         seconds before the reference RSS sample (default 600, or DURATION / 3
#                  when that is shorter)
#   BIN            the gateway binary (default target/release/edgebridge under
#                  CARGO_TARGET_DIR or ./target; built when missing)
#   OUT            directory for config, logs, received messages and the report
#                  (default a new temp dir; kept)
#
# Needs: mosquitto, mosquitto_pub, mosquitto_sub, python3, curl.
set -euo pipefail

if [[ ${1:-} == long ]]; then
    DURATION=${DURATION:-7200}
    OUTAGE_PERIOD=${OUTAGE_PERIOD:-600}
    OUTAGE_LENGTH=${OUTAGE_LENGTH:-120}
fi
DURATION=${DURATION:-1800}
OUTAGE_PERIOD=${OUTAGE_PERIOD:-300}
OUTAGE_LENGTH=${OUTAGE_LENGTH:-$((OUTAGE_PERIOD / 3))}
RATE=${RATE:-8000}
DEVICES=${DEVICES:-10}
SAMPLE=${SAMPLE:-10}
WARMUP=${WARMUP:-$((DURATION / 3 < 600 ? DURATION / 3 : 600))}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/edgebridge}
OUT=${OUT:-$(mktemp -d /tmp/edgebridge-soak.XXXXXX)}
mkdir -p "$OUT"

for tool in mosquitto mosquitto_pub mosquitto_sub python3 curl; do
    command -v "$tool" >/dev/null || { echo "soak: $tool is missing" >&2; exit 2; }
done
if [[ ! -x $BIN ]]; then
    (cd "$ROOT" && cargo build --release --locked --bin edgebridge)
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port); DEV_PORT=$(free_port); ADMIN_PORT=$(free_port)

# Every process started here, killed on every exit path.
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [[ -n ${UP_PID:-} ]] && kill "$UP_PID" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT

# The upstream: persistent, so the subscriber's session and what is queued for it
# survive each outage (SIGTERM saves the database); no queue limit (DESIGN.md).
cat >"$OUT/mosquitto.conf" <<EOF
user root
allow_anonymous true
persistence true
persistence_location $OUT/
max_queued_messages 0
max_inflight_messages 0
log_dest file $OUT/mosquitto.log
listener $UP_PORT 127.0.0.1
EOF
start_upstream() {
    mosquitto -c "$OUT/mosquitto.conf" &
    UP_PID=$!
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$UP_PORT) 2>/dev/null && return 0
        sleep 0.1
    done
    echo "soak: mosquitto did not start" >&2; exit 1
}
stop_upstream() { kill -TERM "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; UP_PID=; }

cat >"$OUT/edgebridge.toml" <<EOF
[gateway]
id = "soak"
data_dir = "$OUT/data"
[admin]
bind = "127.0.0.1:$ADMIN_PORT"
[log]
level = "warn"
[[listeners]]
name = "devices"
bind = "127.0.0.1:$DEV_PORT"

[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:$UP_PORT"
backoff_min = "200ms"
backoff_max = "5s"

[[rules]]
name = "all"
from = "dev/+"
to = ["cloud"]
topic = "up/{1}"
EOF

start_upstream
# The subscriber: QoS 1, persistent session, one "topic payload" line per message.
mosquitto_sub -h 127.0.0.1 -p "$UP_PORT" -i soak-sub -c -q 1 -t 'up/#' -v >"$OUT/received.txt" &
PIDS+=($!)
sleep 1
"$BIN" run --config "$OUT/edgebridge.toml" >"$OUT/edgebridge.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
for _ in $(seq 100); do
    curl -sf "127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break
    sleep 0.1
done

# Devices: each a `mosquitto_pub -l` (QoS 1) fed `{"device":D,"seq":S}` lines at RATE/DEVICES
# per second, in 10 ms ticks, for DURATION seconds.
for d in $(seq 0 $((DEVICES - 1))); do
    python3 - "$d" "$((RATE / DEVICES))" "$DURATION" "$OUT/sent-$d" <<'PY' |
import sys, time
device, rate, duration = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
out = sys.stdout
start = time.monotonic()
seq = 0
while True:
    now = time.monotonic() - start
    if now >= duration:
        break
    due = int(now * rate)
    if seq < due:
        out.write("".join('{"device":%d,"seq":%d}\n' % (device, s) for s in range(seq, due)))
        out.flush()
        seq = due
    time.sleep(0.01)
open(sys.argv[4], "w").write(f"{seq}\n")
PY
        mosquitto_pub -h 127.0.0.1 -p "$DEV_PORT" -i "soak-dev-$d" -q 1 -t "dev/$d" -l \
            2>"$OUT/device-$d.err" &
    PIDS+=($!)
done

# Sum of every sample of metric $1 (all label sets).
metric() { curl -s "127.0.0.1:$ADMIN_PORT/metrics" | awk -v n="$1" '$1 == n || index($1, n "{") == 1 {s += $2} END {printf "%d", s}'; }
# RssAnon is the heap and stacks (what a leak grows); RssFile is mapped files and code.
echo "t_s,rss_mib,anon_mib,file_mib,upstream,buffer_messages,delivered,dropped" >"$OUT/rss.csv"
START=$(date +%s)
NEXT_OUTAGE=$OUTAGE_PERIOD
OUTAGE_END=0
while :; do
    NOW=$(($(date +%s) - START))
    (( NOW >= DURATION )) && break
    if [[ -n ${UP_PID:-} ]] && (( NOW >= NEXT_OUTAGE )); then
        stop_upstream
        OUTAGE_END=$((NOW + OUTAGE_LENGTH))
        NEXT_OUTAGE=$((NEXT_OUTAGE + OUTAGE_PERIOD))
    elif [[ -z ${UP_PID:-} ]] && (( NOW >= OUTAGE_END )); then
        start_upstream
    fi
    RSS=$(awk '/^(VmRSS|RssAnon|RssFile):/ {printf "%s%.1f", sep, $2 / 1024; sep = ","}' "/proc/$GW_PID/status")
    echo "$NOW,$RSS,$([[ -n ${UP_PID:-} ]] && echo up || echo down),$(metric edgebridge_buffer_messages),$(metric edgebridge_sink_delivered_total),$(metric edgebridge_buffer_dropped_total)" >>"$OUT/rss.csv"
    sleep "$SAMPLE"
done
[[ -z ${UP_PID:-} ]] && start_upstream

# Let the devices finish and the backlog drain (at most 10 minutes).
for _ in $(seq 600); do
    (( $(metric edgebridge_buffer_messages) == 0 )) && ! pgrep -f "soak-dev-" >/dev/null && break
    sleep 1
done
sleep 3
PEAK=$(awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$GW_PID/status")
ACCEPTED=$(metric edgebridge_messages_received_total)
DEV_DROPS=$(metric edgebridge_messages_dropped_total)
BUF_DROPS=$(metric edgebridge_buffer_dropped_total)
DELIVERED=$(metric edgebridge_sink_delivered_total)
SENT=$(cat "$OUT"/sent-* | awk '{s += $1} END {print s}')

python3 - "$OUT/received.txt" "$SENT" "$ACCEPTED" "$PEAK" "$DEV_DROPS" "$BUF_DROPS" "$DELIVERED" "$DURATION" "$OUT/rss.csv" "$WARMUP" >"$OUT/report.txt" <<'PY'
import csv, json, sys
path, sent, accepted, peak, dev_drops, buf_drops, delivered, duration, rss_csv, warmup = sys.argv[1:11]
# One bit per sequence number and device: two hours at 8,000 msg/s are 57.6M messages.
seen, count, dup, ooo, top = {}, {}, 0, 0, {}
for line in open(path, errors="replace"):
    try:
        m = json.loads(line.split(" ", 1)[1])
        d, s = m["device"], m["seq"]
    except Exception:
        continue
    bits = seen.setdefault(d, bytearray())
    if s >> 3 >= len(bits):
        bits.extend(bytes(max((s >> 3) + 1 - len(bits), len(bits))))
    if bits[s >> 3] & (1 << (s & 7)):
        dup += 1
        continue
    if s < top.get(d, -1):
        ooo += 1
    bits[s >> 3] |= 1 << (s & 7)
    count[d] = count.get(d, 0) + 1
    top[d] = max(top.get(d, -1), s)
unique = sum(count.values())
missing = sum(top[d] + 1 - count[d] for d in count)
print(f"sent by devices: {sent}; accepted by the gateway: {accepted}")
print(f"delivered (sink acks): {delivered}")
print(f"received upstream: {unique} unique, {dup} duplicates, {ooo} out of order")
print(f"missing below each device's highest seq: {missing}")
# mosquitto_pub -l may give up on lines it had not published when its input ends: the
# generator's shortfall is reported apart from the gateway's loss.
print(f"not published by the load generator (sent - accepted): {int(sent) - int(accepted)}")
print(f"lost by the gateway (accepted - unique received): {int(accepted) - unique}")
print(f"dropped: intake {dev_drops}, buffer {buf_drops}")
print(f"peak RSS: {peak} MiB")
rows = list(csv.DictReader(open(rss_csv)))
after = [r for r in rows if int(r["t_s"]) >= int(warmup)]
if after and after[-1] is not after[0]:
    ref, end = after[0], after[-1]
    change = (float(end["rss_mib"]) / float(ref["rss_mib"]) - 1) * 100
    verdict = "flat (within 10%)" if abs(change) <= 10 else "NOT flat (over 10%)"
    print(f"RSS after warm-up (t={ref['t_s']} s): {ref['rss_mib']} MiB (anon {ref['anon_mib']}); "
          f"at the end (t={end['t_s']} s): {end['rss_mib']} MiB (anon {end['anon_mib']}): "
          f"{change:+.1f}%, {verdict}")
    peak_after = max(after, key=lambda r: float(r["rss_mib"]))
    print(f"highest sample after warm-up: {peak_after['rss_mib']} MiB at t={peak_after['t_s']} s")
print(f"achieved rate: {int(accepted) / float(duration):.0f} msg/s accepted")
PY
{
    echo "soak: duration ${DURATION}s, outage ${OUTAGE_LENGTH}s every ${OUTAGE_PERIOD}s, ${RATE} msg/s over ${DEVICES} devices"
    cat "$OUT/report.txt"
    echo "RSS series ($OUT/rss.csv):"
    column -s, -t "$OUT/rss.csv"
} | tee "$OUT/summary.txt"
