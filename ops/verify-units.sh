#!/bin/bash
# Check the systemd units of ops/ with `systemd-analyze verify` (no systemd needed as PID 1):
# each unit is verified as installed here, with /opt/fleet/.venv replaced by this checkout's
# virtual environment (VENV, default <repo>/.venv) so that its commands are checked to exist.
#   ops/verify-units.sh            # prints one line per unit; exit 1 when any unit has a fault
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$repo/.venv}
command -v systemd-analyze >/dev/null || { echo "verify-units: systemd-analyze is missing (apt-get install systemd)" >&2; exit 1; }
[ -x "$venv/bin/fleet" ] || { echo "verify-units: $venv/bin/fleet is missing (set VENV)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
faults=0
for unit in "$repo"/ops/*.service; do
  name=$(basename "$unit")
  sed "s#/opt/fleet/.venv#$venv#g" "$unit" > "$tmp/$name"
  check=$name
  [[ $name == *@.service ]] && check=${name/@/@0}  # a template is verified through an instance
  [[ $check != "$name" ]] && cp "$tmp/$name" "$tmp/$check"
  if out=$(cd "$tmp" && systemd-analyze verify "./$check" 2>&1) && [ -z "$out" ]; then
    echo "ok     $name"
  else
    echo "FAULT  $name: $out"
    faults=$((faults + 1))
  fi
done
echo "systemd-analyze $(systemd-analyze --version | head -1 | cut -d' ' -f2): $faults unit(s) with faults"
[ "$faults" -eq 0 ]
